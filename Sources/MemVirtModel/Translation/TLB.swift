import MemVirtCore

/// The shape of one TLB array: sets x ways, holding pages of the given sizes.
public struct TLBArrayConfig: Sendable, Hashable {
    public var sets: Int
    public var ways: Int
    public var sizes: [PageSize]
    public init(sets: Int, ways: Int, sizes: [PageSize]) {
        self.sets = sets
        self.ways = ways
        self.sizes = sizes
    }
    public var entries: Int { sets * ways }
}

/// TLBs and paging-structure caches of one core.
public struct TLBConfig: Sendable, Hashable {
    /// L1 data TLB arrays, one per page size.
    public var l1d: [TLBArrayConfig]
    /// L1 instruction TLB arrays.
    public var l1i: [TLBArrayConfig]
    /// Unified second-level TLB arrays (an array may hold several sizes).
    public var l2: [TLBArrayConfig]
    /// Paging-structure caches (SDM vol. 3, 4.10.3): entries of the PML4E, PDPTE and PDE caches.
    public var pml4eCache: Int
    public var pdpteCache: Int
    public var pdeCache: Int
    /// Process-context identifiers (CR4.PCIDE): TLB entries are tagged and survive CR3 writes.
    public var pcid: Bool

    /// Intel Golden Cove (Alder Lake P-core, Sapphire Rapids), from the Intel 64 and IA-32
    /// Architectures Optimization Reference Manual, "Golden Cove microarchitecture" TLB table:
    /// ITLB 256 x 4K (8-way) + 32 x 2M (8-way); load DTLB 96 x 4K (6-way), 32 x 2M (4-way),
    /// 8 x 1G (8-way); STLB 2048 entries 16-way shared by 4K and 2M pages, and 1024 entries 8-way
    /// for 4K and 1G pages (modelled here as holding 1G pages only). Intel does not publish the
    /// paging-structure cache sizes; 2 PML4E / 4 PDPTE / 32 PDE entries follow reverse-
    /// engineering of recent Intel cores (Gras et al., "Translation Leak-aside Buffer", USENIX
    /// Security 2018; Bhattacharjee, "Large-reach MMU caches", MICRO 2013).
    public static let goldenCove = TLBConfig(
        l1d: [
            TLBArrayConfig(sets: 16, ways: 6, sizes: [.size4K]),
            TLBArrayConfig(sets: 8, ways: 4, sizes: [.size2M]),
            TLBArrayConfig(sets: 1, ways: 8, sizes: [.size1G]),
        ],
        l1i: [
            TLBArrayConfig(sets: 32, ways: 8, sizes: [.size4K]),
            TLBArrayConfig(sets: 4, ways: 8, sizes: [.size2M]),
        ],
        l2: [
            TLBArrayConfig(sets: 128, ways: 16, sizes: [.size4K, .size2M]),
            TLBArrayConfig(sets: 128, ways: 8, sizes: [.size1G]),
        ],
        pml4eCache: 2, pdpteCache: 4, pdeCache: 32, pcid: true
    )

    /// No TLB and no paging-structure cache: every access walks from the root.
    public static let none = TLBConfig(l1d: [], l1i: [], l2: [], pml4eCache: 0, pdpteCache: 0, pdeCache: 0, pcid: true)

    public init(
        l1d: [TLBArrayConfig], l1i: [TLBArrayConfig], l2: [TLBArrayConfig], pml4eCache: Int, pdpteCache: Int,
        pdeCache: Int, pcid: Bool
    ) {
        self.l1d = l1d
        self.l1i = l1i
        self.l2 = l2
        self.pml4eCache = pml4eCache
        self.pdpteCache = pdpteCache
        self.pdeCache = pdeCache
        self.pcid = pcid
    }

    /// The same TLBs without paging-structure caches.
    public var withoutWalkCaches: TLBConfig {
        var c = self
        c.pml4eCache = 0
        c.pdpteCache = 0
        c.pdeCache = 0
        return c
    }
}

/// A cached translation: the page's base in the final physical space and what the walk allowed.
/// Payload bits use PTE positions: W = bit 1, U = bit 2, D = bit 6, XD = bit 63, base in 51:12.
public struct TLBEntry: Sendable, Hashable {
    public var payload: UInt64
    public var size: PageSize
    public init(payload: UInt64, size: PageSize) {
        self.payload = payload
        self.size = size
    }
    public init(base: UInt64, size: PageSize, writable: Bool, user: Bool, dirty: Bool, noExecute: Bool) {
        var p = base & PageTableEntry.addressMask
        if writable { p |= 2 }
        if user { p |= 4 }
        if dirty { p |= 0x40 }
        if noExecute { p |= 1 << 63 }
        self.init(payload: p, size: size)
    }
    public var base: UInt64 { payload & PageTableEntry.addressMask & ~size.offsetMask }
    public var writable: Bool { payload & 2 != 0 }
    public var user: Bool { payload & 4 != 0 }
    public var dirty: Bool { payload & 0x40 != 0 }
    public var noExecute: Bool { payload & (1 << 63) != 0 }
}

/// Where a TLB look-up was answered.
public enum TLBLevel: Int, Sendable { case l1 = 1, l2 = 2 }

