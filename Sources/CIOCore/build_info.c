/* The build's identity, set by scripts/build-release (-Xcc -DSVSP_BUILD_COMMIT=...). */
#include "cio.h"

#ifndef SVSP_BUILD_COMMIT
#define SVSP_BUILD_COMMIT "unknown"
#endif

const char *cio_build_commit(void) { return SVSP_BUILD_COMMIT; }
