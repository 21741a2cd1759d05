// backend_stub.c: what a build without the CUDA toolkit links in place of cuda/.
#include <stdio.h>

#include "backend.h"
#include "comm.h"

bool backend_cuda_available(void) { return false; }

int backend_cuda_device_count(void) { return 0; }

bool backend_cuda_create(struct backend *out, int device, enum tp_dtype dtype, char *err, size_t errlen) {
    (void)out;
    (void)device;
    (void)dtype;
    snprintf(err, errlen, "this tptrain was built without CUDA (rebuild with -Dcuda=enabled)");
    return false;
}

bool comm_nccl_available(void) { return false; }

bool comm_nccl_create(struct comm *out, const void *mpi_comm, struct backend be, char *err,
                      size_t errlen) {
    (void)out;
    (void)mpi_comm;
    (void)be;
    snprintf(err, errlen, "this tptrain was built without NCCL (rebuild with -Dcuda=enabled)");
    return false;
}
