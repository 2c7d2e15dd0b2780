// CKVM: the ioctl wrappers are static inlines in include/ckvm.h; this file holds the few
// loops that must be optimized even in debug builds (migration hashes, zero-page checks).
#include "ckvm.h"

/// A 64-bit hash of one 4 KiB page and its index (the switch-over hash of guest memory).
uint64_t ckvm_page_hash(const void *page, uint64_t index) {
    const uint64_t *w = (const uint64_t *)page;
    uint64_t a = index * 0x9E3779B97F4A7C15ull ^ 0x51ed27a3ull, b = a ^ 0xc2b2ae3d27d4eb4full;
    for (int i = 0; i < 512; i += 2) {
        a = (a ^ w[i]) * 0xff51afd7ed558ccdull; a ^= a >> 29;
        b = (b ^ w[i + 1]) * 0xc4ceb9fe1a85ec53ull; b ^= b >> 31;
    }
    uint64_t h = a ^ (b * 0x9E3779B97F4A7C15ull);
    return h ^ (h >> 33);
}
/// A 64-bit checksum of `n` bytes (a stream message's payload).
uint64_t ckvm_checksum(const void *p, size_t n) {
    const unsigned char *c = (const unsigned char *)p;
    uint64_t a = 0x243f6a8885a308d3ull ^ n, b = 0x13198a2e03707344ull;
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        uint64_t x, y;
        __builtin_memcpy(&x, c + i, 8); __builtin_memcpy(&y, c + i + 8, 8);
        a = (a ^ x) * 0xff51afd7ed558ccdull; a ^= a >> 29;
        b = (b ^ y) * 0xc4ceb9fe1a85ec53ull; b ^= b >> 31;
    }
    for (; i < n; i++) { a = (a ^ c[i]) * 0x100000001b3ull; }
    uint64_t h = a ^ (b * 0x9E3779B97F4A7C15ull);
    return h ^ (h >> 33);
}
/// 1 when the 4 KiB page is all zero bytes.
int ckvm_page_is_zero(const void *page) {
    const uint64_t *w = (const uint64_t *)page;
    uint64_t acc = 0;
    for (int i = 0; i < 512; i++) acc |= w[i];
    return acc == 0;
}
