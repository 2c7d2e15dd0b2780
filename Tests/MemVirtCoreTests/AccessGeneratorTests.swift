#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import MemVirtCore
import Testing

// AccessGenerator: determinism per seed, the documented stream of every pattern (re-derived
// here from the WorkloadSpec doc comment with the independent SplitMix64 in Oracles.swift, as
// the KVM guest runtime will), and the statistical shape (zipf, write ratio).

@Suite("AccessGenerator")
struct AccessGeneratorTests {
    static let base: UInt64 = 0x0000_0040_0000_0000

    static func spec(
        _ pattern: WorkloadSpec.Pattern, footprint: ByteCount = .mib(64), writeRatio: Double = 0, seed: UInt64 = 1
    ) -> WorkloadSpec {
        WorkloadSpec(pattern: pattern, footprint: footprint, accesses: 100_000, writeRatio: writeRatio, seed: seed)
    }

    static func take(_ n: Int, _ spec: WorkloadSpec, thread: Int = 0) throws -> [Access] {
        var g = try AccessGenerator(spec: spec, thread: thread)
        return (0..<n).map { _ in g.next() }
    }

    static let patterns: [WorkloadSpec.Pattern] = [
        .sequential, .strided(stride: 4096), .uniform, .zipf(theta: 0.99), .chase, .gups,
    ]

    // MARK: Determinism

    @Test("the same seed gives the same first 10,000 accesses", arguments: patterns)
    func deterministic(pattern: WorkloadSpec.Pattern) throws {
        let spec = Self.spec(pattern, writeRatio: 0.3, seed: 77)
        #expect(try Self.take(10_000, spec) == Self.take(10_000, spec))
    }

    @Test("a different seed or thread gives a different stream", arguments: patterns)
    func differentSeedDiffers(pattern: WorkloadSpec.Pattern) throws {
        // With writes drawn at random, even sequential and strided streams differ in kind.
        let a = try Self.take(10_000, Self.spec(pattern, writeRatio: 0.3, seed: 77))
        let b = try Self.take(10_000, Self.spec(pattern, writeRatio: 0.3, seed: 78))
        let t1 = try Self.take(10_000, Self.spec(pattern, writeRatio: 0.3, seed: 77), thread: 1)
        #expect(a != b)
        #expect(a != t1)
        if pattern != .sequential, pattern != .strided(stride: 4096) {
            let addrsA = a.map(\.address), addrsB = b.map(\.address)
            let same = zip(addrsA, addrsB).filter { $0 == $1 }.count
            #expect(same < 1_000, "\(same) of 10,000 addresses equal across seeds")
        }
    }

    @Test("every access is 8 bytes, 8-byte aligned and inside [base, base + footprint)", arguments: patterns)
    func insideFootprint(pattern: WorkloadSpec.Pattern) throws {
        let footprint = ByteCount.kib(4 * 37)  // 37 pages: not a power of two
        var bad = 0
        for a in try Self.take(100_000, Self.spec(pattern, footprint: footprint, writeRatio: 0.5)) {
            let off = a.address.rawValue &- Self.base
            if a.address.rawValue < Self.base || off >= footprint.rawValue || off % 8 != 0 || a.size != 8 { bad += 1 }
        }
        #expect(bad == 0)
    }

    // MARK: The documented stream of each pattern

    @Test("sequential: access i is at (i * 64) mod footprint")
    func sequentialFormula() throws {
        let footprint: UInt64 = 3 * 4096
        let got = try Self.take(2_000, Self.spec(.sequential, footprint: ByteCount(footprint)))
        for (i, a) in got.enumerated() {
            #expect(a.address.rawValue == Self.base + (UInt64(i) * 64) % footprint)
            #expect(a.kind == .read)
        }
    }

