/*
 * cio.h — svsp's C I/O core: LUNs opened O_DIRECT, a Linux AIO engine,
 * aligned buffer pools, ISA-L checksums and igzip compression.
 *
 * Conventions (every function):
 *   - handles are opaque; create/open functions return 0 and fill *out;
 *   - failures are negative errno values, never aborts, never `errno`;
 *   - option structs carry their own `size` so they can grow.
 *
 * Completion contract of the engine: a prep call (cio_engine_prep_*) that
 * returns 0 calls its callback exactly once, on the engine's reaper thread
 * (or, for an engine its owner reaps, on the thread calling cio_engine_reap
 * or cio_engine_destroy), after the request finished, failed, or the engine
 * shut down. A prep call that returns a negative errno never calls it.
 */
#ifndef CIO_H
#define CIO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------ LUNs */

struct cio_lun;

/** What a LUN is, probed at open. */
struct cio_lun_info {
    uint64_t size_bytes;          /**< device or file size */
    uint32_t logical_block_size;  /**< smallest O_DIRECT unit (512 for files on most fs) */
    uint32_t physical_block_size; /**< device's physical sector (or fs block for files) */
    uint32_t alignment;           /**< max(logical_block_size, 4096): buffer/offset alignment we use */
    bool is_block_device;
    bool rotational;              /**< from /sys/dev/block/M:m/queue/rotational; false for files */
    bool read_only;               /**< opened read-only */
};

/** Open a regular file or block device with O_DIRECT.
 *  @param read_write  false opens O_RDONLY.
 *  @return 0, or -errno (-ENOENT, -EACCES, -EINVAL when O_DIRECT is refused, ...). */
int cio_lun_open(const char *path, bool read_write, struct cio_lun **out);

/** Close a LUN. The caller guarantees no I/O on it is in flight. NULL is a no-op. */
void cio_lun_close(struct cio_lun *lun);

/** Copy the probed facts of an open LUN. */
void cio_lun_get_info(const struct cio_lun *lun, struct cio_lun_info *info);

/** The path the LUN was opened with (owned by the LUN). */
const char *cio_lun_path(const struct cio_lun *lun);

/** Make [offset, offset+length) read as zeros without writing them where the LUN can
 *  (a file's hole, fallocate ZERO_RANGE or PUNCH_HOLE; BLKZEROOUT on a block device);
 *  durable when it returns 0. Blocks: call it off latency-sensitive threads.
 *  @return 0, -EOPNOTSUPP when the LUN cannot (write zeros instead), or -errno. */
int cio_lun_zero_range(struct cio_lun *lun, uint64_t offset, uint64_t length);


/** Create (or extend) a regular file of size_bytes and preallocate it with
 *  fallocate so first writes do not pay for unwritten extents. Refuses
 *  block devices (-ENOTSUP) and shrinking an existing file (-EEXIST).
 *  @param zero_fill  also write zeros through the whole file (slow, but makes
 *                    extents "written" on file systems where that matters). */
int cio_file_create(const char *path, uint64_t size_bytes, bool zero_fill);

/* -------------------------------------------------------- buffer pools */

struct cio_bufpool;

/** A pool of `count` buffers of `buf_size` bytes each, aligned to `alignment`
 *  (a power of two ≥ 512; buf_size a multiple of it). One allocation up front;
 *  get/put never allocate. Thread-safe. */
int cio_bufpool_create(size_t buf_size, uint32_t count, size_t alignment, struct cio_bufpool **out);

/** Free the pool. Every buffer must have been returned (or be unused from now on). */
void cio_bufpool_destroy(struct cio_bufpool *pool);

/** Take a free buffer: 0 with index and data set, or -ENOBUFS when all are in use. */
int cio_bufpool_get(struct cio_bufpool *pool, uint32_t *index, void **data);

/** Return buffer `index`. -EINVAL for an index out of range or already free. */
int cio_bufpool_put(struct cio_bufpool *pool, uint32_t index);

/** Address of buffer `index` (no ownership change). NULL when out of range. */
void *cio_bufpool_data(const struct cio_bufpool *pool, uint32_t index);

size_t cio_bufpool_buf_size(const struct cio_bufpool *pool);
uint32_t cio_bufpool_count(const struct cio_bufpool *pool);
uint32_t cio_bufpool_free_count(struct cio_bufpool *pool);

