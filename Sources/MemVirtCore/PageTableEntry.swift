/// x86-64 paging-structure entries, bit-exact to the Intel SDM vol. 3, section 4.5
/// (4-level and 5-level paging; tables 4-15 to 4-20). One type serves every level: what a
/// bit means depends on the level, and the accessors say which levels they apply to.
public struct PageTableEntry: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public var rawValue: UInt64
    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }

    public struct Flags: OptionSet, Hashable, Sendable {
        public var rawValue: UInt64
        @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }
        /// Bit 0, P: the entry maps a page or references a table.
        public static let present = Flags(rawValue: 1 << 0)
        /// Bit 1, R/W: writes allowed (for supervisor accesses only when CR0.WP = 1).
        public static let writable = Flags(rawValue: 1 << 1)
        /// Bit 2, U/S: user-mode (CPL 3) accesses allowed.
        public static let user = Flags(rawValue: 1 << 2)
        /// Bit 3, PWT: page-level write-through.
        public static let writeThrough = Flags(rawValue: 1 << 3)
        /// Bit 4, PCD: page-level cache disable.
        public static let cacheDisable = Flags(rawValue: 1 << 4)
        /// Bit 5, A: set by the processor when the entry is used in a translation.
        public static let accessed = Flags(rawValue: 1 << 5)
        /// Bit 6, D: set by the processor on a write through a leaf entry.
        public static let dirty = Flags(rawValue: 1 << 6)
        /// Bit 7, PS: in a PDPTE or PDE the entry maps a 1 GiB or 2 MiB page. In a 4 KiB PTE
        /// this bit is PAT; in a PML4E or PML5E it is reserved (must be 0).
        public static let pageSize = Flags(rawValue: 1 << 7)
        /// Bit 8, G: global translation (leaf entries, when CR4.PGE = 1).
        public static let global = Flags(rawValue: 1 << 8)
        /// Bit 63, XD: instruction fetches not allowed (when IA32_EFER.NXE = 1).
        public static let noExecute = Flags(rawValue: 1 << 63)
    }

    /// Bits 51:12, the physical address of the next table or of a 4 KiB page.
    public static let addressMask: UInt64 = 0x000F_FFFF_FFFF_F000
    /// Bits 62:59, the protection key (leaf entries, CR4.PKE = 1).
    public static let protectionKeyShift: UInt64 = 59

    @inlinable public init(frameAddress: UInt64, flags: Flags) {
        rawValue = (frameAddress & Self.addressMask) | flags.rawValue
    }

    @inlinable public var flags: Flags { Flags(rawValue: rawValue) }
    @inlinable public func has(_ f: Flags) -> Bool { rawValue & f.rawValue == f.rawValue }
    @inlinable public var isPresent: Bool { rawValue & 1 != 0 }
    @inlinable public var isWritable: Bool { rawValue & 2 != 0 }
    @inlinable public var isUser: Bool { rawValue & 4 != 0 }
    @inlinable public var isAccessed: Bool { rawValue & 0x20 != 0 }
    @inlinable public var isDirty: Bool { rawValue & 0x40 != 0 }
    @inlinable public var isLargePage: Bool { rawValue & 0x80 != 0 }
    @inlinable public var isNoExecute: Bool { rawValue & (1 << 63) != 0 }
    /// Bits 51:12 as an address: the next table, or the 4 KiB page.
    @inlinable public var address: UInt64 { rawValue & Self.addressMask }
    /// The page's base address for a leaf of `size` (bit 12 is PAT in 2 MiB / 1 GiB leaves).
    @inlinable public func pageBase(_ size: PageSize) -> UInt64 { rawValue & Self.addressMask & ~size.offsetMask }
    @inlinable public var protectionKey: Int { Int((rawValue >> Self.protectionKeyShift) & 0xf) }

    @inlinable public func setting(_ f: Flags) -> Self { Self(rawValue: rawValue | f.rawValue) }
    @inlinable public func clearing(_ f: Flags) -> Self { Self(rawValue: rawValue & ~f.rawValue) }

    /// The reserved bits of an entry at `level` (1 = PTE ... 5 = PML5E) that must be zero,
    /// for a processor with `physicalAddressBits` (MAXPHYADDR) and IA32_EFER.NXE = `nxe`.
    /// A walk that finds one set faults with error code bit 3 (RSVD).
    @inlinable public func reservedBits(level: Int, physicalAddressBits: Int, nxe: Bool = true) -> UInt64 {
        // Bits MAXPHYADDR..51 are reserved in every present entry.
        var mask: UInt64 = physicalAddressBits >= 52 ? 0 : (((1 << 52) - 1) & ~((1 << UInt64(physicalAddressBits)) - 1))
        if !nxe { mask |= 1 << 63 }
        switch level {
        case 4, 5: mask |= 1 << 7  // PS must be 0 in PML4E/PML5E.
        case 3 where isLargePage: mask |= 0x3FFF_E000  // 1 GiB page: bits 29:13.
        case 2 where isLargePage: mask |= 0x1F_E000  // 2 MiB page: bits 20:13.
        default: break
        }
        return rawValue & mask
    }

    public var description: String {
        var s = "0x" + String(rawValue, radix: 16) + " ["
        let names: [(Flags, String)] = [
            (.present, "P"), (.writable, "W"), (.user, "U"), (.accessed, "A"), (.dirty, "D"),
            (.pageSize, "PS"), (.global, "G"), (.noExecute, "XD"),
        ]
        s += names.filter { has($0.0) }.map(\.1).joined(separator: " ")
        return s + "]"
    }
}

