/* lun.c — open a LUN (file or block device) O_DIRECT and probe what it is. */
#include "cio_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

/* /sys/dev/block/MAJ:MIN/queue/rotational; a partition's queue lives in its parent. */
static bool probe_rotational(dev_t rdev) {
    char path[128];
    snprintf(path, sizeof path, "/sys/dev/block/%u:%u/queue/rotational", major(rdev), minor(rdev));
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        snprintf(path, sizeof path, "/sys/dev/block/%u:%u/../queue/rotational", major(rdev), minor(rdev));
        f = fopen(path, "r");
    }
    if (f == NULL) return false;
    int c = fgetc(f);
    fclose(f);
    return c == '1';
}

static int probe_block_device(int fd, struct cio_lun_info *info, dev_t rdev) {
    uint64_t size = 0;
    int lbs = 0;
    unsigned int pbs = 0;
    if (ioctl(fd, BLKGETSIZE64, &size) != 0) return -errno;
    if (ioctl(fd, BLKSSZGET, &lbs) != 0) return -errno;
    if (ioctl(fd, BLKPBSZGET, &pbs) != 0) pbs = (unsigned int)lbs;
    info->size_bytes = size;
    info->logical_block_size = (uint32_t)lbs;
    info->physical_block_size = pbs;
    info->is_block_device = true;
    info->rotational = probe_rotational(rdev);
    return 0;
}

/* The file system's O_DIRECT offset alignment (statx STATX_DIOALIGN, Linux 6.1+),
 * or 0 when the kernel or file system does not say. */
static uint32_t probe_dio_alignment(int fd) {
#ifdef STATX_DIOALIGN
    struct statx stx;
    if (statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &stx) == 0 && (stx.stx_mask & STATX_DIOALIGN) &&
        stx.stx_dio_offset_align != 0)
        return stx.stx_dio_offset_align > stx.stx_dio_mem_align ? stx.stx_dio_offset_align : stx.stx_dio_mem_align;
#else
    (void)fd;
#endif
    return 0;
}

static void probe_regular_file(int fd, const struct stat *st, struct cio_lun_info *info) {
    info->size_bytes = (uint64_t)st->st_size;
    /* O_DIRECT needs the underlying device's logical block: ask the file system,
     * else assume 512; st_blksize (the fs block) is a fair "physical" figure. */
    uint32_t dio = probe_dio_alignment(fd);
    info->logical_block_size = dio != 0 ? dio : 512;
    info->physical_block_size = st->st_blksize > 0 ? (uint32_t)st->st_blksize : 4096;
    info->is_block_device = false;
    info->rotational = false;
}

int cio_lun_open(const char *path, bool read_write, struct cio_lun **out) {
    if (path == NULL || out == NULL) return -EINVAL;
    int flags = (read_write ? O_RDWR : O_RDONLY) | O_DIRECT | O_CLOEXEC;
    int fd;
    do {
        fd = open(path, flags);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0) return -errno;

    struct stat st;
    if (fstat(fd, &st) != 0) {
        int err = -errno;
        close(fd);
        return err;
    }
    struct cio_lun_info info;
    memset(&info, 0, sizeof info);
    int rc = 0;
    if (S_ISBLK(st.st_mode)) {
        rc = probe_block_device(fd, &info, st.st_rdev);
    } else if (S_ISREG(st.st_mode)) {
        probe_regular_file(fd, &st, &info);
    } else {
        rc = -ENOTSUP;
    }
    if (rc != 0) {
        close(fd);
        return rc;
    }
    if (info.logical_block_size == 0 || (info.logical_block_size & (info.logical_block_size - 1)) != 0) {
        close(fd);
        return -EINVAL;
    }
    info.alignment = info.logical_block_size > 4096 ? info.logical_block_size : 4096;
    info.read_only = !read_write;

    struct cio_lun *lun = calloc(1, sizeof *lun);
    char *copy = strdup(path);
    if (lun == NULL || copy == NULL) {
        free(lun);
        free(copy);
        close(fd);
        return -ENOMEM;
    }
    lun->fd = fd;
    lun->path = copy;
    lun->info = info;
    atomic_init(&lun->fdsync_refused, false);
    *out = lun;
    return 0;
}

