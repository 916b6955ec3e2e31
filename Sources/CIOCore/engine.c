/* engine.c — Linux AIO engine: staged batches into io_submit, and a reaper
 * thread (reaping the AIO ring, sleeping in io_getevents, woken through an
 * eventfd poll iocb) that finishes short transfers, retries -EAGAIN, and runs the
 * callbacks after each reaped batch (never inside reaping, so a callback that
 * preps new I/O never recurses). Per-request state lives in a table sized by
 * the queue depth, allocated once. An engine created with caller_reaps has no
 * reaper thread: every iocb signals an eventfd (IOCB_FLAG_RESFD) that the
 * owner's event loop watches, and the loop reaps (cio_engine_reap). */
#include "cio_internal.h"

#include <errno.h>
#include <libaio.h>
#include <poll.h>
#include <pthread.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#ifndef RWF_DSYNC
#define RWF_DSYNC 0x00000002
#endif

enum cio_op { CIO_OP_READ, CIO_OP_WRITE, CIO_OP_FLUSH };

/* How long staged requests may make no progress (kernel keeps refusing with
 * -EAGAIN and nothing is in flight) before they fail: 5000 × 1 ms. */
#define CIO_MAX_STALLED_ROUNDS 5000
#define CIO_STALL_POLL_MS 1
/* The reaper polls before sleeping only with this many requests in the kernel or fewer. */
#define CIO_POLL_MAX_IN_KERNEL 4

struct cio_req {
    /* iocb must stay first: reaped events carry its address (container_of at offset 0). */
    struct iocb iocb; /* first: the event's obj points here */
    struct cio_req *next;
    cio_completion_fn cb;
    void *ctx;
    uint64_t cookie;
    struct cio_lun *lun;
    uint8_t *buf;
    uint64_t len;
    uint64_t offset;
    uint64_t done_bytes; /* finished so far; a short transfer resubmits the rest */
    int64_t result;
    uint8_t op;
    bool fua;
};

struct cio_completion {
    cio_completion_fn cb;
    void *ctx;
    uint64_t cookie;
    int64_t result;
};

struct req_list {
    struct cio_req *head, *tail;
    uint32_t count;
};

struct cio_engine {
    io_context_t aio;
    int efd;
    uint32_t depth;
    uint32_t reap_batch; /* completions handled before submitting again */
    uint64_t poll_max_ns; /* polling before sleeping, per wait (0: never poll) */
    bool ring_usable;     /* the kernel's completion ring can be read from user space */
    bool caller_reaps;    /* no reaper thread: efd is every iocb's RESFD, the owner reaps */
    uint32_t stalled_rounds; /* caller_reaps: rounds in which staged work made no progress (under reap_lock) */
    pthread_mutex_t reap_lock; /* caller_reaps: one reaping thread at a time (the owner, or destroy) */
    _Atomic uint64_t polls_hit, polls_missed; /* counted without e->lock: a lock per wait would cost */
    pthread_t reaper;
    bool reaper_started;
    /* A one-shot IOCB_CMD_POLL on efd kept in the AIO context: writing efd completes
     * it, which wakes the reaper out of io_getevents (shutdown, fallback flushes). */
    struct iocb wake_iocb;
    bool wake_armed; /* reaper thread only */
    cio_batch_end_fn batch_end;
    void *batch_end_ctx;

    struct cio_req *reqs;               /* [depth] */
    struct io_event *events;            /* [depth], reaper only */
    struct cio_completion *completions; /* [depth], reaper only */
    struct iocb **submit_vec;           /* [depth], under submit_lock */

    pthread_mutex_t lock; /* free list, staged, done, counters below */
    struct cio_req *free_head;
    struct req_list staged;
    struct req_list done; /* finished outside the kernel: submit errors, fdatasync fallback */
    uint32_t inflight;    /* accepted by prep, callback not yet delivered */
    uint32_t in_kernel;   /* handed to io_submit, not yet reaped */
    bool stopping;
    struct cio_engine_stats stats;

    pthread_mutex_t submit_lock; /* serializes io_submit so staged order is kept */
    atomic_bool submit_wanted;   /* staged work exists that the submit_lock holder must pick up */
};

