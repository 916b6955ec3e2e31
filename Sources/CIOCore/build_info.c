/* The build's identity. scripts/build-release writes svsp_build_commit.h into a folder it puts on
 * the include path (a constant flag, so a new commit recompiles this file alone); a development
 * build has no such header. */
#include "cio.h"

#if __has_include("svsp_build_commit.h")
#include "svsp_build_commit.h"
#endif
#ifndef SVSP_BUILD_COMMIT
#define SVSP_BUILD_COMMIT "unknown"
#endif

const char *cio_build_commit(void) { return SVSP_BUILD_COMMIT; }