    @Test("strided: access i is at (i * stride) mod footprint", arguments: [8, 4096, 4104, 2 << 20] as [UInt64])
    func stridedFormula(stride: UInt64) throws {
        let footprint: UInt64 = 5 * 4096
        let got = try Self.take(3_000, Self.spec(.strided(stride: stride), footprint: ByteCount(footprint)))
        var bad = 0
        for (i, a) in got.enumerated() where a.address.rawValue != Self.base + (UInt64(i) * stride) % footprint { bad += 1 }
        #expect(bad == 0)
    }

    @Test("uniform with write ratio 0.3: bounded(footprint/8)*8, then write iff next() < 0.3 * 2^64")
    func uniformDocumentedStream() throws {
        let footprint: UInt64 = 64 << 20
        let seed: UInt64 = 1234
        let got = try Self.take(10_000, Self.spec(.uniform, footprint: ByteCount(footprint), writeRatio: 0.3, seed: seed))
        var r = ReferenceSplitMix64(seed: Self.derivedSeed(seed, thread: 0))
        let threshold = UInt64(0.3 * 18_446_744_073_709_551_616.0)
        var bad = 0
        for a in got {
            let offset = r.bounded(footprint / 8) * 8
            let kind: AccessKind = r.next() < threshold ? .write : .read
            if a != Access(address: GuestVirtualAddress(rawValue: Self.base + offset), kind: kind, size: 8) { bad += 1 }
        }
        #expect(bad == 0)
    }

    @Test("gups: the uniform addresses, every access a write, and no write draw")
    func gupsDocumentedStream() throws {
        let footprint: UInt64 = 16 << 20
        for ratio in [0.0, 0.3, 1.0] {
            let got = try Self.take(10_000, Self.spec(.gups, footprint: ByteCount(footprint), writeRatio: ratio, seed: 9))
            var r = ReferenceSplitMix64(seed: Self.derivedSeed(9, thread: 0))
            var bad = 0
            for a in got where a != Access(address: GuestVirtualAddress(rawValue: Self.base + r.bounded(footprint / 8) * 8), kind: .write) {
                bad += 1
            }
            #expect(bad == 0, "write ratio \(ratio)")
        }
    }

    @Test("zipf: page = first CDF entry >= unitDouble(), then word bounded(512)")
    func zipfDocumentedStream() throws {
        let pages = 64
        let table = ZipfTable(items: pages, theta: 0.99)
        let got = try Self.take(5_000, Self.spec(.zipf(theta: 0.99), footprint: ByteCount(UInt64(pages) * 4096), seed: 5))
        var r = ReferenceSplitMix64(seed: Self.derivedSeed(5, thread: 0))
        var bad = 0
        for a in got {
            let u = r.unitDouble()
            let page = UInt64(table.cdf.firstIndex { $0 >= u }!)  // linear search, not sample()
            let offset = page * 4096 + r.bounded(512) * 8
            if a.address.rawValue != Self.base + offset || a.kind != .read { bad += 1 }
        }
        #expect(bad == 0)
    }

    @Test("chase: Sattolo (j = bounded(i), i = n-1...1) over the 64-byte slots, visited from slot 0")
    func chaseDocumentedStream() throws {
        let footprint: UInt64 = 8 * 4096
        let n = Int(footprint / 64)
        let got = try Self.take(3 * n, Self.spec(.chase, footprint: ByteCount(footprint), writeRatio: 0.3, seed: 3))
        // Reference: the Sattolo shuffle of 0..<n; the chase visits the shuffled sequence as a
        // ring, starting where slot 0 sits. Write draws follow the shuffle's draws.
        var r = ReferenceSplitMix64(seed: Self.derivedSeed(3, thread: 0))
        var seq = Array(0..<n)
        for i in stride(from: n - 1, to: 0, by: -1) { seq.swapAt(i, Int(r.bounded(UInt64(i)))) }
        let start = seq.firstIndex(of: 0)!
        let threshold = UInt64(0.3 * 18_446_744_073_709_551_616.0)
        var bad = 0
        for (k, a) in got.enumerated() {
            let slot = UInt64(seq[(start + k) % n])
            let kind: AccessKind = r.next() < threshold ? .write : .read
            if a != Access(address: GuestVirtualAddress(rawValue: Self.base + slot * 64), kind: kind) { bad += 1 }
        }
        #expect(bad == 0)
    }

