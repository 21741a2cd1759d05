// backend_cuda.cu: placeholder.
