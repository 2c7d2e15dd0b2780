/// The one pseudo-random number generator of MemVirt: SplitMix64 (Steele, Lea and Flood,
/// "Fast splittable pseudorandom number generators", OOPSLA 2014; the constants are those of
/// Java's SplittableRandom and of Vigna's public-domain splitmix64.c).
///
/// Both engines draw the same numbers: the model in Swift, the KVM guest runtime in C
/// (`Guest/include/memvirt_prng.h`). The exact algorithm, so anyone can reproduce it:
///
///     state += 0x9E3779B97F4A7C15
///     z = state
///     z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
///     z = (z ^ (z >> 27)) * 0x94D049BB133111EB
///     return z ^ (z >> 31)
///
/// Range reduction is Lemire's multiply-shift (no division, no modulo bias worth measuring
/// for n far below 2^64): `bounded(n) = high 64 bits of (next() * n)`, i.e. in C
/// `(uint64_t)(((unsigned __int128)next() * n) >> 64)`.
public struct SplitMix64: RandomNumberGenerator, Sendable, Hashable {
    public var state: UInt64

    @inlinable public init(seed: UInt64) { state = seed }

    @inlinable public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// A number in 0..<n by multiply-shift (n > 0).
    @inlinable public mutating func bounded(_ n: UInt64) -> UInt64 {
        next().multipliedFullWidth(by: n).high
    }

    /// A double in [0, 1): the top 53 bits of `next()` times 2^-53.
    @inlinable public mutating func unitDouble() -> Double {
        Double(next() >> 11) * 0x1.0p-53
    }

    /// The seed of sub-stream `stream` (a thread) of `seed`: one SplitMix64 step from
    /// `seed ^ (stream * 0xD1B54A32D192ED03)`, so streams 0, 1, 2... are unrelated.
    @inlinable public static func derive(seed: UInt64, stream: UInt64) -> UInt64 {
        var g = SplitMix64(seed: seed ^ (stream &* 0xD1B5_4A32_D192_ED03))
        return g.next()
    }
}