/** Allocate/free one aligned region outside any pool (control-plane use). */
int cio_aligned_alloc(size_t size, size_t alignment, void **out);
void cio_aligned_free(void *p);

/* ---------------------------------------------------------- AIO engine */

struct cio_engine;

/** Completion callback: result ≥ 0 is the byte count transferred (the whole
 *  request; short transfers are finished internally) or 0 for a flush;
 *  result < 0 is -errno. Runs on the engine's reaper thread; it may prep new
 *  requests, which the engine submits in one batch after the callbacks. */
typedef void (*cio_completion_fn)(void *ctx, uint64_t cookie, int64_t result);

/** Called once after each batch of callbacks (optional). */
typedef void (*cio_batch_end_fn)(void *ctx);

struct cio_engine_opts {
    size_t size;                 /**< sizeof(struct cio_engine_opts) */
    uint32_t queue_depth;        /**< requests in flight at most (1..65536) */
    uint32_t reap_batch;         /**< completions handled before the reaper submits again (default 2; 0 = queue_depth).
                                      Small batches keep the device queue refilled instead of draining in convoys:
                                      4k QD32 against fio on the same file measured 0.89-0.92 with 8, 1.00-1.11 with 2,
                                      0.82 with the whole depth (benchmarks/raw-vs-fio). */
    cio_batch_end_fn batch_end;  /**< optional */
    void *batch_end_ctx;
    uint32_t poll_max_us;        /**< polling: with few requests in the kernel the reaper polls the completion ring
                                      up to this long before it sleeps (default CIO_POLL_DEFAULT_US = 0: sleep at
                                      once; at most CIO_POLL_MAX_US, else -EINVAL). */
    bool caller_reaps;           /**< no reaper thread: the owner watches cio_engine_notify_fd (an event loop's
                                      poller) and calls cio_engine_reap when it is readable, so completions run
                                      on the owner's thread without a second thread's wake-up per request. */
};

void cio_engine_opts_init(struct cio_engine_opts *opts);
#define CIO_POLL_DEFAULT_US 0
#define CIO_POLL_MAX_US 10000

/** io_setup a context of queue_depth with an eventfd and start the reaper thread. */
int cio_engine_create(const struct cio_engine_opts *opts, struct cio_engine **out);

/** Stop accepting new requests (-ESHUTDOWN), deliver every completion of the
 *  requests already accepted, stop the reaper, release the context.
 *  Must not be called from a completion callback. NULL is a no-op. */
void cio_engine_destroy(struct cio_engine *engine);

/** Stage a read of len bytes at offset into buf. buf, offset and len must be
 *  multiples of the LUN's alignment (-EINVAL); [offset, offset+len) must lie
 *  within the LUN (-ERANGE); -EBUSY when queue_depth requests are in use;
 *  -ESHUTDOWN after destroy began. Staged requests go to the kernel on
 *  cio_engine_submit (or automatically after a callback batch). */
int cio_engine_prep_read(struct cio_engine *engine, struct cio_lun *lun, void *buf, uint64_t len,
                         uint64_t offset, cio_completion_fn cb, void *ctx, uint64_t cookie);

/** Stage a write; fua = durable before completion (RWF_DSYNC). Errors as prep_read,
 *  plus -EBADF for a LUN opened read-only. */
int cio_engine_prep_write(struct cio_engine *engine, struct cio_lun *lun, const void *buf, uint64_t len,
                          uint64_t offset, bool fua, cio_completion_fn cb, void *ctx, uint64_t cookie);

/** Stage a flush (IOCB_CMD_FDSYNC; fdatasync fallback where the kernel refuses it). */
int cio_engine_prep_flush(struct cio_engine *engine, struct cio_lun *lun, cio_completion_fn cb, void *ctx,
                          uint64_t cookie);

/** Hand every staged request to the kernel in as few io_submit calls as it
 *  takes. Returns the number submitted (≥ 0) or -errno; requests the kernel
 *  could not take yet stay staged and are retried by the reaper. */
int cio_engine_submit(struct cio_engine *engine);

/** For an engine created with caller_reaps: the eventfd that becomes readable when
 *  there is something to reap (every request signals it through IOCB_FLAG_RESFD).
 *  Owned by the engine; watch a dup of it. -1 for an engine with a reaper thread. */
int cio_engine_notify_fd(const struct cio_engine *engine);