    static func derivedSeed(_ seed: UInt64, thread: UInt64) -> UInt64 {
        var r = ReferenceSplitMix64(seed: seed ^ thread.multipliedReportingOverflow(by: 0xD1B5_4A32_D192_ED03).partialValue)
        return r.next()
    }

    // MARK: Chase

    @Test("chase visits every 64-byte slot exactly once per cycle", arguments: [1, 2, 64, 1000] as [UInt64])
    func chaseSingleCycle(pages: UInt64) throws {
        let footprint = pages * 4096
        let n = Int(footprint / 64)
        var g = try AccessGenerator(spec: Self.spec(.chase, footprint: ByteCount(footprint), seed: pages))
        for cycle in 0..<2 {
            var seen = [Bool](repeating: false, count: n)
            var repeats = 0
            for _ in 0..<n {
                let slot = Int((g.next().address.rawValue - Self.base) / 64)
                if seen[slot] { repeats += 1 }
                seen[slot] = true
            }
            #expect(repeats == 0, "cycle \(cycle)")
            #expect(!seen.contains(false), "cycle \(cycle)")
        }
        // The cycle starts at slot 0 and comes back to it after n accesses.
        var h = try AccessGenerator(spec: Self.spec(.chase, footprint: ByteCount(footprint), seed: pages))
        #expect(h.next().address.rawValue == Self.base)
        for _ in 1..<n { _ = h.next() }
        #expect(h.next().address.rawValue == Self.base)
    }

    @Test("sattoloCycle links every slot into one cycle", arguments: [1, 2, 3, 10, 4097])
    func sattoloLinks(n: Int) {
        var rng = SplitMix64(seed: UInt64(n))
        let next = AccessGenerator.sattoloCycle(slots: n, rng: &rng)
        #expect(next.count == n)
        var slot = 0
        var steps = 0
        repeat {
            slot = Int(next[slot])
            steps += 1
        } while slot != 0 && steps <= n
        #expect(steps == n)
        #expect(Set(next).count == n)
    }

    // MARK: Zipf

    @Test("zipf: rank 0 (page 0) is the most frequent page, and frequency falls with rank")
    func zipfRankZeroHottest() throws {
        let pages = 16_384
        var counts = [Int](repeating: 0, count: pages)
        for a in try Self.take(100_000, Self.spec(.zipf(theta: 0.99), seed: 11)) {
            counts[Int((a.address.rawValue - Self.base) >> 12)] += 1
        }
        let maxPage = counts.indices.max { counts[$0] < counts[$1] }!
        #expect(maxPage == 0)
        // P(0)/P(1) = 2^0.99 ~ 1.99: page 0 clearly above page 1, page 1 above page 10.
        #expect(counts[0] > counts[1] * 3 / 2)
        #expect(counts[1] > counts[10])
        // P(rank 0) = 1 / H(16384, 0.99), about 0.0958.
        var h = 0.0
        for k in 1...pages { h += 1 / Glibc.pow(Double(k), 0.99) }
        let expected = 100_000 / h
        #expect(abs(Double(counts[0]) - expected) < 6 * expected.squareRoot(), "page 0: \(counts[0]) vs \(expected)")
    }

