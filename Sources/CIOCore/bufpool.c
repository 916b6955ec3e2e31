/* bufpool.c — aligned buffers carved from one allocation; a free stack, no per-I/O malloc. */
#include "cio_internal.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

struct cio_bufpool {
    pthread_mutex_t lock;
    uint8_t *base;
    size_t buf_size;
    uint32_t count;
    uint32_t free_top;   /* number of entries in free_stack */
    uint32_t *free_stack;
    uint8_t *in_use;     /* 1 while handed out: catches double put */
};

static bool is_pow2(size_t v) { return v != 0 && (v & (v - 1)) == 0; }

int cio_aligned_alloc(size_t size, size_t alignment, void **out) {
    if (out == NULL || size == 0 || !is_pow2(alignment) || alignment < sizeof(void *)) return -EINVAL;
    void *p = NULL;
    int rc = posix_memalign(&p, alignment, size);
    if (rc != 0) return -rc;
    *out = p;
    return 0;
}

void cio_aligned_free(void *p) { free(p); }

int cio_bufpool_create(size_t buf_size, uint32_t count, size_t alignment, struct cio_bufpool **out) {
    if (out == NULL || count == 0 || !is_pow2(alignment) || alignment < 512 || buf_size == 0 ||
        buf_size % alignment != 0)
        return -EINVAL;
    if (buf_size > SIZE_MAX / count) return -EOVERFLOW;
    struct cio_bufpool *pool = calloc(1, sizeof *pool);
    if (pool == NULL) return -ENOMEM;
    pool->free_stack = calloc(count, sizeof(uint32_t));
    pool->in_use = calloc(count, 1);
    void *base = NULL;
    int rc = (pool->free_stack && pool->in_use) ? posix_memalign(&base, alignment, buf_size * count) : ENOMEM;
    if (rc != 0) {
        free(pool->free_stack);
        free(pool->in_use);
        free(pool);
        return -rc;
    }
    pthread_mutex_init(&pool->lock, NULL);
    pool->base = base;
    pool->buf_size = buf_size;
    pool->count = count;
    /* Lowest index on top so buffers are handed out in address order. */
    for (uint32_t i = 0; i < count; i++) pool->free_stack[i] = count - 1 - i;
    pool->free_top = count;
    *out = pool;
    return 0;
}

void cio_bufpool_destroy(struct cio_bufpool *pool) {
    if (pool == NULL) return;
    pthread_mutex_destroy(&pool->lock);
    free(pool->base);
    free(pool->free_stack);
    free(pool->in_use);
    free(pool);
}

int cio_bufpool_get(struct cio_bufpool *pool, uint32_t *index, void **data) {
    pthread_mutex_lock(&pool->lock);
    if (pool->free_top == 0) {
        pthread_mutex_unlock(&pool->lock);
        return -ENOBUFS;
    }
    uint32_t i = pool->free_stack[--pool->free_top];
    pool->in_use[i] = 1;
    pthread_mutex_unlock(&pool->lock);
    *index = i;
    *data = pool->base + (size_t)i * pool->buf_size;
    return 0;
}

int cio_bufpool_put(struct cio_bufpool *pool, uint32_t index) {
    if (index >= pool->count) return -EINVAL;
    pthread_mutex_lock(&pool->lock);
    if (!pool->in_use[index]) {
        pthread_mutex_unlock(&pool->lock);
        return -EINVAL;
    }
    pool->in_use[index] = 0;
    pool->free_stack[pool->free_top++] = index;
    pthread_mutex_unlock(&pool->lock);
    return 0;
}

void *cio_bufpool_data(const struct cio_bufpool *pool, uint32_t index) {
    if (index >= pool->count) return NULL;
    return pool->base + (size_t)index * pool->buf_size;
}

size_t cio_bufpool_buf_size(const struct cio_bufpool *pool) { return pool->buf_size; }
uint32_t cio_bufpool_count(const struct cio_bufpool *pool) { return pool->count; }

uint32_t cio_bufpool_free_count(struct cio_bufpool *pool) {
    pthread_mutex_lock(&pool->lock);
    uint32_t n = pool->free_top;
    pthread_mutex_unlock(&pool->lock);
    return n;
}