/// The TLBs of one core: L1 data and instruction TLBs backed by a unified L2 TLB, PCID-tagged,
/// with INVLPG and CR3-write semantics. Translations are from an address space's virtual page
/// to a page in the final physical space (host-physical under virtualization).
public final class TLBHierarchy: @unchecked Sendable {
    public let config: TLBConfig
    @usableFromInline struct Array_ {
        let cache: SetAssociativeCache
        let sizes: [PageSize]
        let size0: PageSize
        let shared: Bool
    }
    @usableFromInline let l1d: [Array_]
    @usableFromInline let l1i: [Array_]
    @usableFromInline let l2: [Array_]
    /// Fast path: the L1 data array for 4K pages, if configured.
    @usableFromInline let l1d4K: SetAssociativeCache?
    let all: [Array_]

    public init(config: TLBConfig) {
        self.config = config
        func make(_ a: TLBArrayConfig) -> Array_ {
            Array_(cache: SetAssociativeCache(sets: a.sets, ways: a.ways), sizes: a.sizes, size0: a.sizes[0], shared: a.sizes.count > 1)
        }
        l1d = config.l1d.filter { $0.entries > 0 }.map(make)
        l1i = config.l1i.filter { $0.entries > 0 }.map(make)
        l2 = config.l2.filter { $0.entries > 0 }.map(make)
        l1d4K = l1d.first { !$0.shared && $0.size0 == .size4K }?.cache
        all = l1d + l1i + l2
        empty = all.isEmpty
    }

    /// No TLB at all (every access walks).
    let empty: Bool

    @inline(__always) static func tag(_ va: UInt64, _ size: PageSize, shared: Bool) -> UInt64 {
        let vpn = va >> UInt64(size.shift)
        return shared ? vpn | (UInt64(size.rawValue) << 58) : vpn
    }

    /// Looks `va` up; on an L2 hit the L1 array of that size is refilled.
    @inline(__always)
    public func lookup(_ va: UInt64, pcid: UInt16, fetch: Bool) -> (TLBEntry, TLBLevel)? {
        if !fetch, let fast = l1d4K {
            let s = fast.lookup(tag: va >> 12, pcid: pcid)
            if s >= 0 { return (TLBEntry(payload: fast.payload(s), size: .size4K), .l1) }
        }
        if empty { return nil }
        return lookupSlow(va, pcid: pcid, fetch: fetch)
    }

    @inline(never) func lookupSlow(_ va: UInt64, pcid: UInt16, fetch: Bool) -> (TLBEntry, TLBLevel)? {
        if fetch {
            if let hit = lookupL1(l1i, va, pcid) { return hit }
        } else {
            if let hit = lookupL1(l1d, va, pcid) { return hit }
        }
        for a in l2 {
            for size in a.sizes {
                let s = a.cache.lookup(tag: Self.tag(va, size, shared: a.shared), pcid: pcid)
                if s >= 0 {
                    let e = TLBEntry(payload: a.cache.payload(s), size: size)
                    fillL1(va, pcid: pcid, entry: e, global: a.cache.isGlobal(s), fetch: fetch)
                    return (e, .l2)
                }
            }
        }
        return nil
    }

    @inline(__always) func lookupL1(_ arrays: [Array_], _ va: UInt64, _ pcid: UInt16) -> (TLBEntry, TLBLevel)? {
        for a in arrays {
            for size in a.sizes {
                let s = a.cache.lookup(tag: Self.tag(va, size, shared: a.shared), pcid: pcid)
                if s >= 0 { return (TLBEntry(payload: a.cache.payload(s), size: size), .l1) }
            }
        }
        return nil
    }

    /// Installs a translation from a completed walk in L1 and L2.
    public func insert(_ va: UInt64, pcid: UInt16, entry: TLBEntry, global: Bool, fetch: Bool) {
        fillL1(va, pcid: pcid, entry: entry, global: global, fetch: fetch)
        for a in l2 where a.sizes.contains(entry.size) {
            a.cache.insert(tag: Self.tag(va, entry.size, shared: a.shared), pcid: pcid, global: global, payload: entry.payload)
        }
    }

    @usableFromInline func fillL1(_ va: UInt64, pcid: UInt16, entry: TLBEntry, global: Bool, fetch: Bool) {
        for a in fetch ? l1i : l1d where a.sizes.contains(entry.size) {
            a.cache.insert(tag: Self.tag(va, entry.size, shared: a.shared), pcid: pcid, global: global, payload: entry.payload)
        }
    }

    /// INVLPG: drops translations of the page holding `va` (every size) in `pcid` and global ones.
    public func invalidatePage(_ va: UInt64, pcid: UInt16) {
        for a in all {
            for size in a.sizes { a.cache.invalidate(tag: Self.tag(va, size, shared: a.shared), pcid: pcid) }
        }
    }

    /// A CR3 write that flushes: non-global entries of `pcid`.
    public func flush(pcid: UInt16) { for a in all { a.cache.flush(pcid: pcid) } }

    /// Everything (keepGlobal: a CR4.PGE toggle drops globals too; a plain flush keeps them).
    public func flushAll(keepGlobal: Bool) { for a in all { a.cache.flushAll(keepGlobal: keepGlobal) } }

    /// Every cached translation, for invariant checks: (virtual page base, pcid, entry).
    public var allEntries: [(va: UInt64, pcid: UInt16, entry: TLBEntry)] {
        var out: [(UInt64, UInt16, TLBEntry)] = []
        for a in all {
            for e in a.cache.entries {
                let size = a.shared ? PageSize(rawValue: Int(e.tag >> 58))! : a.size0
                let vpn = a.shared ? e.tag & ((1 << 58) - 1) : e.tag
                out.append((vpn << UInt64(size.shift), e.pcid, TLBEntry(payload: e.payload, size: size)))
            }
        }
        return out
    }
}
