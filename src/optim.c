// optim.c: placeholder until the module lands.
#include "common.h"
