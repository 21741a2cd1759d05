// comm_mpi.c: placeholder until the module lands.
#include "common.h"
