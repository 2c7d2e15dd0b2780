import MemVirtCore

/// How a hypervisor learns which guest pages were written (log-dirty), per paging mode.
public enum DirtyTrackingMode: String, CaseIterable, Sendable {
    /// Shadow paging, KVM style: leaf shadow entries lose W; the first write to a page faults
    /// (fast path: `fast_page_fault` makes the spte writable and marks the gfn dirty); each
    /// harvest re-protects the dirty pages through the rmap.
    case shadowWriteProtect = "shadow-wp"
    /// Shadow paging, Xen style (xen-devel 2009, seed 004): each bitmap clean drops every shadow
    /// page (`shadow_blow_tables`); later accesses rebuild them through shadow faults.
    case shadowDropAll = "shadow-xen"
    /// Nested paging, write-protected EPT leaves: the first write to a page each round is an EPT
    /// violation handled on KVM's fast path.
    case nestedWriteProtect = "ept-wp"
    /// Nested paging with EPT dirty flags: no exits; each harvest scans every EPT leaf for D,
    /// clears it and flushes the guest-physical TLBs.
    case nestedDirtyBits = "ept-dbit"
    /// Nested paging with Intel PML: the CPU logs the gpa of each EPT D-bit 0->1 transition in a
    /// 512-entry buffer and exits when it is full (`vmx_flush_pml_buffer`).
    case nestedPML = "ept-pml"

    public var paging: PagingKind {
        switch self {
        case .shadowWriteProtect, .shadowDropAll: .shadow
        case .nestedWriteProtect, .nestedDirtyBits, .nestedPML: .nested
        }
    }
}

/// How userspace collects the dirty set (docs/references.md, KVM API).
public enum HarvestMethod: String, CaseIterable, Sendable {
    /// KVM_GET_DIRTY_LOG / KVM_CLEAR_DIRTY_LOG: one bit per page of the slot, copied and
    /// scanned whatever is dirty: cost grows with memory size.
    case bitmap
    /// KVM_CAP_DIRTY_LOG_RING: 16-byte entries per vCPU, harvested and reset
    /// (KVM_RESET_DIRTY_RINGS); cost grows with the dirty pages; a full ring exits.
    case ring
}

