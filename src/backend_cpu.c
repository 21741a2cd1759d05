// backend_cpu.c: placeholder until the module lands.
#include "common.h"