void cio_lun_close(struct cio_lun *lun) {
    if (lun == NULL) return;
    close(lun->fd);
    free(lun->path);
    free(lun);
}

void cio_lun_get_info(const struct cio_lun *lun, struct cio_lun_info *info) { *info = lun->info; }

const char *cio_lun_path(const struct cio_lun *lun) { return lun->path; }

static int write_zeros(int fd, uint64_t size_bytes) {
    enum { CHUNK = 1 << 20 };
    void *zeros = NULL;
    if (posix_memalign(&zeros, 4096, CHUNK) != 0) return -ENOMEM;
    memset(zeros, 0, CHUNK);
    int rc = 0;
    for (uint64_t off = 0; off < size_bytes && rc == 0;) {
        size_t n = size_bytes - off < CHUNK ? (size_t)(size_bytes - off) : CHUNK;
        ssize_t w = pwrite(fd, zeros, n, (off_t)off);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) rc = w < 0 ? -errno : -EIO;
        else off += (uint64_t)w;
    }
    free(zeros);
    if (rc == 0 && fdatasync(fd) != 0) rc = -errno;
    return rc;
}

int cio_file_create(const char *path, uint64_t size_bytes, bool zero_fill) {
    if (path == NULL || size_bytes == 0) return -EINVAL;
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0) return -errno;
    struct stat st;
    int rc = 0;
    if (fstat(fd, &st) != 0) rc = -errno;
    else if (!S_ISREG(st.st_mode)) rc = -ENOTSUP;
    else if ((uint64_t)st.st_size > size_bytes) rc = -EEXIST;
    if (rc == 0) {
        int frc = posix_fallocate(fd, 0, (off_t)size_bytes);
        if (frc != 0) rc = -frc;
    }
    if (rc == 0 && zero_fill) rc = write_zeros(fd, size_bytes);
    if (rc == 0 && fsync(fd) != 0) rc = -errno;
    close(fd);
    return rc;
}

/* Makes [offset, offset+length) of the LUN read as zeros without writing them, where
 * the LUN can: a file's range that is already a hole needs nothing; otherwise
 * FALLOC_FL_ZERO_RANGE (the space stays allocated), else FALLOC_FL_PUNCH_HOLE; a block
 * device gets BLKZEROOUT (the kernel offloads it when the device can). Durable
 * (fdatasync) when it returns 0. -EOPNOTSUPP: the caller writes zeros itself. */
int cio_lun_zero_range(struct cio_lun *lun, uint64_t offset, uint64_t length) {
    if (lun == NULL || length == 0) return -EINVAL;
    if (lun->info.is_block_device) {
        uint64_t range[2] = {offset, length};
        if (ioctl(lun->fd, BLKZEROOUT, range) != 0) {
            return errno == ENOTTY || errno == EOPNOTSUPP || errno == EINVAL ? -EOPNOTSUPP : -errno;
        }
    } else {
        off_t data = lseek(lun->fd, (off_t)offset, SEEK_DATA);
        bool hole = (data < 0 && errno == ENXIO) || (data >= 0 && (uint64_t)data >= offset + length);
        if (!hole && fallocate(lun->fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)length) != 0) {
            if (errno != EOPNOTSUPP && errno != ENOSPC) return -errno;
            if (fallocate(lun->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)length) != 0) {
                return errno == EOPNOTSUPP ? -EOPNOTSUPP : -errno;
            }
        }
        if (hole) return 0; /* nothing changed: nothing to make durable */
    }
    while (fdatasync(lun->fd) != 0) {
        if (errno != EINTR) return -errno;
    }
    return 0;
}
