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
    public private(set) var hits: [UInt64] = [0, 0, 0, 0]

    public init() {}

    /// Looks up the line holding physical `address`, fills the levels it missed, and says where it hit.
    @inline(__always) public func access(_ address: UInt64) -> Level {
        let line = address >> 6
        let level: Level
        if l1.lookup(tag: line, pcid: 0) >= 0 {
            level = .l1
        } else if l2.lookup(tag: line, pcid: 0) >= 0 {
            level = .l2
            l1.insert(tag: line, pcid: 0, payload: 0)
        } else if llc.lookup(tag: line, pcid: 0) >= 0 {
            level = .llc
            l2.insert(tag: line, pcid: 0, payload: 0)
            l1.insert(tag: line, pcid: 0, payload: 0)
        } else {
            level = .dram
            llc.insert(tag: line, pcid: 0, payload: 0)
            l2.insert(tag: line, pcid: 0, payload: 0)
            l1.insert(tag: line, pcid: 0, payload: 0)
        }
        hits[level.rawValue] &+= 1
        return level
    }
}