static void list_push(struct req_list *l, struct cio_req *r) {
    r->next = NULL;
    if (l->tail) l->tail->next = r;
    else l->head = r;
    l->tail = r;
    l->count++;
}

static void list_push_front(struct req_list *l, struct cio_req *r) {
    r->next = l->head;
    l->head = r;
    if (l->tail == NULL) l->tail = r;
    l->count++;
}

static struct cio_req *list_pop(struct req_list *l) {
    struct cio_req *r = l->head;
    if (r == NULL) return NULL;
    l->head = r->next;
    if (l->head == NULL) l->tail = NULL;
    l->count--;
    r->next = NULL;
    return r;
}

/* True while this thread is inside cio_engine_reap: what the reap leaves (done
 * requests, events beyond its rounds, staged requests the kernel refused) is
 * handled once at its end, so submits inside it never signal the eventfd (that
 * would spin the owner's loop while the kernel refuses requests). */
static _Thread_local bool in_caller_reap;

/* The engine's own reaper thread (never, for an engine its owner reaps): it
 * submits what callbacks stage after each batch, so it need not be woken. */
static bool on_reaper_thread(const struct cio_engine *e) {
    return e->reaper_started && pthread_equal(pthread_self(), e->reaper);
}

static void wake_reaper(struct cio_engine *e) {
    uint64_t one = 1;
    ssize_t rc;
    do {
        rc = write(e->efd, &one, sizeof one);
    } while (rc < 0 && errno == EINTR);
}

void cio_engine_opts_init(struct cio_engine_opts *opts) {
    memset(opts, 0, sizeof *opts);
    opts->size = sizeof *opts;
    opts->queue_depth = 128;
    opts->reap_batch = 2;
    opts->poll_max_us = CIO_POLL_DEFAULT_US;
}

/* ---------------------------------------------------------------- prep */

static void fill_iocb(const struct cio_engine *e, struct cio_req *r) {
    uint8_t *buf = r->buf + r->done_bytes;
    uint64_t len = r->len - r->done_bytes;
    long long off = (long long)(r->offset + r->done_bytes);
    switch (r->op) {
    case CIO_OP_READ: io_prep_pread(&r->iocb, r->lun->fd, buf, len, off); break;
    case CIO_OP_WRITE:
        io_prep_pwrite(&r->iocb, r->lun->fd, buf, len, off);
        if (r->fua) r->iocb.aio_rw_flags = RWF_DSYNC;
        break;
    default: io_prep_fdsync(&r->iocb, r->lun->fd); break;
    }
    if (e->caller_reaps) io_set_eventfd(&r->iocb, e->efd);
}

static int check_io(const struct cio_lun *lun, const void *buf, uint64_t len, uint64_t offset) {
    uint64_t a = lun->info.logical_block_size;
    if (buf == NULL || len == 0 || ((uintptr_t)buf % a) != 0 || len % a != 0 || offset % a != 0) return -EINVAL;
    if (offset > lun->info.size_bytes || len > lun->info.size_bytes - offset) return -ERANGE;
    if (len > (uint64_t)1 << 31) return -EINVAL; /* one iocb moves at most 2 GiB */
    return 0;
}

static int prep(struct cio_engine *e, struct cio_lun *lun, enum cio_op op, void *buf, uint64_t len, uint64_t offset,
                bool fua, cio_completion_fn cb, void *ctx, uint64_t cookie) {
    if (e == NULL || lun == NULL || cb == NULL) return -EINVAL;
    if (op != CIO_OP_FLUSH) {
        int rc = check_io(lun, buf, len, offset);
        if (rc != 0) return rc;
        if (op == CIO_OP_WRITE && lun->info.read_only) return -EBADF;
    }
    pthread_mutex_lock(&e->lock);
    if (e->stopping) {
        pthread_mutex_unlock(&e->lock);
        return -ESHUTDOWN;
    }
    struct cio_req *r = e->free_head;
    if (r == NULL) {
        pthread_mutex_unlock(&e->lock);
        return -EBUSY;
    }
    e->free_head = r->next;
    e->inflight++;
    r->cb = cb;
    r->ctx = ctx;
    r->cookie = cookie;
    r->lun = lun;
    r->buf = buf;
    r->len = len;
    r->offset = offset;
    r->done_bytes = 0;
    r->result = 0;
    r->op = (uint8_t)op;
    r->fua = fua;
    fill_iocb(e, r);
    list_push(&e->staged, r);
    pthread_mutex_unlock(&e->lock);
    return 0;
}