/** For an engine created with caller_reaps: reap what completed without waiting,
 *  run the callbacks on this thread, submit what they staged; a bounded amount
 *  of work per call (the notify fd is signalled again when more is left).
 *  *retry_soon is set when staged requests wait for room in the kernel: call
 *  again in about a millisecond. Returns the callbacks delivered, or -EINVAL
 *  for an engine with a reaper thread. Not from inside a callback. */
int cio_engine_reap(struct cio_engine *engine, bool *retry_soon);

/** The engine requests staged on this thread should go to (NULL: the caller's
 *  own choice): set once by a thread that reaps an engine itself (an event
 *  loop), so the I/O it starts completes on it. */
void cio_engine_set_thread_engine(struct cio_engine *engine);
struct cio_engine *cio_engine_thread_engine(void);

/** True on the engine's reaper thread (where what callbacks stage is submitted after the batch). */
bool cio_engine_is_reaper_thread(const struct cio_engine *engine);

/** The queue depth the engine was created with. */
uint32_t cio_engine_queue_depth(const struct cio_engine *engine);

/** Requests accepted and not yet completed. */
uint32_t cio_engine_inflight(struct cio_engine *engine);

/** Counters since creation. */
struct cio_engine_stats {
    uint64_t submitted;       /**< iocbs handed to io_submit */
    uint64_t submit_calls;    /**< io_submit syscalls */
    uint64_t completed;       /**< callbacks delivered */
    uint64_t reap_batches;    /**< batches of completions */
    uint64_t resubmits;       /**< short transfers and -EAGAIN retried */
    uint64_t fdsync_fallbacks;/**< flushes done with fdatasync */
    uint64_t polls_hit;       /**< waits that polling ended with an event (a completion, or the wake-up
                                   iocb at shutdown and fallback flushes): no sleep */
    uint64_t polls_missed;    /**< waits that polled in vain, then slept */
};
void cio_engine_get_stats(struct cio_engine *engine, struct cio_engine_stats *stats);

/* ----------------------------------------------------------- checksums */

/** CRC32C (Castagnoli, iSCSI) of len bytes with standard init/xorout:
 *  cio_crc32c(zero 32 bytes) == 0x8A9136AA. `seed` is a previous result to
 *  continue a running CRC, or 0 to start. */
uint32_t cio_crc32c(const void *buf, uint64_t len, uint32_t seed);

/** crc32c of each block_size block of buf into out[len / block_size].
 *  -EINVAL unless len is a non-zero multiple of block_size. */
int cio_crc32c_blocks(const void *buf, uint64_t len, uint32_t block_size, uint32_t *out);

/** Compare each block's crc32c with expected[]; *first_bad = index of the first
 *  mismatching block, or UINT64_MAX when all match. -EINVAL as above. */
int cio_crc32c_verify(const void *buf, uint64_t len, uint32_t block_size, const uint32_t *expected,
                      uint64_t *first_bad);

/** CRC-64/XZ (ECMA-182 polynomial, reflected, init and xorout ~0):
 *  "123456789" -> 0x995DC9BBDF1939FA. seed as for cio_crc32c. */
uint64_t cio_crc64(const void *buf, uint64_t len, uint64_t seed);

/* --------------------------------------------------------- compression */

/** Upper bound of the compressed size of in_len bytes (gzip framing included). */
uint64_t cio_compress_bound(uint64_t in_len);

/** gzip-compress with ISA-L igzip at level 0..3.
 *  @return 0 and *out_len, -EINVAL for a bad level or length (> 2 GiB),
 *          -ENOSPC when out_cap is too small, -ENOMEM. */
int cio_compress(int level, const void *in, uint64_t in_len, void *out, uint64_t out_cap, uint64_t *out_len);

/** Decompress a gzip stream made by cio_compress, checking its CRC and length.
 *  @return 0 and *out_len, -EBADMSG for a corrupt or truncated stream,
 *          -ENOSPC when out_cap is too small. */
int cio_decompress(const void *in, uint64_t in_len, void *out, uint64_t out_cap, uint64_t *out_len);

/* ---- build identity ---- */

/* The git commit a release build was made from (scripts/build-release provides it);
 * "unknown" in a development build. */
const char *cio_build_commit(void);

#ifdef __cplusplus
}
#endif
#endif /* CIO_H */
