// Independent reference implementations the MemVirtCore tests compare against. Each is
// written from the published definition (splitmix64.c, the SDM, the WorkloadSpec doc comment),
// deliberately not in the same way as the code under test, and shares no code with it.

/// Vigna's splitmix64.c, with wrapping arithmetic spelled through the reporting-overflow API
/// instead of the `&+`/`&*` operators the production code uses.
struct ReferenceSplitMix64 {
    var x: UInt64
    init(seed: UInt64) { x = seed }
    mutating func next() -> UInt64 {
        x = x.addingReportingOverflow(0x9E37_79B9_7F4A_7C15).partialValue
        var z = x
        z ^= z >> 30
        z = z.multipliedReportingOverflow(by: 0xBF58_476D_1CE4_E5B9).partialValue
        z ^= z >> 27
        z = z.multipliedReportingOverflow(by: 0x94D0_49BB_1331_11EB).partialValue
        z ^= z >> 31
        return z
    }
    /// Multiply-shift range reduction: the high 64 bits of the 128-bit product.
    mutating func bounded(_ n: UInt64) -> UInt64 { mulHigh(next(), n) }
    mutating func unitDouble() -> Double { Double(next() >> 11) / 9_007_199_254_740_992.0 }
}

/// The high 64 bits of the 128-bit product a * b, by schoolbook multiplication on 32-bit
/// limbs (no `multipliedFullWidth`).
func mulHigh(_ a: UInt64, _ b: UInt64) -> UInt64 {
    let aLo = a & 0xFFFF_FFFF, aHi = a >> 32
    let bLo = b & 0xFFFF_FFFF, bHi = b >> 32
    let ll = aLo * bLo, lh = aLo * bHi, hl = aHi * bLo, hh = aHi * bHi
    let mid = (ll >> 32) + (lh & 0xFFFF_FFFF) + (hl & 0xFFFF_FFFF)
    return hh + (lh >> 32) + (hl >> 32) + (mid >> 32)
}

/// A mask with bits lo...hi set, built bit by bit.
func bits(_ lo: Int, _ hi: Int) -> UInt64 {
    var m: UInt64 = 0
    for b in lo...hi { m |= 1 << UInt64(b) }
    return m
}
func bit(_ b: Int) -> UInt64 { 1 << UInt64(b) }