int cio_engine_prep_read(struct cio_engine *e, struct cio_lun *lun, void *buf, uint64_t len, uint64_t offset,
                         cio_completion_fn cb, void *ctx, uint64_t cookie) {
    return prep(e, lun, CIO_OP_READ, buf, len, offset, false, cb, ctx, cookie);
}

int cio_engine_prep_write(struct cio_engine *e, struct cio_lun *lun, const void *buf, uint64_t len, uint64_t offset,
                          bool fua, cio_completion_fn cb, void *ctx, uint64_t cookie) {
    return prep(e, lun, CIO_OP_WRITE, (void *)buf, len, offset, fua, cb, ctx, cookie);
}

int cio_engine_prep_flush(struct cio_engine *e, struct cio_lun *lun, cio_completion_fn cb, void *ctx,
                          uint64_t cookie) {
    return prep(e, lun, CIO_OP_FLUSH, NULL, 0, 0, false, cb, ctx, cookie);
}

/* -------------------------------------------------------------- submit */

/* A request that finished without the kernel's completion queue. Caller holds e->lock. */
static void finish_outside_kernel(struct cio_engine *e, struct cio_req *r, int64_t result) {
    r->result = result;
    list_push(&e->done, r);
}

/* Flush where the kernel refused IOCB_CMD_FDSYNC: fdatasync covers every write
 * completed before it was issued, which is what a flush promises. */
static int64_t fdatasync_fallback(struct cio_lun *lun) {
    int rc;
    do {
        rc = fdatasync(lun->fd);
    } while (rc != 0 && errno == EINTR);
    return rc == 0 ? 0 : -errno;
}

/* Hands staged requests to the kernel until none are left; caller holds submit_lock.
 * True when the kernel would not take more (the reaper retries). */
static bool submit_staged(struct cio_engine *e, int *total, int *result, bool *wake) {
    for (;;) {
        /* Detach up to depth staged requests; put back what the kernel refuses. */
        pthread_mutex_lock(&e->lock);
        uint32_t n = 0;
        struct cio_req *r;
        while (n < e->depth && (r = list_pop(&e->staged)) != NULL) {
            if (r->op == CIO_OP_FLUSH && atomic_load(&r->lun->fdsync_refused)) {
                /* Run the fallback outside the lock below; mark with a NULL vec entry. */
                pthread_mutex_unlock(&e->lock);
                int64_t res = fdatasync_fallback(r->lun);
                pthread_mutex_lock(&e->lock);
                e->stats.fdsync_fallbacks++;
                finish_outside_kernel(e, r, res);
                *wake = true;
                continue;
            }
            e->submit_vec[n++] = &r->iocb;
        }
        pthread_mutex_unlock(&e->lock);
        if (n == 0) break;

        int rc;
        do {
            rc = io_submit(e->aio, (long)n, e->submit_vec);
        } while (rc == -EINTR);

        pthread_mutex_lock(&e->lock);
        e->stats.submit_calls++;
        uint32_t accepted = rc > 0 ? (uint32_t)rc : 0;
        e->in_kernel += accepted;
        e->stats.submitted += accepted;
        *total += (int)accepted;
        uint32_t first_refused = accepted;
        if (rc < 0 && rc != -EAGAIN) {
            /* The first iocb is bad: finish it with the error (or its flush fallback). */
            struct cio_req *bad = (struct cio_req *)e->submit_vec[0];
            first_refused = 1;
            if (bad->op == CIO_OP_FLUSH && rc == -EINVAL) {
                atomic_store(&bad->lun->fdsync_refused, true);
                pthread_mutex_unlock(&e->lock);
                int64_t res = fdatasync_fallback(bad->lun);
                pthread_mutex_lock(&e->lock);
                e->stats.fdsync_fallbacks++;
                finish_outside_kernel(e, bad, res);
            } else {
                finish_outside_kernel(e, bad, rc);
            }
            *wake = true;
        }
        /* Return the refused tail to the front of staged, keeping order. */
        for (uint32_t i = n; i > first_refused; i--)
            list_push_front(&e->staged, (struct cio_req *)e->submit_vec[i - 1]);
        bool stalled = (rc == -EAGAIN) || (rc >= 0 && accepted < n);
        pthread_mutex_unlock(&e->lock);
        if (stalled) {
            *result = -EAGAIN;
            *wake = true; /* the reaper retries with a bounded backoff */
            return true;
        }
    }
    return false;
}

