import MemVirtCore

/// The processor state a walk depends on (SDM vol. 3, 4.1 and 4.6).
public struct PagingConfig: Sendable, Hashable {
    /// 4 (48-bit linear addresses) or 5 (57-bit, CR4.LA57).
    public var levels: Int
    /// MAXPHYADDR: address bits above it in an entry are reserved.
    public var physicalAddressBits: Int
    /// IA32_EFER.NXE: bit 63 is XD (otherwise reserved).
    public var noExecuteEnabled: Bool
    /// CR0.WP: supervisor writes honour R/W.
    public var writeProtect: Bool

    /// 46 address bits: a common Intel server MAXPHYADDR (CPUID 0x80000008 on Xeon cores).
    public init(levels: Int = 4, physicalAddressBits: Int = 46, noExecuteEnabled: Bool = true, writeProtect: Bool = true) {
        self.levels = levels
        self.physicalAddressBits = physicalAddressBits
        self.noExecuteEnabled = noExecuteEnabled
        self.writeProtect = writeProtect
    }

    public var virtualAddressBits: Int { levels == 5 ? 57 : 48 }

    /// Entry bits reserved at every level: MAXPHYADDR..51, and XD when EFER.NXE = 0.
    public var reservedAddressBits: UInt64 {
        var m: UInt64 = physicalAddressBits >= 52 ? 0 : (((1 << 52) - 1) & ~((1 << UInt64(physicalAddressBits)) - 1))
        if !noExecuteEnabled { m |= 1 << 63 }
        return m
    }
}

/// Reads and writes paging-structure entries of the table being walked. The native walker
/// reads physical memory directly; a nested walk translates every table address through EPT
/// first, and may have to stop (an EPT violation) — then `read` returns nil.
public protocol PageTableMemory {
    /// Reads the entry at `address`, which belongs to a table of paging `level` (1 = PT).
    mutating func readEntry(_ address: UInt64, level: Int) -> UInt64?
    mutating func writeEntry(_ address: UInt64, _ value: UInt64)
}

/// Direct access to one physical memory (native paging; shadow tables in host memory).
public struct DirectTableMemory: PageTableMemory {
    // The raw mapping, not the owning object: a walk's table memory lives inside a call that
    // holds the memory, and a class reference here costs a retain/release pair per walk.
    let base: UnsafeMutableRawPointer
    let capacity: UInt64
    public init(_ memory: PhysicalMemory) {
        base = memory.base
        capacity = memory.capacity
    }
    @inline(__always) public mutating func readEntry(_ address: UInt64, level: Int) -> UInt64? {
        precondition(address &+ 8 <= capacity, "page-table read beyond simulated memory")
        return base.load(fromByteOffset: Int(address), as: UInt64.self)
    }
    @inline(__always) public mutating func writeEntry(_ address: UInt64, _ value: UInt64) {
        precondition(address &+ 8 <= capacity, "page-table write beyond simulated memory")
        base.storeBytes(of: value, toByteOffset: Int(address), as: UInt64.self)
    }
}

/// The outcome of one walk.
public struct WalkResult: Sendable {
    public enum Kind: Sendable, Equatable {
        /// A translation: `entry` holds the page base in the walked tables' output space.
        case translated
        /// A page fault with this error code, found at `faultLevel`.
        case fault(PageFaultErrorCode)
        /// The table memory could not be read (the reader recorded why, e.g. an EPT violation).
        case stopped
    }
    public var kind: Kind
    public var entry: TLBEntry
    public var global: Bool
    /// Paging-entry reads made by this walk.
    public var refs: Int
    /// A/D bit write-backs made by this walk.
    public var adWrites: Int
    /// The level that faulted or stopped (0 for a translation).
    public var faultLevel: Int
    /// True when a paging-structure cache let the walk start below the root.
    public var walkCacheHit: Bool
    /// The guest-physical address of the leaf entry (for the hypervisor's rmap / write-protect).
    public var leafEntryAddress: UInt64
}

/// Paging-structure caches (SDM vol. 3, 4.10.3): PML4E, PDPTE and PDE caches, PCID-tagged.
/// Each entry holds the next table's address and the permissions accumulated above it.
/// Payload: next table in bits 51:12, AND of R/W (bit 1) and U/S (bit 2), OR of XD (bit 63).
public final class PagingStructureCaches: @unchecked Sendable {
    public let pml4e: SetAssociativeCache
    public let pdpte: SetAssociativeCache
    public let pde: SetAssociativeCache
    public let enabled: Bool

    public init(config: TLBConfig) {
        // Fully associative, as the reverse-engineered caches behave.
        pml4e = SetAssociativeCache(sets: 1, ways: config.pml4eCache)
        pdpte = SetAssociativeCache(sets: 1, ways: config.pdpteCache)
        pde = SetAssociativeCache(sets: 1, ways: config.pdeCache)
        enabled = config.pml4eCache + config.pdpteCache + config.pdeCache > 0
    }

    /// INVLPG and CR3 writes drop every paging-structure-cache entry of the PCID (SDM 4.10.4.1).
    public func flush(pcid: UInt16) {
        pml4e.flush(pcid: pcid)
        pdpte.flush(pcid: pcid)
        pde.flush(pcid: pcid)
    }

    public func flushAll() {
        pml4e.flushAll()
        pdpte.flushAll()
        pde.flushAll()
    }
}

