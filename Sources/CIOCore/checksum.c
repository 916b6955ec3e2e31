/* checksum.c — ISA-L crc32c / crc64 wrapped once, with lengths that cannot overflow its int. */
#include "cio_internal.h"

#include <errno.h>
#include <isa-l/crc.h>
#include <isa-l/crc64.h>

/* crc32_iscsi(buf, int len, init) runs the raw register: standard CRC32C is
 * init ~0 and a final xor ~0. Continuing from a previous result undoes the xor. */
uint32_t cio_crc32c(const void *buf, uint64_t len, uint32_t seed) {
    const unsigned char *p = buf;
    uint32_t crc = ~seed;
    while (len > 0) {
        uint64_t n = len < CIO_MAX_INT_CHUNK ? len : CIO_MAX_INT_CHUNK;
        crc = crc32_iscsi((unsigned char *)p, (int)n, crc);
        p += n;
        len -= n;
    }
    return ~crc;
}

int cio_crc32c_blocks(const void *buf, uint64_t len, uint32_t block_size, uint32_t *out) {
    if (buf == NULL || out == NULL || block_size == 0 || block_size > CIO_MAX_INT_CHUNK || len == 0 ||
        len % block_size != 0)
        return -EINVAL;
    const unsigned char *p = buf;
    uint64_t blocks = len / block_size;
    for (uint64_t i = 0; i < blocks; i++, p += block_size)
        out[i] = ~crc32_iscsi((unsigned char *)p, (int)block_size, 0xFFFFFFFFu);
    return 0;
}

int cio_crc32c_verify(const void *buf, uint64_t len, uint32_t block_size, const uint32_t *expected,
                      uint64_t *first_bad) {
    if (buf == NULL || expected == NULL || first_bad == NULL || block_size == 0 ||
        block_size > CIO_MAX_INT_CHUNK || len == 0 || len % block_size != 0)
        return -EINVAL;
    const unsigned char *p = buf;
    uint64_t blocks = len / block_size;
    *first_bad = UINT64_MAX;
    for (uint64_t i = 0; i < blocks; i++, p += block_size) {
        if (~crc32_iscsi((unsigned char *)p, (int)block_size, 0xFFFFFFFFu) != expected[i]) {
            *first_bad = i;
            break;
        }
    }
    return 0;
}

/* crc64_ecma_refl applies init/xorout ~seed internally: a seed of 0 gives CRC-64/XZ. */
uint64_t cio_crc64(const void *buf, uint64_t len, uint64_t seed) {
    const unsigned char *p = buf;
    uint64_t crc = seed;
    while (len > 0) {
        uint64_t n = len < CIO_MAX_INT_CHUNK ? len : CIO_MAX_INT_CHUNK;
        crc = crc64_ecma_refl(crc, p, n);
        p += n;
        len -= n;
    }
    return crc;
}
