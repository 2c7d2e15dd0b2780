/// 64-bit FNV-1a (Fowler, Noll, Vo): the one definition of its offset basis and prime. The
/// engines hash guest memory word by word with it (page checksums, whole-memory hashes, KSM
/// content keys); sweeps hash scenario text byte by byte for point IDs.
public enum FNV1a {
    public static let offsetBasis: UInt64 = 0xCBF2_9CE4_8422_2325
    public static let prime: UInt64 = 0x0000_0100_0000_01B3

    /// One step: `h` xor `value`, times the prime.
    @inline(__always) public static func step(_ h: UInt64, _ value: UInt64) -> UInt64 { (h ^ value) &* prime }

    /// FNV-1a over bytes.
    public static func hash<S: Sequence>(bytes: S) -> UInt64 where S.Element == UInt8 {
        var h = offsetBasis
        for b in bytes { h = step(h, UInt64(b)) }
        return h
    }
}