/// The hardware page walker: reads real 8-byte entries, checks them level by level, sets
/// accessed bits on every entry it uses and the dirty bit on a written leaf, and reports a
/// fault with the architectural error code (SDM vol. 3, 4.7).
public enum PageWalker {
    /// Walks `va` from the table at `root` for an access of `kind` in `mode`.
    
    public static func walk<M: PageTableMemory>(
        _ va: UInt64, root: UInt64, kind: AccessKind, mode: PrivilegeMode, pcid: UInt16,
        config: PagingConfig, caches: PagingStructureCaches?, memory: inout M
    ) -> WalkResult {
        let user = mode == .user
        let write = kind == .write
        let fetch = kind == .execute
        var accessBits: UInt32 = 0
        if write { accessBits |= PageFaultErrorCode.write.rawValue }
        if user { accessBits |= PageFaultErrorCode.user.rawValue }
        if fetch && config.noExecuteEnabled { accessBits |= PageFaultErrorCode.instructionFetch.rawValue }

        var result = WalkResult(
            kind: .translated, entry: TLBEntry(payload: 0, size: .size4K), global: false, refs: 0, adWrites: 0,
            faultLevel: 0, walkCacheHit: false, leafEntryAddress: 0)
        var level = config.levels
        var table = root & PageTableEntry.addressMask
        // Bits MAXPHYADDR..51 (and XD without EFER.NXE) are reserved at every level; PS is
        // reserved in PML4Es/PML5Es; bits 20:13 / 29:13 in 2 MiB / 1 GiB leaves.
        let reservedAlways: UInt64 = config.reservedAddressBits
        var allowWU: UInt64 = 6  // AND of R/W and U/S so far
        var noExec: UInt64 = 0  // OR of XD so far

        if let c = caches, c.enabled {
            var s = c.pde.lookup(tag: va >> 21, pcid: pcid)
            if s >= 0 {
                level = 1
            } else {
                s = c.pdpte.lookup(tag: va >> 30, pcid: pcid)
                if s >= 0 {
                    level = 2
                } else {
                    s = c.pml4e.lookup(tag: va >> 39, pcid: pcid)
                    if s >= 0 { level = 3 }
                }
            }
            if s >= 0 {
                let p = level == 1 ? c.pde.payload(s) : level == 2 ? c.pdpte.payload(s) : c.pml4e.payload(s)
                table = p & PageTableEntry.addressMask
                allowWU = p & 6
                noExec = p & (1 << 63)
                result.walkCacheHit = true
            }
        }

        while true {
            let entryAddress = table &+ (UInt64(truncatingIfNeeded: (va >> UInt64(12 &+ 9 &* (level &- 1))) & 0x1ff) << 3)
            guard let raw = memory.readEntry(entryAddress, level: level) else {
                result.kind = .stopped
                result.faultLevel = level
                return result
            }
            result.refs &+= 1
            let e = PageTableEntry(rawValue: raw)
            if raw & 1 == 0 {
                result.kind = .fault(PageFaultErrorCode(rawValue: accessBits))
                result.faultLevel = level
                return result
            }
            let largeLeaf = level <= 3 && level >= 2 && raw & 0x80 != 0
            if raw & reservedAlways != 0 || (level >= 4 && raw & 0x80 != 0)
                || (largeLeaf && raw & (level == 3 ? 0x3FFF_E000 : 0x1F_E000) != 0)
            {
                result.kind = .fault(PageFaultErrorCode(rawValue: accessBits | 1 | PageFaultErrorCode.reservedBit.rawValue))
                result.faultLevel = level
                return result
            }
            var updated = raw
            if raw & 0x20 == 0 { updated |= 0x20 }
            allowWU &= raw & 6
            if config.noExecuteEnabled { noExec |= raw & (1 << 63) }
            let isLeaf = level == 1 || (level <= 3 && raw & 0x80 != 0)
            if !isLeaf {
                if updated != raw {
                    memory.writeEntry(entryAddress, updated)
                    result.adWrites &+= 1
                }
                if let c = caches, c.enabled {
                    let payload = (raw & PageTableEntry.addressMask) | allowWU | noExec
                    switch level {
                    case 4: c.pml4e.insert(tag: va >> 39, pcid: pcid, payload: payload)
                    case 3: c.pdpte.insert(tag: va >> 30, pcid: pcid, payload: payload)
                    case 2: c.pde.insert(tag: va >> 21, pcid: pcid, payload: payload)
                    default: break
                    }
                }
                table = raw & PageTableEntry.addressMask
                level &-= 1
                continue
            }
            // Leaf: permissions (SDM 4.6), then A/D.
            let size = PageSize(leafLevel: level)!
            var violation = false
            if user && allowWU & 4 == 0 { violation = true }
            if write && allowWU & 2 == 0 && (user || config.writeProtect) { violation = true }
            if fetch && noExec != 0 { violation = true }
            if violation {
                if updated != raw {
                    memory.writeEntry(entryAddress, updated)
                    result.adWrites &+= 1
                }
                result.kind = .fault(PageFaultErrorCode(rawValue: accessBits | 1))
                result.faultLevel = level
                return result
            }
            if write && raw & 0x40 == 0 { updated |= 0x40 }
            if updated != raw {
                memory.writeEntry(entryAddress, updated)
                result.adWrites &+= 1
            }
            result.leafEntryAddress = entryAddress
            result.global = raw & 0x100 != 0
            result.entry = TLBEntry(
                base: e.pageBase(size), size: size, writable: allowWU & 2 != 0, user: allowWU & 4 != 0,
                dirty: updated & 0x40 != 0, noExecute: noExec != 0)
            return result
        }
    }
}
