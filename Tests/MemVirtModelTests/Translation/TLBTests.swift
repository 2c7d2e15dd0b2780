import MemVirtCore
import Testing

@testable import MemVirtModel

/// A deliberately simple reference: per set, an array ordered from least to most recently used.
struct ReferenceLRU {
    let sets: Int
    let ways: Int
    var contents: [[UInt64]]
    init(sets: Int, ways: Int) {
        self.sets = sets
        self.ways = ways
        contents = Array(repeating: [], count: sets)
    }
    /// Returns hit or miss; inserts on a miss, evicting the LRU way.
    mutating func access(_ tag: UInt64) -> Bool {
        let s = Int(tag % UInt64(sets))
        if let i = contents[s].firstIndex(of: tag) {
            contents[s].remove(at: i)
            contents[s].append(tag)
            return true
        }
        if contents[s].count == ways { contents[s].removeFirst() }
        contents[s].append(tag)
        return false
    }
}

@Suite("TLB arrays against a reference LRU model")
struct TLBTests {
    @Test("Hits, misses and evictions match the reference on random streams", arguments: [(16, 6), (1, 8), (128, 16), (4, 1)])
    func matchesReference(_ shape: (Int, Int)) {
        let (sets, ways) = shape
        let cache = SetAssociativeCache(sets: sets, ways: ways)
        var ref = ReferenceLRU(sets: sets, ways: ways)
        var rng = SplitMix64(seed: UInt64(sets * 100 + ways))
        let universe = UInt64(sets * ways * 3)
        var hits = 0
        for _ in 0..<50_000 {
            let tag = rng.bounded(universe)
            let hit = cache.lookup(tag: tag, pcid: 1) >= 0
            if !hit { cache.insert(tag: tag, pcid: 1, payload: tag) }
            let refHit = ref.access(tag)
            #expect(hit == refHit)
            if hit != refHit { return }
            if hit { hits += 1 }
        }
        #expect(hits > 0 && hits < 50_000)
        #expect(cache.occupancy == ref.contents.map(\.count).reduce(0, +))
    }

    @Test("PCIDs separate entries; global entries match every PCID; flush(pcid:) keeps globals")
    func pcidAndGlobal() {
        let c = SetAssociativeCache(sets: 4, ways: 4)
        c.insert(tag: 5, pcid: 1, payload: 11)
        c.insert(tag: 5, pcid: 2, payload: 22)
        c.insert(tag: 9, pcid: 1, global: true, payload: 99)
        #expect(c.payload(c.lookup(tag: 5, pcid: 1)) == 11)
        #expect(c.payload(c.lookup(tag: 5, pcid: 2)) == 22)
        #expect(c.lookup(tag: 5, pcid: 3) == -1)
        #expect(c.lookup(tag: 9, pcid: 3) >= 0)
        c.flush(pcid: 1)
        #expect(c.lookup(tag: 5, pcid: 1) == -1)
        #expect(c.lookup(tag: 5, pcid: 2) >= 0)
        #expect(c.lookup(tag: 9, pcid: 1) >= 0, "global survives a PCID flush")
        c.flushAll(keepGlobal: false)
        #expect(c.occupancy == 0)
    }

    @Test("INVLPG drops every page size covering the address, in the PCID only")
    func invlpg() {
        let tlb = TLBHierarchy(config: .goldenCove)
        let e4 = TLBEntry(base: 0x1000, size: .size4K, writable: true, user: true, dirty: true, noExecute: false)
        let e2 = TLBEntry(base: 0x20_0000, size: .size2M, writable: true, user: true, dirty: true, noExecute: false)
        tlb.insert(0x4000_1000, pcid: 1, entry: e4, global: false, fetch: false)
        tlb.insert(0x4020_0000, pcid: 1, entry: e2, global: false, fetch: false)
        tlb.insert(0x4000_1000, pcid: 2, entry: e4, global: false, fetch: false)
        #expect(tlb.lookup(0x4000_1abc, pcid: 1, fetch: false)?.1 == .l1)
        #expect(tlb.lookup(0x4021_0000, pcid: 1, fetch: false)?.0.size == .size2M)
        tlb.invalidatePage(0x4000_1000, pcid: 1)
        #expect(tlb.lookup(0x4000_1000, pcid: 1, fetch: false) == nil)
        #expect(tlb.lookup(0x4000_1000, pcid: 2, fetch: false) != nil)
        tlb.invalidatePage(0x4030_0000, pcid: 1)
        #expect(tlb.lookup(0x4021_0000, pcid: 1, fetch: false) == nil)
    }

    @Test("An entry evicted from L1 is still found in L2, which refills L1")
    func l2Backs() {
        let tlb = TLBHierarchy(config: .goldenCove)
        // 7 pages mapping to the same L1 set (16 sets, 6 ways) overflow it; L2 (128 sets) keeps them.
        for i in 0..<7 {
            let va = UInt64(i * 16) << 12
            tlb.insert(va, pcid: 1, entry: TLBEntry(base: va, size: .size4K, writable: true, user: true, dirty: true, noExecute: false), global: false, fetch: false)
        }
        let first = tlb.lookup(0, pcid: 1, fetch: false)
        #expect(first?.1 == .l2)
        #expect(tlb.lookup(0, pcid: 1, fetch: false)?.1 == .l1)
    }
}