/* Submission is combining: a thread that finds another one inside io_submit does
 * not wait for it (that cost a futex sleep and wake per I/O between the host's
 * thread and the reaper); it flags its staged work and returns, and the holder
 * picks it up. The holder takes a few extra rounds at most, then leaves what is
 * still flagged to the reaper, so no caller is kept submitting for others.
 * *deferred (optional) tells that another thread had the lock. */
#define CIO_SUBMIT_EXTRA_ROUNDS 4
static int engine_submit(struct cio_engine *e, bool *deferred) {
    int total = 0;
    int result = 0;
    bool wake = false;
    atomic_store(&e->submit_wanted, true);
    atomic_thread_fence(memory_order_seq_cst); /* the flag is visible before we look at the lock */
    for (int round = 0; atomic_load(&e->submit_wanted); round++) {
        if (round > CIO_SUBMIT_EXTRA_ROUNDS) {
            wake = true;
            break;
        }
        if (pthread_mutex_trylock(&e->submit_lock) != 0) { /* the holder will submit ours */
            if (deferred) *deferred = true;
            break;
        }
        atomic_store(&e->submit_wanted, false);
        bool stalled = submit_staged(e, &total, &result, &wake);
        pthread_mutex_unlock(&e->submit_lock);
        /* Pairs with the flag store before a waiter's failed trylock. */
        atomic_thread_fence(memory_order_seq_cst);
        if (stalled) break;
    }
    if (wake && !in_caller_reap && !on_reaper_thread(e)) wake_reaper(e);
    return total > 0 ? total : result;
}

int cio_engine_submit(struct cio_engine *e) { return engine_submit(e, NULL); }

/* -------------------------------------------------------------- reaper */

/* Decide what a reaped event means: finished, or resubmit the rest. Caller holds e->lock. */
static void handle_event(struct cio_engine *e, struct cio_req *r, long res) {
    if (res == -EAGAIN) {
        e->stats.resubmits++;
        fill_iocb(e, r);
        list_push(&e->staged, r);
        return;
    }
    if (res < 0) {
        finish_outside_kernel(e, r, res);
        return;
    }
    if (r->op == CIO_OP_FLUSH) {
        finish_outside_kernel(e, r, 0);
        return;
    }
    uint64_t remaining = r->len - r->done_bytes;
    if ((uint64_t)res >= remaining) {
        finish_outside_kernel(e, r, (int64_t)r->len);
    } else if (res == 0) {
        finish_outside_kernel(e, r, -EIO); /* no progress: the LUN shrank under us */
    } else {
        r->done_bytes += (uint64_t)res;
        e->stats.resubmits++;
        fill_iocb(e, r);
        list_push(&e->staged, r);
    }
}

/* The kernel's completion ring, mapped at the context's address (fs/aio.c,
 * struct aio_ring). Reaping from it directly saves an io_getevents syscall per
 * batch, as fio's userspace_reap does; io_getevents remains the fallback. */
struct cio_aio_ring {
    unsigned id, nr, head, tail, magic, compat_features, incompat_features, header_length;
    struct io_event events[];
};
#define CIO_AIO_RING_MAGIC 0xa10a10a1