/// Cycles of the dirty-tracking machinery, each a named parameter with its source. Kept beside
/// `CostModel` (owned elsewhere) so the tracking work stays in its own files; the VM exit
/// itself is `CostModel.vmExitRoundTrip`.
public struct DirtyTrackingCosts: Sendable, Hashable {
    /// KVM's fast page-fault path for a write-protected, MMU-writable spte (fast_page_fault:
    /// lockless cmpxchg of W, mark_page_dirty), besides the exit: ~600 cycles. Estimate: the
    /// path takes no mmu_lock and does no guest walk. On our kvm_pvm hosts a re-dirtied page costs
    /// ~25 us (docs/references.md, Measured on our hosts), where the world switch and CPL0 emulation dominate.
    public var writeProtectFault: Double = 600
    /// Bitmap harvest, fixed part per GiB of guest memory: KVM_GET_DIRTY_LOG takes 5-13 us on an
    /// empty 1 GiB slot on our hosts (docs/references.md, Measured on our hosts): 9 us ≈ 27,000 cycles at 3 GHz.
    public var bitmapPerGiB: Double = 27_000
    /// Bitmap harvest per dirty page (copy, scan, re-protect): 1.9 ms for all 262,144 pages of
    /// 1 GiB dirty (docs/references.md, Measured on our hosts) ≈ 7.2 ns ≈ 22 cycles, plus KVM_CLEAR_DIRTY_LOG's re-protect
    /// (~2 ms all dirty ≈ 23 cycles): 45 cycles.
    public var bitmapPerDirtyPage: Double = 45
    /// Ring harvest per entry: 451 us harvest + 529 us KVM_RESET_DIRTY_RINGS for 50,000 pages
    /// (docs/references.md, Measured on our hosts) ≈ 19.6 ns ≈ 59 cycles.
    public var ringPerEntry: Double = 59
    /// Ring harvest fixed part (ioctl, ring heads): ~1 us ≈ 3,000 cycles (estimate).
    public var ringFixed: Double = 3_000
    /// Ring entries per vCPU before a soft-full exit: 4,096 (QEMU's usual dirty-ring-size) less
    /// KVM's 64-entry reserve (docs/references.md, Measured on our hosts: a 64 KiB ring exits every 4,032 entries).
    public var ringSoftFull: Int = 4_032
    /// Userspace handling of a ring-full exit (harvest the ring, re-enter): ~5,000 cycles
    /// (estimate, beside the exit; KVM_EXIT_DIRTY_RING_FULL returns to QEMU).
    public var ringFullHandler: Double = 5_000
    /// Intel PML buffer entries (SDM 28.3.6: 512 GPAs per 4 KiB page).
    public var pmlEntries: Int = 512
    /// Draining a full PML buffer into the dirty log (vmx_flush_pml_buffer: 512 x
    /// kvm_vcpu_mark_page_dirty at ~10 cycles), beside the exit: ~5,000 cycles (estimate).
    public var pmlDrain: Double = 5_000
    /// Scanning one EPT leaf entry for D and clearing it at harvest (tdp_mmu clear_dirty_gfn_range):
    /// ~10 cycles per 4 KiB leaf (8 bytes streamed plus a locked clear where set; estimate).
    public var dirtyBitScanPerLeaf: Double = 10
    /// Re-protecting one leaf (clear W or D) through the rmap / EPT: ~20 cycles (estimate; an
    /// atomic clear on a line that is usually not cached).
    public var reprotectPerEntry: Double = 20
    /// A remote TLB flush after re-protecting (kvm_flush_remote_tlbs: request + INVEPT/flush on
    /// one vCPU): ~2,000 cycles (estimate; an IPI round trip is ~1-2 us).
    public var remoteTLBFlush: Double = 2_000
    /// Zapping one shadow page when all shadows are dropped (Xen `shadow_blow_tables`: unhook,
    /// clear 512 entries, free): ~2,000 cycles (estimate; a 4 KiB clear ≈ 120 ns plus list
    /// maintenance).
    public var shadowPageZap: Double = 2_000
    /// Splitting one huge mapping into 512 4 KiB entries when logging starts (KVM eager split):
    /// ~6,000 cycles (estimate: a table allocation plus 512 stores).
    public var hugePageSplit: Double = 6_000
    public init() {}
}

/// What the tracking machinery did and cost, cumulatively (for reports).
public struct DirtyTrackingStats: Sendable, Hashable {
    /// Write-protection faults fixed on the fast path (shadow, EPT write-protect).
    public var writeFaults: UInt64 = 0
    public var writeFaultCycles: Double = 0
    /// Shadow faults taken while logging (Xen: the re-shadowing after each drop).
    public var reshadowFaults: UInt64 = 0
    public var reshadowCycles: Double = 0
    /// Shadow pages dropped at harvest (Xen style) and their zap cycles.
    public var shadowPagesDropped: UInt64 = 0
    public var dropCycles: Double = 0
    /// PML-full and ring-full exits and their cycles.
    public var logFullExits: UInt64 = 0
    public var logFullCycles: Double = 0
    /// Harvests, their cycles (spent by the migration thread), pages reported dirty.
    public var harvests: UInt64 = 0
    public var harvestCycles: Double = 0
    public var pagesHarvested: UInt64 = 0
    /// Leaves re-protected and TLB flushes.
    public var reprotected: UInt64 = 0
    public var hugePagesSplit: UInt64 = 0
    public init() {}

    /// Cycles the vCPU paid (faults and exits).
    public var guestCycles: Double { writeFaultCycles + reshadowCycles + logFullCycles }
    /// Everything tracking cost.
    public var totalCycles: Double { guestCycles + harvestCycles + dropCycles }

    public static func - (a: Self, b: Self) -> Self {
        var r = Self()
        r.writeFaults = a.writeFaults - b.writeFaults
        r.writeFaultCycles = a.writeFaultCycles - b.writeFaultCycles
        r.reshadowFaults = a.reshadowFaults - b.reshadowFaults
        r.reshadowCycles = a.reshadowCycles - b.reshadowCycles
        r.shadowPagesDropped = a.shadowPagesDropped - b.shadowPagesDropped
        r.dropCycles = a.dropCycles - b.dropCycles
        r.logFullExits = a.logFullExits - b.logFullExits
        r.logFullCycles = a.logFullCycles - b.logFullCycles
        r.harvests = a.harvests - b.harvests
        r.harvestCycles = a.harvestCycles - b.harvestCycles
        r.pagesHarvested = a.pagesHarvested - b.pagesHarvested
        r.reprotected = a.reprotected - b.reprotected
        r.hugePagesSplit = a.hugePagesSplit - b.hugePagesSplit
        return r
    }
}

