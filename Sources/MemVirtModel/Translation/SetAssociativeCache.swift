/// A set-associative cache of translations with true LRU replacement: the storage of every
/// TLB array, paging-structure cache and nested TLB in the model. Tags are page numbers at
/// the array's granularity; entries carry a PCID (or are global) and a 64-bit payload.
/// Storage is preallocated and reached through unsafe pointers so a lookup is a handful of
/// loads and compares with no allocation, no bounds check and no reference counting.
public final class SetAssociativeCache: @unchecked Sendable {
    public let sets: Int
    public let ways: Int
    @usableFromInline let setMask: UInt64
    /// (tag << 1) | 1; 0 marks an invalid way.
    @usableFromInline let keys: UnsafeMutablePointer<UInt64>
    /// PCID in bits 11:0, global in bit 16.
    @usableFromInline let metas: UnsafeMutablePointer<UInt32>
    @usableFromInline let payloads: UnsafeMutablePointer<UInt64>
    @usableFromInline let stamps: UnsafeMutablePointer<UInt64>
    @usableFromInline var clock: UInt64 = 0
    /// Valid entries now (lets a lookup skip an empty array).
    public private(set) var occupancy: Int = 0

    public static let globalBit: UInt32 = 1 << 16

    /// `sets` must be a power of two; `sets * ways` may be 0 (an absent structure).
    public init(sets: Int, ways: Int) {
        precondition(sets > 0 && sets & (sets - 1) == 0, "sets must be a power of two")
        precondition(ways >= 0)
        self.sets = sets
        self.ways = ways
        setMask = UInt64(sets - 1)
        let n = max(1, sets * ways)
        keys = .allocate(capacity: n)
        keys.initialize(repeating: 0, count: n)
        metas = .allocate(capacity: n)
        metas.initialize(repeating: 0, count: n)
        payloads = .allocate(capacity: n)
        payloads.initialize(repeating: 0, count: n)
        stamps = .allocate(capacity: n)
        stamps.initialize(repeating: 0, count: n)
    }

    deinit {
        keys.deallocate()
        metas.deallocate()
        payloads.deallocate()
        stamps.deallocate()
    }

    public var capacity: Int { sets * ways }

    /// The slot holding `tag` for `pcid` (or a global entry), marked most recently used; -1 on a miss.
    @inline(__always)
    public func lookup(tag: UInt64, pcid: UInt16) -> Int {
        if occupancy == 0 { return -1 }
        let key = (tag << 1) | 1
        let first = Int(truncatingIfNeeded: tag & setMask) &* ways
        var slot = first
        let end = first &+ ways
        while slot < end {
            if keys[slot] == key {
                let m = metas[slot]
                if UInt16(truncatingIfNeeded: m) == pcid || m & Self.globalBit != 0 {
                    clock &+= 1
                    stamps[slot] = clock
                    return slot
                }
            }
            slot &+= 1
        }
        return -1
    }

    /// If `slot` holds `tag` (PCID 0), marks it most recently used and returns true.
    @inline(__always) public func touchIfHolds(slot: Int, tag: UInt64) -> Bool {
        if slot >= 0 && keys[slot] == (tag << 1) | 1 && metas[slot] == 0 {
            clock &+= 1
            stamps[slot] = clock
            return true
        }
        return false
    }

    /// The slot holding `tag` (PCID 0) without touching LRU state, or -1.
    @inline(__always) public func slot(of tag: UInt64) -> Int {
        let key = (tag << 1) | 1
        let first = Int(truncatingIfNeeded: tag & setMask) &* ways
        var slot = first
        while slot < first &+ ways {
            if keys[slot] == key && metas[slot] == 0 { return slot }
            slot &+= 1
        }
        return -1
    }

    @inline(__always) public func payload(_ slot: Int) -> UInt64 { payloads[slot] }
    /// Whether the entry in `slot` is global (matches every PCID).
    @inline(__always) public func isGlobal(_ slot: Int) -> Bool { metas[slot] & Self.globalBit != 0 }
    @inline(__always) public func setPayload(_ slot: Int, _ value: UInt64) { payloads[slot] = value }

    /// Inserts (or refreshes) `tag`; returns true when a valid entry was evicted.
    @discardableResult
    public func insert(tag: UInt64, pcid: UInt16, global: Bool = false, payload: UInt64) -> Bool {
        if ways == 0 { return false }
        let key = (tag << 1) | 1
        let first = Int(truncatingIfNeeded: tag & setMask) &* ways
        var victim = first
        var oldest = UInt64.max
        for slot in first..<(first + ways) {
            if keys[slot] == key && (UInt16(truncatingIfNeeded: metas[slot]) == pcid || metas[slot] & Self.globalBit != 0) {
                victim = slot
                oldest = 0
                break
            }
            if keys[slot] == 0 {
                if oldest != 0 { victim = slot; oldest = 0 }
            } else if stamps[slot] < oldest {
                victim = slot
                oldest = stamps[slot]
            }
        }
        let evicted = keys[victim] != 0 && keys[victim] != key
        if keys[victim] == 0 { occupancy += 1 }
        keys[victim] = key
        metas[victim] = UInt32(pcid) | (global ? Self.globalBit : 0)
        payloads[victim] = payload
        clock &+= 1
        stamps[victim] = clock
        return evicted
    }

    /// Drops the entry for `tag` in `pcid` and any global one (INVLPG semantics).
    public func invalidate(tag: UInt64, pcid: UInt16) {
        if occupancy == 0 { return }
        let key = (tag << 1) | 1
        let first = Int(truncatingIfNeeded: tag & setMask) &* ways
        for slot in first..<(first + ways) where keys[slot] == key {
            let m = metas[slot]
            if UInt16(truncatingIfNeeded: m) == pcid || m & Self.globalBit != 0 { drop(slot) }
        }
    }

    /// Drops every entry whose tag satisfies `match` (any PCID): for range invalidations.
    public func invalidateAll(where match: (UInt64) -> Bool) {
        if occupancy == 0 { return }
        for slot in 0..<capacity where keys[slot] != 0 && match(keys[slot] >> 1) { drop(slot) }
    }

    /// Drops the non-global entries of `pcid` (a CR3 write without the no-flush bit).
    public func flush(pcid: UInt16) {
        if occupancy == 0 { return }
        for slot in 0..<capacity where keys[slot] != 0 {
            let m = metas[slot]
            if UInt16(truncatingIfNeeded: m) == pcid && m & Self.globalBit == 0 { drop(slot) }
        }
    }

    /// Drops everything, or everything but global entries.
    public func flushAll(keepGlobal: Bool = false) {
        if occupancy == 0 { return }
        for slot in 0..<capacity where keys[slot] != 0 {
            if !(keepGlobal && metas[slot] & Self.globalBit != 0) { drop(slot) }
        }
    }

    @usableFromInline func drop(_ slot: Int) {
        keys[slot] = 0
        occupancy -= 1
    }

    /// Valid (tag, pcid, global) triples, for tests and invariant checks.
    public var entries: [(tag: UInt64, pcid: UInt16, global: Bool, payload: UInt64)] {
        (0..<capacity).compactMap { s in
            keys[s] == 0 ? nil : (keys[s] >> 1, UInt16(truncatingIfNeeded: metas[s]), metas[s] & Self.globalBit != 0, payloads[s])
        }
    }
}
