/* compress.c — ISA-L igzip, gzip-framed so decompression checks CRC32 and length. */
#include "cio_internal.h"

#include <errno.h>
#include <isa-l/igzip_lib.h>
#include <stdlib.h>
#include <string.h>

#define CIO_MAX_COMPRESS_INPUT ((uint64_t)1 << 31) /* ISA-L keeps lengths in uint32 */

static const uint32_t level_buf_sizes[4] = {
    0, ISAL_DEF_LVL1_DEFAULT, ISAL_DEF_LVL2_DEFAULT, ISAL_DEF_LVL3_DEFAULT};

uint64_t cio_compress_bound(uint64_t in_len) {
    /* Stored blocks cost 5 bytes per 64 KiB; gzip header + trailer ≈ 18; keep slack. */
    return in_len + (in_len / 16384 + 1) * 5 + 64;
}

int cio_compress(int level, const void *in, uint64_t in_len, void *out, uint64_t out_cap, uint64_t *out_len) {
    if (level < 0 || level > 3 || in == NULL || out == NULL || out_len == NULL ||
        in_len > CIO_MAX_COMPRESS_INPUT || out_cap > UINT32_MAX)
        return -EINVAL;
    uint8_t *level_buf = NULL;
    if (level_buf_sizes[level] > 0) {
        level_buf = malloc(level_buf_sizes[level]);
        if (level_buf == NULL) return -ENOMEM;
    }
    struct isal_zstream stream;
    isal_deflate_stateless_init(&stream);
    stream.level = (uint32_t)level;
    stream.level_buf = level_buf;
    stream.level_buf_size = level_buf_sizes[level];
    stream.gzip_flag = IGZIP_GZIP;
    stream.end_of_stream = 1;
    stream.flush = NO_FLUSH;
    stream.next_in = (uint8_t *)in;
    stream.avail_in = (uint32_t)in_len;
    stream.next_out = out;
    stream.avail_out = (uint32_t)out_cap;
    int rc = isal_deflate_stateless(&stream);
    free(level_buf);
    if (rc == STATELESS_OVERFLOW) return -ENOSPC;
    if (rc != COMP_OK) return -EINVAL;
    *out_len = stream.total_out;
    return 0;
}

int cio_decompress(const void *in, uint64_t in_len, void *out, uint64_t out_cap, uint64_t *out_len) {
    if (in == NULL || out == NULL || out_len == NULL || in_len > UINT32_MAX) return -EINVAL;
    if (out_cap > UINT32_MAX) out_cap = UINT32_MAX;
    struct inflate_state *state = malloc(sizeof *state);
    if (state == NULL) return -ENOMEM;
    isal_inflate_init(state);
    state->crc_flag = ISAL_GZIP; /* parse the gzip header and verify the trailer's CRC32 and size */
    state->next_in = (uint8_t *)in;
    state->avail_in = (uint32_t)in_len;
    state->next_out = out;
    state->avail_out = (uint32_t)out_cap;
    int rc = isal_inflate(state);
    int result;
    if (rc == ISAL_OUT_OVERFLOW) {
        result = -ENOSPC;
    } else if (rc != ISAL_DECOMP_OK) {
        result = -EBADMSG;
    } else if (state->block_state != ISAL_BLOCK_FINISH) {
        /* Ran out of input (truncated) or of output before the end of the stream. */
        result = state->avail_out == 0 ? -ENOSPC : -EBADMSG;
    } else {
        *out_len = state->total_out;
        result = 0;
    }
    free(state);
    return result;
}
