import MemVirtConfig
import MemVirtCore
import MemVirtModel
import Testing

/// A set-associative LRU cache of page numbers, written from the geometry alone: set = page
/// number mod sets, true LRU within a set.
struct ReferenceLRU {
    let sets: Int
    let ways: Int
    var content: [[UInt64]]  // per set, least recently used first
    init(sets: Int, ways: Int) {
        self.sets = sets
        self.ways = ways
        content = Array(repeating: [], count: sets)
    }
    mutating func lookup(_ page: UInt64) -> Bool {
        let s = Int(page % UInt64(sets))
        guard let i = content[s].firstIndex(of: page) else { return false }
        content[s].remove(at: i)
        content[s].append(page)
        return true
    }
    mutating func insert(_ page: UInt64) {
        let s = Int(page % UInt64(sets))
        if let i = content[s].firstIndex(of: page) { content[s].remove(at: i) }
        if content[s].count == ways { content[s].removeFirst() }
        content[s].append(page)
    }
}

@Suite struct TLBGeometryTests {
    /// A read-only uniform stream over 4 KiB pages, natively paged: every access looks up the
    /// L1 DTLB, then the second-level TLB (refilling L1 on a hit), and a miss walks and fills
    /// both. The reference counts L1 hits, L2 hits and misses from the profile's geometry.
    static func reference(_ profile: MachineProfile, _ spec: WorkloadSpec) throws -> (l1: UInt64, l2: UInt64, misses: UInt64) {
        let l1a = try #require(profile.tlb.l1d.first { $0.sizes.contains(.size4K) })
        let l2a = try #require(profile.tlb.l2.first { $0.sizes.contains(.size4K) })
        var l1 = ReferenceLRU(sets: l1a.sets, ways: l1a.ways)
        var l2 = ReferenceLRU(sets: l2a.sets, ways: l2a.ways)
        var gen = try AccessGenerator(spec: spec)
        var counts: (l1: UInt64, l2: UInt64, misses: UInt64) = (0, 0, 0)
        for _ in 0..<spec.accesses {
            let page = gen.next().address.rawValue >> 12
            if l1.lookup(page) {
                counts.l1 += 1
            } else if l2.lookup(page) {
                counts.l2 += 1
                l1.insert(page)
            } else {
                counts.misses += 1
                l1.insert(page)
                l2.insert(page)
            }
        }
        return counts
    }

    @Test func zen4AndGoldenCoveMissCountsMatchTheirReferences() throws {
        let spec = WorkloadSpec(pattern: .uniform, footprint: ByteCount(24 << 20), accesses: 60_000, writeRatio: 0, seed: 3)
        var misses: [String: UInt64] = [:]
        for name in ["vmx-ept", "zen4", "skylake-sp"] {
            let profile = try MachineProfile.load(name)
            var config = ModelConfig()
            config.paging = .native
            profile.apply(to: &config)
            #expect(config.tlb == profile.tlb)
            let r = try ModelEngine.run(spec: spec, config: config)
            let ref = try Self.reference(profile, spec)
            #expect(r.counters[.l1TLBHits] == ref.l1, "\(name) L1 hits")
            #expect(r.counters[.l2TLBHits] == ref.l2, "\(name) L2 hits")
            #expect(r.counters[.tlbMisses] == ref.misses, "\(name) misses")
            #expect(r.counters[.accesses] == spec.accesses)
            misses[name] = r.counters[.tlbMisses]
        }
        // Different geometries, different misses: 2,048 4K entries in Golden Cove's STLB,
        // 3,072 in Zen 4's L2 DTLB, 1,536 in Skylake's.
        #expect(misses["zen4"]! < misses["vmx-ept"]!)
        #expect(misses["vmx-ept"]! < misses["skylake-sp"]!)
    }
}