static void handle_events(struct cio_engine *e, const struct io_event *events, int n) {
    pthread_mutex_lock(&e->lock);
    e->in_kernel -= (uint32_t)n;
    for (int i = 0; i < n; i++) handle_event(e, (struct cio_req *)events[i].obj, (long)events[i].res);
    pthread_mutex_unlock(&e->lock);
}

/* Copies ready events off the ring; returns how many (0 when empty). */
static int reap_ring(struct cio_engine *e, struct cio_aio_ring *ring) {
    unsigned head = ring->head;
    unsigned tail = __atomic_load_n(&ring->tail, __ATOMIC_ACQUIRE);
    int n = 0;
    while (head != tail && (uint32_t)n < e->reap_batch) {
        e->events[n++] = ring->events[head];
        head = (head + 1) % ring->nr;
    }
    if (n > 0) __atomic_store_n(&ring->head, head, __ATOMIC_RELEASE);
    return n;
}

static void drain_wake_fd(struct cio_engine *e) {
    uint64_t count;
    ssize_t rc;
    do {
        rc = read(e->efd, &count, sizeof count);
    } while (rc < 0 && errno == EINTR);
}

static void arm_wake(struct cio_engine *e) {
    io_prep_poll(&e->wake_iocb, e->efd, POLLIN);
    struct iocb *p = &e->wake_iocb;
    int rc;
    do {
        rc = io_submit(e->aio, 1, &p);
    } while (rc == -EINTR);
    e->wake_armed = rc == 1; /* kernels without IOCB_CMD_POLL: the reaper polls with a timeout instead */
}

/* Reaps at most reap_batch events, from the user-space ring when it has some,
 * else (when `block`) sleeping in io_getevents for at least one, like fio. The
 * reaper then runs their callbacks and submits what they staged before reaping
 * more, so the device queue is refilled while it is still busy. */
static void reap_kernel_events(struct cio_engine *e, bool block, const struct timespec *timeout) {
    bool use_ring = e->ring_usable;
    int n = use_ring ? reap_ring(e, (struct cio_aio_ring *)e->aio) : 0;
    if (n == 0 && (block || !use_ring)) {
        struct timespec now = {0, 0};
        do {
            n = io_getevents(e->aio, block ? 1 : 0, (long)e->reap_batch, e->events,
                             (struct timespec *)(block ? timeout : &now));
        } while (n == -EINTR);
    }
    if (n <= 0) return;
    bool woke = false;
    int kept = 0;
    for (int i = 0; i < n; i++) {
        if (e->events[i].obj == &e->wake_iocb) woke = true;
        else e->events[kept++] = e->events[i];
    }
    if (kept > 0) handle_events(e, e->events, kept);
    if (woke) {
        drain_wake_fd(e);
        e->wake_armed = false;
    }
}

/* Polling before sleeping (QEMU's AioContext polling, Linux's hybrid io_poll and
 * SPDK's pollers do the same): before the reaper sleeps in io_getevents it watches
 * the completion ring for up to poll_max_ns. At low depth the next completion is
 * often microseconds away (the one in the kernel, or the one the host sends as soon
 * as it has its reply), while a sleep costs a thread wake-up, and on a virtual
 * machine waking a halted vCPU costs more than a fast device's I/O: 4k QD1 through
 * NBD on a RAM-backed loop device measured 8.8k IOPS sleeping and 19k polling in one
 * hour, and no gain an hour later at twice the CPU per write, which is why the
 * default budget is 0 (off; `serve --reap-poll-us`). At depth it only takes CPU the submitting threads need (4k
 * QD32 through NBD on 2 cores: fewer IOPS, more CPU per I/O), and completions keep
 * coming anyway, so the reaper polls only with CIO_POLL_MAX_IN_KERNEL requests or
 * fewer in the kernel. Polling that adapts (polls less after polls in vain, or only
 * while completions keep coming) measured no better than sleeping: a round trip is
 * short because the CPUs are kept awake, so once polling stops the misses that
 * stopped it continue. An idle daemon polls once per wake-up, which is rare. */
