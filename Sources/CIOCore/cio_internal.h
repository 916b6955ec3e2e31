/* cio_internal.h — structures shared by the CIOCore translation units. */
#ifndef CIO_INTERNAL_H
#define CIO_INTERNAL_H

#include "cio.h"

#include <stdatomic.h>

struct cio_lun {
    int fd;
    char *path;
    struct cio_lun_info info;
    /* Set once the kernel refused IOCB_CMD_FDSYNC for this fd: flushes then use fdatasync. */
    atomic_bool fdsync_refused;
};

#define CIO_MAX_INT_CHUNK ((uint64_t)1 << 30) /* ISA-L takes int lengths: feed it ≤ 1 GiB at a time */

#endif