/// EPT paging-structure entries, bit-exact to the Intel SDM vol. 3, section 29.3.2
/// (EPT translation mechanism; tables "Format of an EPT PML4 entry" to "Format of an EPT
/// page-table entry").
public struct EPTEntry: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public var rawValue: UInt64
    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }

    public struct Flags: OptionSet, Hashable, Sendable {
        public var rawValue: UInt64
        @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }
        /// Bit 0: reads allowed.
        public static let read = Flags(rawValue: 1 << 0)
        /// Bit 1: writes allowed.
        public static let write = Flags(rawValue: 1 << 1)
        /// Bit 2: instruction fetches allowed (supervisor-mode fetches when mode-based
        /// execute control is on).
        public static let execute = Flags(rawValue: 1 << 2)
        /// Bit 6: ignore PAT memory type (leaf entries).
        public static let ignorePAT = Flags(rawValue: 1 << 6)
        /// Bit 7: the entry maps a 1 GiB (EPT PDPTE) or 2 MiB (EPT PDE) page.
        public static let pageSize = Flags(rawValue: 1 << 7)
        /// Bit 8: accessed (when EPTP bit 6 enables EPT A/D flags).
        public static let accessed = Flags(rawValue: 1 << 8)
        /// Bit 9: dirty (leaf entries, when EPT A/D flags are enabled).
        public static let dirty = Flags(rawValue: 1 << 9)
        /// Bit 10: user-mode instruction fetches allowed (mode-based execute control).
        public static let userExecute = Flags(rawValue: 1 << 10)
        /// Bit 63: suppress #VE.
        public static let suppressVE = Flags(rawValue: 1 << 63)

        public static let readWriteExecute: Flags = [.read, .write, .execute]
    }

    /// Bits 5:3, the EPT memory type of a leaf: 0 UC, 1 WC, 4 WT, 5 WP, 6 WB (2, 3, 7 reserved).
    public enum MemoryType: UInt64, Sendable {
        case uncacheable = 0, writeCombining = 1, writeThrough = 4, writeProtected = 5, writeBack = 6
    }

    public static let addressMask: UInt64 = 0x000F_FFFF_FFFF_F000

    @inlinable public init(frameAddress: UInt64, flags: Flags, memoryType: MemoryType? = nil) {
        rawValue = (frameAddress & Self.addressMask) | flags.rawValue | ((memoryType?.rawValue ?? 0) << 3)
    }

    @inlinable public var flags: Flags { Flags(rawValue: rawValue) }
    @inlinable public func has(_ f: Flags) -> Bool { rawValue & f.rawValue == f.rawValue }
    /// Not present: bits 2:0 all zero (SDM: "the entry is not present").
    @inlinable public var isPresent: Bool { rawValue & 7 != 0 }
    @inlinable public var isReadable: Bool { rawValue & 1 != 0 }
    @inlinable public var isWritable: Bool { rawValue & 2 != 0 }
    @inlinable public var isExecutable: Bool { rawValue & 4 != 0 }
    @inlinable public var isLargePage: Bool { rawValue & 0x80 != 0 }
    @inlinable public var isAccessed: Bool { rawValue & 0x100 != 0 }
    @inlinable public var isDirty: Bool { rawValue & 0x200 != 0 }
    @inlinable public var address: UInt64 { rawValue & Self.addressMask }
    @inlinable public func pageBase(_ size: PageSize) -> UInt64 { rawValue & Self.addressMask & ~size.offsetMask }
    @inlinable public var memoryTypeBits: UInt64 { (rawValue >> 3) & 7 }

    @inlinable public func setting(_ f: Flags) -> Self { Self(rawValue: rawValue | f.rawValue) }
    @inlinable public func clearing(_ f: Flags) -> Self { Self(rawValue: rawValue & ~f.rawValue) }

    /// True when the entry causes an EPT misconfiguration (SDM 29.3.3.1): present but
    /// write-allowed without read-allowed; reserved bits set; or, in a leaf, a reserved
    /// memory type (2, 3 or 7). Execute-only entries are allowed (the CPU supports them).
    @inlinable public func isMisconfigured(level: Int, physicalAddressBits: Int) -> Bool {
        guard isPresent else { return false }
        if rawValue & 3 == 2 { return true }
        var reserved: UInt64 = physicalAddressBits >= 52 ? 0 : (((1 << 52) - 1) & ~((1 << UInt64(physicalAddressBits)) - 1))
        let leaf = level == 1 || (level <= 3 && isLargePage)
        switch level {
        case 4, 5: reserved |= 0x78 | 0x80  // bits 6:3 and 7 reserved in PML4E/PML5E.
        case 3 where isLargePage: reserved |= 0x3FFF_F000  // 1 GiB page: bits 29:12.
        case 2 where isLargePage: reserved |= 0x1F_F000  // 2 MiB page: bits 20:12.
        case 2, 3: reserved |= 0x78  // non-leaf: bits 6:3 reserved.
        default: break
        }
        if rawValue & reserved != 0 { return true }
        if leaf { let t = memoryTypeBits; if t == 2 || t == 3 || t == 7 { return true } }
        return false
    }

    public var description: String {
        var s = "0x" + String(rawValue, radix: 16) + " ["
        let names: [(Flags, String)] = [
            (.read, "R"), (.write, "W"), (.execute, "X"), (.pageSize, "PS"), (.accessed, "A"), (.dirty, "D"),
        ]
        s += names.filter { has($0.0) }.map(\.1).joined(separator: " ")
        return s + "]"
    }
}

