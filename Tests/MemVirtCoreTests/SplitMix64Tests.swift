import MemVirtCore
import Testing

// SplitMix64 against Vigna's splitmix64.c: published outputs and an independent
// implementation (Oracles.swift); multiply-shift range reduction against a 32-bit-limb
// 128-bit product; sub-stream derivation.

@Suite("SplitMix64")
struct SplitMix64Tests {

    @Test("seed 0 gives splitmix64.c's first outputs")
    func referenceOutputsSeed0() {
        var g = SplitMix64(seed: 0)
        #expect(g.next() == 0xE220_A839_7B1D_CDAF)
        #expect(g.next() == 0x6E78_9E6A_A1B9_65F4)
        #expect(g.next() == 0x06C4_5D18_8009_454F)
    }

    @Test("seed 1 gives splitmix64.c's first outputs (computed with gcc from the C source)")
    func referenceOutputsSeed1() {
        var g = SplitMix64(seed: 1)
        #expect(g.next() == 0x910A_2DEC_8902_5CC1)
        #expect(g.next() == 0xBEEB_8DA1_658E_EC67)
        #expect(g.next() == 0xF893_A2EE_FB32_555E)
    }

    @Test(
        "10,000 outputs match an independent implementation",
        arguments: [0, 1, 42, 0xDEAD_BEEF, 0x8000_0000_0000_0000, UInt64.max] as [UInt64]
    )
    func matchesReference(seed: UInt64) {
        var g = SplitMix64(seed: seed)
        var r = ReferenceSplitMix64(seed: seed)
        var mismatches = 0
        for _ in 0..<10_000 where g.next() != r.next() { mismatches += 1 }
        #expect(mismatches == 0)
        // The state is the public seed plus i golden-ratio steps.
        #expect(g.state == seed &+ 10_000 &* 0x9E37_79B9_7F4A_7C15)
    }

    @Test("the independent 128-bit product helper is right on hand-checked values")
    func mulHighOracle() {
        #expect(mulHigh(UInt64.max, UInt64.max) == 0xFFFF_FFFF_FFFF_FFFE)
        #expect(mulHigh(1 << 63, 2) == 1)
        #expect(mulHigh(1 << 32, 1 << 32) == 1)
        #expect(mulHigh(0xFFFF_FFFF, 0xFFFF_FFFF) == 0)
        #expect(mulHigh(0x1_0000_0001, 0xFFFF_FFFF_0000_0000) == 0xFFFF_FFFF)
    }

    @Test(
        "bounded(n) is < n and equals the high 64 bits of next() * n",
        arguments: [1, 2, 3, 7, 512, 1000, 8_388_608, (1 << 32) + 1, 0xFFFF_FFFF_FFFF, 1 << 63, UInt64.max] as [UInt64]
    )
    func boundedIsMultiplyShift(n: UInt64) {
        var g = SplitMix64(seed: n ^ 0x5EED)
        var r = ReferenceSplitMix64(seed: n ^ 0x5EED)
        var outOfRange = 0
        var mismatches = 0
        for _ in 0..<10_000 {
            let v = g.bounded(n)
            if v >= n { outOfRange += 1 }
            if v != mulHigh(r.next(), n) { mismatches += 1 }
        }
        #expect(outOfRange == 0)
        #expect(mismatches == 0)
    }

    @Test("bounded(1000) from seed 0x0123456789ABCDEF gives the C reference values 83, 833, 185")
    func boundedReference() {
        // (uint64_t)(((unsigned __int128)next() * 1000) >> 64), computed with gcc.
        var g = SplitMix64(seed: 0x0123_4567_89AB_CDEF)
        #expect([g.bounded(1000), g.bounded(1000), g.bounded(1000)] == [83, 833, 185])
    }

    @Test("bounded(n) covers 0..<n about evenly")
    func boundedCovers() {
        var g = SplitMix64(seed: 3)
        var counts = [Int](repeating: 0, count: 10)
        for _ in 0..<100_000 { counts[Int(g.bounded(10))] += 1 }
        // Expect 10,000 each; 5 sigma is about 475.
        for c in counts { #expect(abs(c - 10_000) < 500, "\(counts)") }
    }

    @Test("unitDouble is the top 53 bits times 2^-53, in [0, 1)")
    func unitDouble() {
        var g = SplitMix64(seed: 9)
        var r = ReferenceSplitMix64(seed: 9)
        for _ in 0..<10_000 {
            let u = g.unitDouble()
            #expect(u >= 0 && u < 1)
            #expect(u == r.unitDouble())
        }
    }

    @Test("derive(seed, stream) is one step from seed ^ (stream * 0xD1B54A32D192ED03)")
    func deriveFormula() {
        #expect(SplitMix64.derive(seed: 0, stream: 0) == 0xE220_A839_7B1D_CDAF)
        for (seed, stream) in [(1, 0), (1, 1), (42, 7), (UInt64.max, 1023)] as [(UInt64, UInt64)] {
            let mixed = seed ^ stream.multipliedReportingOverflow(by: 0xD1B5_4A32_D192_ED03).partialValue
            var r = ReferenceSplitMix64(seed: mixed)
            #expect(SplitMix64.derive(seed: seed, stream: stream) == r.next())
        }
    }

    @Test("derived streams differ from each other and do not share early outputs")
    func derivedStreamsDiffer() {
        for seed: UInt64 in [0, 1, 12345] {
            let seeds = (0..<256).map { SplitMix64.derive(seed: seed, stream: UInt64($0)) }
            #expect(Set(seeds).count == 256)
            var seen = Set<UInt64>()
            for s in seeds.prefix(16) {
                var g = SplitMix64(seed: s)
                for _ in 0..<1000 { seen.insert(g.next()) }
            }
            #expect(seen.count == 16 * 1000)
        }
        #expect(SplitMix64.derive(seed: 1, stream: 0) != SplitMix64.derive(seed: 2, stream: 0))
    }

    @Test("works as a RandomNumberGenerator: the same seed gives the same shuffle")
    func randomNumberGenerator() {
        var a = SplitMix64(seed: 5)
        var b = SplitMix64(seed: 5)
        #expect(Array(0..<100).shuffled(using: &a) == Array(0..<100).shuffled(using: &b))
    }
}
