// The PRNG of MemVirt in C, for the guest runtime: the same numbers as
// Sources/MemVirtCore/Random.swift (`SplitMix64`, `bounded`, `derive`).
//
//     state += 0x9E3779B97F4A7C15
//     z = state
//     z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
//     z = (z ^ (z >> 27)) * 0x94D049BB133111EB
//     return z ^ (z >> 31)
//
// bounded(n) is Lemire's multiply-shift: the high 64 bits of next() * n. The 64x64->128
// multiply is written as `mulq` so no compiler (at any -O) calls a runtime helper: guest
// code must not leave its image.
#pragma once
#include <stdint.h>

#define MEMVIRT_INLINE static inline __attribute__((always_inline))

MEMVIRT_INLINE uint64_t memvirt_splitmix64_next(uint64_t *state) {
    *state += 0x9E3779B97F4A7C15ull;
    uint64_t z = *state;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/// High 64 bits of a * b.
MEMVIRT_INLINE uint64_t memvirt_mulhi(uint64_t a, uint64_t b) {
    uint64_t lo, hi;
    __asm__("mulq %3" : "=a"(lo), "=d"(hi) : "a"(a), "r"(b) : "cc");
    (void)lo;
    return hi;
}

/// A number in 0..<n (n > 0).
MEMVIRT_INLINE uint64_t memvirt_bounded(uint64_t *state, uint64_t n) {
    return memvirt_mulhi(memvirt_splitmix64_next(state), n);
}

/// The seed of sub-stream `stream`: one step from seed ^ (stream * 0xD1B54A32D192ED03).
MEMVIRT_INLINE uint64_t memvirt_derive(uint64_t seed, uint64_t stream) {
    uint64_t s = seed ^ (stream * 0xD1B54A32D192ED03ull);
    return memvirt_splitmix64_next(&s);
}
