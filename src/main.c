// main.c: placeholder entry point.
#include "common.h"
int main(void) { return 0; }
