/// Where a paging-entry read hits: a model of the data-cache hierarchy for the 64-byte lines
/// that hold paging entries (only walk references go through it, so it is optimistic for
/// workloads whose data would evict page-table lines; the ledger says "by where it hit").
/// Golden Cove sizes: L1D 48 KiB 12-way, L2 2 MiB 16-way (Sapphire Rapids), and an LLC share
/// of 32 MiB 16-way (Intel optimization manual, Golden Cove cache parameters).
public final class PageTableLineCache: @unchecked Sendable {
    public enum Level: Int, Sendable { case l1 = 0, l2, llc, dram }
    let l1 = SetAssociativeCache(sets: 64, ways: 12)
    let l2 = SetAssociativeCache(sets: 2048, ways: 16)
    let llc = SetAssociativeCache(sets: 32768, ways: 16)
    /// References answered by L1D, L2, LLC and DRAM.
    public var l1Hits: UInt64 = 0
    public var l2Hits: UInt64 = 0
    public var llcHits: UInt64 = 0
    public var dramRefs: UInt64 = 0
    public var hits: [UInt64] { [l1Hits, l2Hits, llcHits, dramRefs] }
    let memoLines = UnsafeMutablePointer<UInt64>.allocate(capacity: 16)
    let memoSlots = UnsafeMutablePointer<Int>.allocate(capacity: 16)

    public init() {
        memoLines.initialize(repeating: 0, count: 16)
        memoSlots.initialize(repeating: -1, count: 16)
    }

    deinit {
        memoLines.deallocate()
        memoSlots.deallocate()
    }

    public func reset() { l1Hits = 0; l2Hits = 0; llcHits = 0; dramRefs = 0 }

    /// Looks up the line holding physical `address`, fills the levels it missed, and says where it hit.
    /// `level` (1...5 for guest tables, +8 for EPT tables) picks a memo register.
    @inline(__always) public func access(_ address: UInt64, level: Int) -> Level {
        let line = address >> 6
        // Walks re-read the same upper-level lines: check the slot the line of this level had
        // last time (one compare, same LRU update) before scanning its set.
        let m = level & 15
        if memoLines[m] == line && l1.touchIfHolds(slot: memoSlots[m], tag: line) {
            l1Hits &+= 1
            return .l1
        }
        let s = l1.lookup(tag: line, pcid: 0)
        if s >= 0 {
            memoLines[m] = line
            memoSlots[m] = s
            l1Hits &+= 1
            return .l1
        }
        memoLines[m] = 0
        if l2.lookup(tag: line, pcid: 0) >= 0 {
            l1.insert(tag: line, pcid: 0, payload: 0)
            l2Hits &+= 1
            return .l2
        }
        if llc.lookup(tag: line, pcid: 0) >= 0 {
            l2.insert(tag: line, pcid: 0, payload: 0)
            l1.insert(tag: line, pcid: 0, payload: 0)
            llcHits &+= 1
            return .llc
        }
        llc.insert(tag: line, pcid: 0, payload: 0)
        l2.insert(tag: line, pcid: 0, payload: 0)
        l1.insert(tag: line, pcid: 0, payload: 0)
        dramRefs &+= 1
        return .dram
    }
}