/// A per-gfn bit set over guest-physical memory.
public struct GfnBitmap: Sendable {
    public private(set) var words: [UInt64]
    public let frames: UInt64
    public init(frames: UInt64) {
        self.frames = frames
        words = Array(repeating: 0, count: Int((frames + 63) / 64))
    }
    @inline(__always) public func contains(_ gfn: UInt64) -> Bool {
        gfn < frames && words[Int(gfn >> 6)] & (1 << (gfn & 63)) != 0
    }
    /// Sets the bit; true if it was clear.
    @inline(__always) @discardableResult public mutating func insert(_ gfn: UInt64) -> Bool {
        let w = Int(gfn >> 6), b: UInt64 = 1 << (gfn & 63)
        if words[w] & b != 0 { return false }
        words[w] |= b
        return true
    }
    @inline(__always) public mutating func remove(_ gfn: UInt64) {
        words[Int(gfn >> 6)] &= ~(1 << (gfn & 63))
    }
    public mutating func removeAll() { for i in words.indices { words[i] = 0 } }
    /// The set gfns, ascending.
    public var members: [UInt64] {
        var out: [UInt64] = []
        for (i, w0) in words.enumerated() where w0 != 0 {
            var w = w0
            while w != 0 {
                let b = UInt64(w.trailingZeroBitCount)
                out.append(UInt64(i) << 6 | b)
                w &= w - 1
            }
        }
        return out
    }
    public var count: Int { words.reduce(0) { $0 + $1.nonzeroBitCount } }
}

/// The log-dirty interface a migration drives, one implementation per paging mode.
public protocol DirtyTracker: AnyObject {
    var trackingMode: DirtyTrackingMode { get }
    /// 4 KiB guest frames (the memslot size).
    var guestFrames: UInt64 { get }
    /// Starts logging: huge mappings split, every page protected (the caller sends every
    /// backed page in the first round).
    func startLogging(cpu: ModelCPU, method: HarvestMethod, groupSize: Int, costs: DirtyTrackingCosts)
    /// The gfns dirtied since the last harvest (ascending), re-protected; counts and costs
    /// in `trackingStats` (the harvest's own cycles are not charged to the vCPU).
    func harvest(cpu: ModelCPU) -> [UInt64]
    func stopLogging(cpu: ModelCPU)
    var trackingStats: DirtyTrackingStats { get }
    /// Host-physical page base holding `gfn` now, nil if the guest never touched it (reads as
    /// zero). No side effects (the migration thread reads through its own mapping).
    func sourcePage(_ gfn: UInt64) -> UInt64?
    /// The memory `sourcePage` addresses.
    var sourceMemory: PhysicalMemory { get }
    /// Every gfn the source has backed (ascending).
    func backedFrames() -> [UInt64]
}

extension DirtyTracker {
    /// A hash of all guest-physical memory, page by page (a page never backed hashes as zeros).
    public func guestMemoryHash() -> UInt64 {
        var h: UInt64 = FNV1a.offsetBasis
        let zero = GuestMemoryHash.zeroPageHash
        for gfn in 0..<guestFrames {
            if let p = sourcePage(gfn) {
                var ph: UInt64 = FNV1a.offsetBasis
                sourceMemory.hash(p, bytes: 4096, into: &ph)
                h = GuestMemoryHash.combine(h, ph)
            } else {
                h = GuestMemoryHash.combine(h, zero)
            }
        }
        return h
    }
}

/// The whole-memory hash both sides compute (pages in gfn order).
public enum GuestMemoryHash {
    public static let zeroPageHash: UInt64 = {
        var h: UInt64 = FNV1a.offsetBasis
        for _ in 0..<512 { h = FNV1a.step(h, 0) }
        return h
    }()
    @inline(__always) public static func combine(_ h: UInt64, _ page: UInt64) -> UInt64 {
        (h ^ page) &* 0x9E37_79B9_7F4A_7C15 &+ 0x632B_E59B_D9B4_E019
    }
}
