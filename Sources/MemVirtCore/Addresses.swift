/// Typed addresses: one struct per address space, so a guest-virtual address can never be
/// handed to a function that wants a host-physical one. Arithmetic is by named methods
/// (`adding(_:)`, `alignedDown(to:)`), as in rust-vmm's vm-memory `Address` trait.

/// The operations every address space shares.
public protocol MemoryAddress: RawRepresentable, Hashable, Comparable, Sendable,
    CustomStringConvertible where RawValue == UInt64
{
    init(rawValue: UInt64)
}

extension MemoryAddress {
    @inlinable public init(_ raw: UInt64) { self.init(rawValue: raw) }

    /// `self + bytes`, or nil on overflow.
    @inlinable public func adding(_ bytes: UInt64) -> Self? {
        let (r, o) = rawValue.addingReportingOverflow(bytes)
        return o ? nil : Self(rawValue: r)
    }
    /// `self + bytes`; traps on overflow (a bug, never input).
    @inlinable public func advanced(by bytes: UInt64) -> Self { Self(rawValue: rawValue + bytes) }
    /// Distance from `base` in bytes, or nil when `self < base`.
    @inlinable public func offset(from base: Self) -> UInt64? {
        rawValue >= base.rawValue ? rawValue - base.rawValue : nil
    }
    @inlinable public func alignedDown(to size: PageSize) -> Self { Self(rawValue: rawValue & ~size.offsetMask) }
    @inlinable public func isAligned(to size: PageSize) -> Bool { rawValue & size.offsetMask == 0 }
    /// Byte offset inside the page of `size` that holds this address.
    @inlinable public func pageOffset(_ size: PageSize) -> UInt64 { rawValue & size.offsetMask }
    /// Page number in units of 4 KiB (a frame number for physical spaces).
    @inlinable public var pageNumber: UInt64 { rawValue >> 12 }

    @inlinable public static func < (a: Self, b: Self) -> Bool { a.rawValue < b.rawValue }
    public var description: String { "0x" + String(rawValue, radix: 16) }
}

/// An address the guest's programs use; translated by the guest's page tables.
public struct GuestVirtualAddress: MemoryAddress {
    public var rawValue: UInt64
    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }

    /// The 9-bit table index at paging `level` (1 = PT, 2 = PD, 3 = PDPT, 4 = PML4, 5 = PML5).
    @inlinable public func tableIndex(level: Int) -> Int {
        Int(truncatingIfNeeded: (rawValue >> UInt64(12 + 9 * (level - 1))) & 0x1ff)
    }
    /// True when bits 63..(bits-1) are all equal (x86-64 canonical form for 48 or 57 bits).
    @inlinable public func isCanonical(bits: Int) -> Bool {
        let top = Int64(bitPattern: rawValue) >> Int64(bits - 1)
        return top == 0 || top == -1
    }
}

/// An address in the memory the guest believes is physical (KVM: gpa; its page is a gfn).
public struct GuestPhysicalAddress: MemoryAddress {
    public var rawValue: UInt64
    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }
    @inlinable public var frame: GuestFrameNumber { GuestFrameNumber(rawValue: rawValue >> 12) }
    /// The 9-bit EPT table index at `level` (1 = EPT PT ... 4 = EPT PML4, 5 = EPT PML5).
    @inlinable public func tableIndex(level: Int) -> Int {
        Int(truncatingIfNeeded: (rawValue >> UInt64(12 + 9 * (level - 1))) & 0x1ff)
    }
}

/// An address in the machine's real memory (KVM: the pfn's physical address).
public struct HostPhysicalAddress: MemoryAddress {
    public var rawValue: UInt64
    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }
    @inlinable public var frame: HostFrameNumber { HostFrameNumber(rawValue: rawValue >> 12) }
}

/// An address in the VMM process (KVM: hva, where a memory slot is mmap'd).
public struct HostVirtualAddress: MemoryAddress {
    public var rawValue: UInt64
    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }
}

/// A 4 KiB guest-physical frame number (KVM: gfn).
public struct GuestFrameNumber: RawRepresentable, Hashable, Comparable, Sendable {
    public var rawValue: UInt64
    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }
    @inlinable public var address: GuestPhysicalAddress { GuestPhysicalAddress(rawValue: rawValue << 12) }
    @inlinable public static func < (a: Self, b: Self) -> Bool { a.rawValue < b.rawValue }
}

/// A 4 KiB host-physical frame number (KVM: pfn).
public struct HostFrameNumber: RawRepresentable, Hashable, Comparable, Sendable {
    public var rawValue: UInt64
    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }
    @inlinable public var address: HostPhysicalAddress { HostPhysicalAddress(rawValue: rawValue << 12) }
    @inlinable public static func < (a: Self, b: Self) -> Bool { a.rawValue < b.rawValue }
}

/// The size of a page or large page.
public enum PageSize: Int, CaseIterable, Sendable, Codable, CustomStringConvertible {
    /// 4 KiB: a PTE at level 1.
    case size4K = 12
    /// 2 MiB: a PDE with PS=1 (level 2).
    case size2M = 21
    /// 1 GiB: a PDPTE with PS=1 (level 3).
    case size1G = 30

    @inlinable public var shift: Int { rawValue }
    @inlinable public var bytes: UInt64 { 1 << UInt64(rawValue) }
    @inlinable public var offsetMask: UInt64 { bytes - 1 }
    /// The paging level whose entry maps a page of this size (1, 2 or 3).
    @inlinable public var leafLevel: Int { (rawValue - 12) / 9 + 1 }
    /// Number of 4 KiB frames in one page of this size.
    @inlinable public var frames: UInt64 { bytes >> 12 }

    @inlinable public init?(leafLevel: Int) {
        switch leafLevel {
        case 1: self = .size4K
        case 2: self = .size2M
        case 3: self = .size1G
        default: return nil
        }
    }

    /// "4K", "2M", "1G" (KiB/MiB/GiB); also accepts "4KiB", "2MiB", "1GiB", "4k".
    public init?(parsing text: String) {
        switch text.lowercased() {
        case "4k", "4kib", "4096": self = .size4K
        case "2m", "2mib": self = .size2M
        case "1g", "1gib": self = .size1G
        default: return nil
        }
    }

    public var description: String {
        switch self {
        case .size4K: "4K"
        case .size2M: "2M"
        case .size1G: "1G"
        }
    }
}