/// The page-fault (#PF, vector 14) error code pushed by the processor (SDM vol. 3, 4.7).
public struct PageFaultErrorCode: OptionSet, Hashable, Sendable, CustomStringConvertible {
    public var rawValue: UInt32
    @inlinable public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// Bit 0, P: 0 = not-present page; 1 = protection violation.
    public static let present = Self(rawValue: 1 << 0)
    /// Bit 1, W/R: the access was a write.
    public static let write = Self(rawValue: 1 << 1)
    /// Bit 2, U/S: the access was a user-mode (CPL 3) access.
    public static let user = Self(rawValue: 1 << 2)
    /// Bit 3, RSVD: a reserved bit was set in some paging-structure entry.
    public static let reservedBit = Self(rawValue: 1 << 3)
    /// Bit 4, I/D: the access was an instruction fetch.
    public static let instructionFetch = Self(rawValue: 1 << 4)
    /// Bit 5, PK: protection-key violation.
    public static let protectionKey = Self(rawValue: 1 << 5)
    /// Bit 6, SS: shadow-stack access.
    public static let shadowStack = Self(rawValue: 1 << 6)
    /// Bit 15, SGX: SGX-specific access-control violation.
    public static let sgx = Self(rawValue: 1 << 15)

    public var description: String {
        "0x" + String(rawValue, radix: 16) + "(" + (contains(.present) ? "P" : "NP")
            + (contains(.write) ? " W" : " R") + (contains(.user) ? " U" : " S")
            + (contains(.reservedBit) ? " RSVD" : "") + (contains(.instructionFetch) ? " I" : "") + ")"
    }
}

/// EPT-violation exit qualification bits (SDM vol. 3, table "Exit Qualification for EPT
/// Violations"): what the access was and what the EPT entries allowed.
public struct EPTViolationQualification: OptionSet, Hashable, Sendable {
    public var rawValue: UInt64
    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }
    public static let dataRead = Self(rawValue: 1 << 0)
    public static let dataWrite = Self(rawValue: 1 << 1)
    public static let instructionFetch = Self(rawValue: 1 << 2)
    /// Bits 3-5: the AND of the R/W/X bits of the EPT entries walked.
    public static let readable = Self(rawValue: 1 << 3)
    public static let writable = Self(rawValue: 1 << 4)
    public static let executable = Self(rawValue: 1 << 5)
    /// Bit 7: the guest linear address field is valid.
    public static let linearAddressValid = Self(rawValue: 1 << 7)
    /// Bit 8: the access was to the final translation (1) or to a guest paging structure (0).
    public static let finalTranslation = Self(rawValue: 1 << 8)
}

/// What a memory access does.
public enum AccessKind: UInt8, Sendable, Hashable, Codable {
    case read = 0, write = 1, execute = 2
}

/// The privilege level the access is made at.
public enum PrivilegeMode: UInt8, Sendable, Hashable {
    /// CPL 0-2.
    case supervisor = 0
    /// CPL 3.
    case user = 3
}