    @Test(
        "the zipf CDF is positive, monotone, ends at exactly 1 and matches pow()",
        arguments: [(1, 0.99), (2, 0.5), (16_384, 0.99), (16_384, 1.2), (1000, 3.0), (4096, 9.99), (65_536, 0.01)]
    )
    func zipfTableShape(items: Int, theta: Double) {
        let table = ZipfTable(items: items, theta: theta)
        #expect(table.cdf.count == items)
        #expect(table.cdf.first! > 0)
        #expect(table.cdf.last! == 1.0)
        var nonMonotone = 0
        for k in 1..<items where table.cdf[k] < table.cdf[k - 1] { nonMonotone += 1 }
        #expect(nonMonotone == 0)
        #expect(table.cdf.allSatisfy { $0 <= 1.0 })
        // Against libm's pow: cdf[k] = sum_{j<=k} (j+1)^-theta / sum_all.
        var weights = (0..<items).map { 1 / Glibc.pow(Double($0 + 1), theta) }
        let total = weights.reduce(0, +)
        var acc = 0.0
        var worst = 0.0
        for k in 0..<items {
            acc += weights[k]
            weights[k] = acc / total
            worst = max(worst, abs(weights[k] - table.cdf[k]))
        }
        #expect(worst < 1e-9, "largest CDF error \(worst)")
    }

    @Test("ZipfTable.sample is the first rank whose CDF entry is >= u")
    func zipfSample() {
        let table = ZipfTable(items: 100, theta: 0.8)
        var r = ReferenceSplitMix64(seed: 1)
        var us = (0..<2_000).map { _ in r.unitDouble() }
        us += [0, 1, table.cdf[0], table.cdf[50], table.cdf[50].nextUp, table.cdf[98].nextDown, 0.999_999_999]
        for u in us {
            #expect(table.sample(u) == table.cdf.firstIndex { $0 >= u }!, "u = \(u)")
        }
    }

    // MARK: Write ratio

    @Test("write ratio 0.3 gives about 30% writes over 100,000 accesses", arguments: [WorkloadSpec.Pattern.uniform, .sequential, .zipf(theta: 0.99), .chase])
    func writeRatioApproximate(pattern: WorkloadSpec.Pattern) throws {
        let writes = try Self.take(100_000, Self.spec(pattern, footprint: .mib(4), writeRatio: 0.3, seed: 21)).filter { $0.kind == .write }.count
        // sigma = sqrt(100000 * 0.3 * 0.7) ~ 145; allow 7 sigma.
        #expect(abs(writes - 30_000) < 1_000, "\(writes) writes")
    }

    @Test("write ratio 0 gives no writes, 1 gives only writes, and neither draws a number")
    func writeRatioExtremes() throws {
        for pattern in [WorkloadSpec.Pattern.uniform, .zipf(theta: 0.99), .chase, .sequential] {
            let none = try Self.take(20_000, Self.spec(pattern, writeRatio: 0, seed: 4))
            let all = try Self.take(20_000, Self.spec(pattern, writeRatio: 1, seed: 4))
            #expect(none.allSatisfy { $0.kind == .read }, "\(pattern)")
            #expect(all.allSatisfy { $0.kind == .write }, "\(pattern)")
            // No write draw: both streams visit the same addresses.
            #expect(none.map(\.address) == all.map(\.address), "\(pattern)")
        }
    }

    @Test("writeThreshold is writeRatio * 2^64, saturated")
    func writeThreshold() {
        func t(_ r: Double) -> UInt64 { WorkloadSpec(writeRatio: r).writeThreshold }
        #expect(t(0) == 0)
        #expect(t(1) == UInt64.max)
        #expect(t(0.5) == 1 << 63)
        #expect(t(0.25) == 1 << 62)
        #expect(t(0.3) == 5_534_023_222_112_865_280)  // 0.3 (as a double) * 2^64, exactly
        // Just below 1: 2^64 - 2^11 by the formula (the code saturates to .max - 1; either is
        // a threshold no realistic draw distinguishes).
        #expect(t(1.0.nextDown) >= 18_446_744_073_709_549_568)
    }

    @Test("a lackey spec cannot be generated")
    func lackeyNotGenerated() {
        let error = #expect(throws: InputError.self) {
            try AccessGenerator(spec: WorkloadSpec(pattern: .lackey(path: "/tmp/t.txt")))
        }
        #expect(error?.message.contains("lackey") == true)
    }
}
