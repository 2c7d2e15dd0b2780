import CKVM
import MemVirtCore

/// How the workload slot's dirty pages are tracked.
public enum DirtyLogMode: String, Sendable, CaseIterable {
    case off
    /// KVM_GET_DIRTY_LOG (get-and-clear: KVM re-protects on every get).
    case bitmap
    /// KVM_GET_DIRTY_LOG + KVM_CLEAR_DIRTY_LOG with KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.
    case bitmapManual = "bitmap-manual"
    /// KVM_CAP_DIRTY_LOG_RING: per-vCPU rings of dirtied gfns, KVM_RESET_DIRTY_RINGS.
    case ring
}

/// One harvest of dirty pages: page indices into the slot, and what it cost.
public struct DirtyHarvest: Sendable {
    public var mode: DirtyLogMode
    /// Dirty 4 KiB pages, as indices into the slot, ascending, each once.
    public var pages: [UInt64]
    /// Ring entries read (a page can repeat across ring-full harvests); bitmap: = pages.count.
    public var entries: UInt64
    /// KVM_GET_DIRTY_LOG or the ring scan, nanoseconds (summed over harvests).
    public var harvestNanos: UInt64
    /// KVM_CLEAR_DIRTY_LOG or KVM_RESET_DIRTY_RINGS, nanoseconds (0 for get-and-clear).
    public var resetNanos: UInt64
    /// Harvests made (ring: one per ring-full exit plus the final one).
    public var harvests: Int

    public var json: JSONValue {
        .object([
            ("mode", .string(mode.rawValue)), ("dirty_pages", .uint(UInt64(pages.count))), ("entries", .uint(entries)),
            ("harvests", .int(Int64(harvests))), ("harvest_us", .double(Double(harvestNanos) / 1e3)),
            ("reset_us", .double(Double(resetNanos) / 1e3)),
        ])
    }
}

/// The bitmap log of one slot: KVM_GET_DIRTY_LOG, then (manual protect) KVM_CLEAR_DIRTY_LOG
/// of exactly the pages reported, so they are write-protected again.
public struct DirtyBitmapLog {
    let vm: VirtualMachine
    let slot: UInt32
    let pages: UInt64

    public init(vm: VirtualMachine, slot: UInt32) throws(KVMError) {
        guard let s = vm.slots.first(where: { $0.id == slot }) else { throw KVMError.invalid("no memory slot \(slot)") }
        guard s.flags.contains(.logDirtyPages) else { throw KVMError.invalid("slot \(slot) does not log dirty pages") }
        self.vm = vm
        self.slot = slot
        pages = s.pages
    }

    /// One harvest.
    public func harvest() throws(KVMError) -> DirtyHarvest {
        var bitmap = [UInt64](repeating: 0, count: Int((pages + 63) / 64))
        let t0 = monotonicNanoseconds()
        try vm.getDirtyLog(slot: slot, into: &bitmap)
        let t1 = monotonicNanoseconds()
        var t2 = t1
        if vm.manualDirtyProtect {
            try vm.clearDirtyLog(slot: slot, firstPage: 0, pages: UInt32(pages), bitmap: &bitmap)
            t2 = monotonicNanoseconds()
        }
        var out: [UInt64] = []
        for (w, word) in bitmap.enumerated() where word != 0 {
            var x = word
            while x != 0 {
                out.append(UInt64(w * 64 + x.trailingZeroBitCount))
                x &= x - 1
            }
        }
        return DirtyHarvest(mode: vm.manualDirtyProtect ? .bitmapManual : .bitmap, pages: out, entries: UInt64(out.count),
                            harvestNanos: t1 - t0, resetNanos: t2 - t1, harvests: 1)
    }
}

/// Collects dirty-ring entries of every vCPU (`struct kvm_dirty_gfn`: flags, slot, offset).
/// Protocol (api.rst): read `flags` with acquire; DIRTY set means the entry is ours; set
/// RESET with release; then KVM_RESET_DIRTY_RINGS re-protects the pages.
public final class DirtyRingCollector: @unchecked Sendable {
    let g: GuestVM
    let slot: UInt32
    var seen = Set<UInt64>()
    var entries: UInt64 = 0
    var harvestNanos: UInt64 = 0
    var resetNanos: UInt64 = 0
    var harvests = 0

    public init(vm: GuestVM, slot: UInt32 = GuestLayout.dataSlot) {
        g = vm
        self.slot = slot
    }

    /// Harvests one vCPU's ring, then resets the rings.
    public func harvest(_ v: VirtualCPU) throws(KVMError) {
        guard let ring = v.ringMapping else { throw KVMError.invalid("the VM has no dirty ring") }
        let count = UInt32(ring.size / 16)
        let t0 = monotonicNanoseconds()
        while true {
            let e = ring.base + Int(v.ringFetchIndex % count) * 16
            let flagsPtr = e.assumingMemoryBound(to: UInt32.self)
            // SAFETY: the entry lies in the ring mapping; ordering per api.rst.
            let flags = ckvm_load_acquire_u32(flagsPtr)
            if flags & 1 == 0 { break }
            let s = e.load(fromByteOffset: 4, as: UInt32.self)
            let offset = e.load(fromByteOffset: 8, as: UInt64.self)
            if s & 0xffff == slot { seen.insert(offset) }
            entries += 1
            ckvm_store_release_u32(flagsPtr, 2)
            v.ringFetchIndex &+= 1
        }
        let t1 = monotonicNanoseconds()
        try g.vm.resetDirtyRings()
        let t2 = monotonicNanoseconds()
        harvestNanos += t1 - t0
        resetNanos += t2 - t1
        harvests += 1
    }

    /// Harvests every vCPU and returns everything collected since the last `finish`.
    public func finish() throws(KVMError) -> DirtyHarvest {
        for v in g.vcpus { try harvest(v) }
        let h = DirtyHarvest(mode: .ring, pages: seen.sorted(), entries: entries, harvestNanos: harvestNanos,
                             resetNanos: resetNanos, harvests: harvests)
        seen.removeAll()
        entries = 0; harvestNanos = 0; resetNanos = 0; harvests = 0
        return h
    }
}
