// CKVM: the ioctl wrappers are static inlines in include/ckvm.h; this file holds the few
// loops that must be optimized even in debug builds (migration hashes, zero-page checks).
#include "ckvm.h"

static inline uint64_t ckvm_mix(uint64_t h) {
    h ^= h >> 33; h *= 0xff51afd7ed558ccdull; h ^= h >> 33; h *= 0xc4ceb9fe1a85ec53ull; h ^= h >> 33;
    return h;
}
/// The content part of a page hash (independent of where the page is).
static uint64_t ckvm_page_content_hash(const void *page) {
    const uint64_t *w = (const uint64_t *)page;
    uint64_t a = 0x51ed27a3ull, b = 0xc2b2ae3d27d4eb4full, c = 0x9E3779B97F4A7C15ull, d = 0x243f6a8885a308d3ull;
    for (int i = 0; i < 512; i += 4) {
        a = (a ^ w[i]) * 0xff51afd7ed558ccdull; a ^= a >> 29;
        b = (b ^ w[i + 1]) * 0xc4ceb9fe1a85ec53ull; b ^= b >> 31;
        c = (c ^ w[i + 2]) * 0xff51afd7ed558ccdull; c ^= c >> 29;
        d = (d ^ w[i + 3]) * 0xc4ceb9fe1a85ec53ull; d ^= d >> 31;
    }
    return a ^ (b * 0x9E3779B97F4A7C15ull) ^ (c * 0xc2b2ae3d27d4eb4full) ^ (d * 0x165667b19e3779f9ull);
}
static uint64_t ckvm_zero_content_hash_value;
static int ckvm_zero_content_hash_ready;
/// A 64-bit hash of one 4 KiB page and its index (the switch-over hash of guest memory):
/// mix(content hash ^ index * K), so a zero page's hash needs no page (ckvm_page_hash_zero).
uint64_t ckvm_page_hash(const void *page, uint64_t index) {
    return ckvm_mix(ckvm_page_content_hash(page) ^ (index * 0x9E3779B97F4A7C15ull + 0x632be59bd9b4e019ull));
}
/// ckvm_page_hash of an all-zero page at `index`, without reading one.
uint64_t ckvm_page_hash_zero(uint64_t index) {
    if (!__atomic_load_n(&ckvm_zero_content_hash_ready, __ATOMIC_ACQUIRE)) {
        static const uint64_t zero[512];
        __atomic_store_n(&ckvm_zero_content_hash_value, ckvm_page_content_hash(zero), __ATOMIC_RELAXED);
        __atomic_store_n(&ckvm_zero_content_hash_ready, 1, __ATOMIC_RELEASE);
    }
    return ckvm_mix(__atomic_load_n(&ckvm_zero_content_hash_value, __ATOMIC_RELAXED) ^ (index * 0x9E3779B97F4A7C15ull + 0x632be59bd9b4e019ull));
}
size_t ckvm_count_nonzero_hashes(const uint64_t *hashes, size_t n, uint64_t first) {
    size_t count = 0;
    for (size_t i = 0; i < n; i++) count += hashes[i] != ckvm_page_hash_zero(first + i);
    return count;
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