static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static bool ring_has_events(struct cio_engine *e) {
    struct cio_aio_ring *ring = (struct cio_aio_ring *)e->aio;
    return __atomic_load_n(&ring->head, __ATOMIC_RELAXED) != __atomic_load_n(&ring->tail, __ATOMIC_ACQUIRE);
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* True when the ring has events within the budget (the reaper then reaps without sleeping). */
static bool poll_ring(struct cio_engine *e, uint32_t in_kernel) {
    if (e->poll_max_ns == 0 || !e->ring_usable || in_kernel > CIO_POLL_MAX_IN_KERNEL) return false;
    uint64_t deadline = now_ns() + e->poll_max_ns;
    bool hit = false;
    do {
        if (ring_has_events(e)) {
            hit = true;
            break;
        }
        cpu_relax();
    } while (now_ns() < deadline);
    if (!hit) hit = ring_has_events(e); /* preempted past the deadline: one last look */
    atomic_fetch_add_explicit(hit ? &e->polls_hit : &e->polls_missed, 1, memory_order_relaxed);
    return hit;
}

/* Free every done request first (copying what the callback needs), then call
 * out: a callback may prep into the slots just freed. */
static uint32_t deliver_completions(struct cio_engine *e) {
    pthread_mutex_lock(&e->lock);
    uint32_t n = 0;
    struct cio_req *r;
    while ((r = list_pop(&e->done)) != NULL) {
        e->completions[n++] = (struct cio_completion){r->cb, r->ctx, r->cookie, r->result};
        r->next = e->free_head;
        e->free_head = r;
    }
    pthread_mutex_unlock(&e->lock);
    for (uint32_t i = 0; i < n; i++) {
        struct cio_completion *c = &e->completions[i];
        c->cb(c->ctx, c->cookie, c->result);
    }
    if (n > 0) {
        pthread_mutex_lock(&e->lock);
        e->inflight -= n;
        e->stats.completed += n;
        e->stats.reap_batches++;
        pthread_mutex_unlock(&e->lock);
        if (e->batch_end) e->batch_end(e->batch_end_ctx);
    }
    return n;
}

/* Staged requests the kernel would not take for too long fail with -EAGAIN. */
static void fail_stalled(struct cio_engine *e) {
    pthread_mutex_lock(&e->lock);
    struct cio_req *r;
    while ((r = list_pop(&e->staged)) != NULL) finish_outside_kernel(e, r, -EAGAIN);
    pthread_mutex_unlock(&e->lock);
}

/* Staged requests that the kernel keeps refusing while nothing is in flight fail
 * after CIO_MAX_STALLED_ROUNDS rounds in which nothing moved. Another thread inside
 * io_submit (`deferred`) neither proves progress nor a stall: such a round leaves
 * the count as it is. The lock is taken only when nothing moved. */
static void count_stalls(struct cio_engine *e, uint32_t *stalled_rounds, uint32_t delivered, int submitted,
                         bool deferred) {
    if (deferred) return;
    if (delivered > 0 || submitted > 0) {
        *stalled_rounds = 0;
        return;
    }
    pthread_mutex_lock(&e->lock);
    bool stuck = e->staged.count > 0 && e->in_kernel == 0;
    pthread_mutex_unlock(&e->lock);
    if (!stuck) {
        *stalled_rounds = 0;
    } else if (++*stalled_rounds >= CIO_MAX_STALLED_ROUNDS) {
        fail_stalled(e);
        deliver_completions(e);
        *stalled_rounds = 0;
    }
}

static void *reaper_main(void *arg) {
    struct cio_engine *e = arg;
    uint32_t stalled_rounds = 0;
    for (;;) {
        pthread_mutex_lock(&e->lock);
        bool have_staged = e->staged.count > 0;
        bool have_done = e->done.count > 0;
        bool exit_now = e->stopping && e->inflight == 0;
        uint32_t in_kernel = e->in_kernel;
        pthread_mutex_unlock(&e->lock);
        if (exit_now) break;

        if (!e->wake_armed) arm_wake(e);
        /* Sleep until an event, but only 1 ms while staged requests wait for the
         * kernel, and 10 ms when there is no wake iocb to rely on. */
        struct timespec stall = {0, CIO_STALL_POLL_MS * 1000000L}, fallback = {0, 10000000L};
        const struct timespec *timeout = have_staged ? &stall : (e->wake_armed ? NULL : &fallback);
        /* Done requests are delivered without waiting; else a moment's polling, then sleep. */
        bool block = !have_done && (have_staged || !poll_ring(e, in_kernel));
        reap_kernel_events(e, block, timeout);
        uint32_t delivered = deliver_completions(e);
        bool deferred = false;
        int submitted = engine_submit(e, &deferred);
        count_stalls(e, &stalled_rounds, delivered, submitted, deferred);
    }
    return NULL;
}

/* ------------------------------------------------ reaping by the owner */

/* Rounds of reap, deliver, submit per cio_engine_reap call: enough for a deep
 * queue's completions, few enough that an event loop gets back to its sockets. */
#define CIO_CALLER_REAP_ROUNDS 16

int cio_engine_notify_fd(const struct cio_engine *e) { return e->caller_reaps ? e->efd : -1; }

int cio_engine_reap(struct cio_engine *e, bool *retry_soon) {
    if (retry_soon) *retry_soon = false;
    if (e == NULL || !e->caller_reaps) return -EINVAL;
    if (pthread_mutex_trylock(&e->reap_lock) != 0) return 0; /* destroy is draining it */
    in_caller_reap = true;
    int total = 0;
    bool out_of_rounds = true;
    for (int round = 0; round < CIO_CALLER_REAP_ROUNDS; round++) {
        reap_kernel_events(e, false, NULL);
        uint32_t delivered = deliver_completions(e);
        bool deferred = false;
        int submitted = engine_submit(e, &deferred);
        total += (int)delivered;
        if (delivered == 0 && submitted <= 0) {
            count_stalls(e, &e->stalled_rounds, delivered, submitted, deferred);
            out_of_rounds = false;
            break;
        }
        e->stalled_rounds = 0;
    }
    in_caller_reap = false;
    pthread_mutex_lock(&e->lock);
    bool staged = e->staged.count > 0;
    bool done = e->done.count > 0;
    pthread_mutex_unlock(&e->lock);
    /* Completions left for lack of rounds signalled the fd already and were read
     * with it: signal again so the owner comes back (without a readable ring we
     * cannot see whether the kernel holds more, so running out of rounds is enough). */
    if (done || out_of_rounds || (e->ring_usable && ring_has_events(e))) wake_reaper(e);
    pthread_mutex_unlock(&e->reap_lock);
    if (staged && retry_soon) *retry_soon = true;
    return total;
}

/* Destroy of an engine its owner reaps: deliver what is in flight on this thread. */
static void drain_on_caller(struct cio_engine *e) {
    pthread_mutex_lock(&e->reap_lock);
    uint32_t stalled_rounds = 0;
    for (;;) {
        pthread_mutex_lock(&e->lock);
        bool have_staged = e->staged.count > 0;
        bool have_done = e->done.count > 0;
        bool finished = e->inflight == 0;
        pthread_mutex_unlock(&e->lock);
        if (finished) break;
        struct timespec stall = {0, CIO_STALL_POLL_MS * 1000000L}, idle = {0, 10000000L};
        reap_kernel_events(e, !have_done, have_staged ? &stall : &idle);
        uint32_t delivered = deliver_completions(e);
        int submitted = engine_submit(e, NULL);
        count_stalls(e, &stalled_rounds, delivered, submitted, false);
    }
    pthread_mutex_unlock(&e->reap_lock);
}

static _Thread_local struct cio_engine *thread_engine;

void cio_engine_set_thread_engine(struct cio_engine *e) { thread_engine = e; }

struct cio_engine *cio_engine_thread_engine(void) { return thread_engine; }

/* ----------------------------------------------------------- lifecycle */

static void engine_free(struct cio_engine *e) {
    if (e->efd >= 0) close(e->efd);
    free(e->reqs);
    free(e->events);
    free(e->completions);
    free(e->submit_vec);
    free(e);
}

int cio_engine_create(const struct cio_engine_opts *opts, struct cio_engine **out) {
    if (opts == NULL || out == NULL || opts->size < sizeof(struct cio_engine_opts) || opts->queue_depth == 0 ||
        opts->queue_depth > 65536 || opts->poll_max_us > CIO_POLL_MAX_US)
        return -EINVAL;
    struct cio_engine *e = calloc(1, sizeof *e);
    if (e == NULL) return -ENOMEM;
    e->efd = -1;
    e->depth = opts->queue_depth;
    e->reap_batch = opts->reap_batch == 0 || opts->reap_batch > e->depth ? e->depth : opts->reap_batch;
    e->poll_max_ns = (uint64_t)opts->poll_max_us * 1000u;
    e->caller_reaps = opts->caller_reaps;
    e->batch_end = opts->batch_end;
    e->batch_end_ctx = opts->batch_end_ctx;
    e->reqs = calloc(e->depth, sizeof *e->reqs);
    e->events = calloc(e->depth, sizeof *e->events);
    e->completions = calloc(e->depth, sizeof *e->completions);
    e->submit_vec = calloc(e->depth, sizeof *e->submit_vec);
    if (!e->reqs || !e->events || !e->completions || !e->submit_vec) {
        engine_free(e);
        return -ENOMEM;
    }
    for (uint32_t i = 0; i < e->depth; i++) {
        e->reqs[i].next = (i + 1 < e->depth) ? &e->reqs[i + 1] : NULL;
    }
    e->free_head = &e->reqs[0];
    e->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (e->efd < 0) {
        int err = -errno;
        engine_free(e);
        return err;
    }
    int rc = io_setup((int)e->depth, &e->aio);
    if (rc != 0) {
        engine_free(e);
        return rc;
    }
    struct cio_aio_ring *ring = (struct cio_aio_ring *)e->aio;
    e->ring_usable = ring->magic == CIO_AIO_RING_MAGIC && ring->incompat_features == 0;
    pthread_mutex_init(&e->lock, NULL);
    pthread_mutex_init(&e->submit_lock, NULL);
    pthread_mutex_init(&e->reap_lock, NULL);
    if (!e->caller_reaps) {
        rc = pthread_create(&e->reaper, NULL, reaper_main, e);
        if (rc != 0) {
            io_destroy(e->aio);
            pthread_mutex_destroy(&e->lock);
            pthread_mutex_destroy(&e->submit_lock);
            pthread_mutex_destroy(&e->reap_lock);
            engine_free(e);
            return -rc;
        }
        e->reaper_started = true;
    }
    *out = e;
    return 0;
}

void cio_engine_destroy(struct cio_engine *e) {
    if (e == NULL) return;
    pthread_mutex_lock(&e->lock);
    e->stopping = true;
    pthread_mutex_unlock(&e->lock);
    cio_engine_submit(e); /* anything staged but never submitted still completes */
    if (e->caller_reaps) {
        drain_on_caller(e);
    } else {
        wake_reaper(e);
        if (e->reaper_started) pthread_join(e->reaper, NULL);
    }
    if (thread_engine == e) thread_engine = NULL;
    io_destroy(e->aio);
    pthread_mutex_destroy(&e->lock);
    pthread_mutex_destroy(&e->submit_lock);
    pthread_mutex_destroy(&e->reap_lock);
    engine_free(e);
}

uint32_t cio_engine_queue_depth(const struct cio_engine *e) { return e->depth; }

bool cio_engine_is_reaper_thread(const struct cio_engine *e) { return on_reaper_thread(e); }

uint32_t cio_engine_inflight(struct cio_engine *e) {
    pthread_mutex_lock(&e->lock);
    uint32_t n = e->inflight;
    pthread_mutex_unlock(&e->lock);
    return n;
}

void cio_engine_get_stats(struct cio_engine *e, struct cio_engine_stats *stats) {
    pthread_mutex_lock(&e->lock);
    *stats = e->stats;
    pthread_mutex_unlock(&e->lock);
    stats->polls_hit = atomic_load_explicit(&e->polls_hit, memory_order_relaxed);
    stats->polls_missed = atomic_load_explicit(&e->polls_missed, memory_order_relaxed);
}

_Static_assert(offsetof(struct cio_req, iocb) == 0, "events are mapped back to requests by address");
