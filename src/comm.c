// comm.c: helpers shared by the comm implementations.
#include "comm.h"

#include <stdint.h>

size_t comm_dtype_size(enum comm_dtype dt) {
    switch (dt) {
    case COMM_F32: return 4;
    case COMM_BF16: return 2;
    case COMM_I32: return 4;
    case COMM_U8: return 1;
    case COMM_F64:
    case COMM_I64:
    case COMM_U64: return 8;
    }
    return 0;
}
