import CKVM
import MemVirtCore
#if canImport(Glibc)
import Glibc
#endif

/// A KVM memory slot: a guest-physical range backed by a `GuestMemoryRegion`.
public struct MemorySlot: Sendable {
    /// Slot flags. The C names are `KVM_MEM_LOG_DIRTY_PAGES` and `KVM_MEM_READONLY`.
    public struct Flags: OptionSet, Sendable {
        public var rawValue: UInt32
        public init(rawValue: UInt32) { self.rawValue = rawValue }
        /// `KVM_MEM_LOG_DIRTY_PAGES`: KVM records guest writes in a dirty bitmap or ring.
        public static let logDirtyPages = Flags(rawValue: 1)
        /// `KVM_MEM_READONLY`: guest writes exit as MMIO.
        public static let readOnly = Flags(rawValue: 2)
    }
    public var id: UInt32
    public var region: GuestMemoryRegion
    public var flags: Flags
    /// 4 KiB pages in the slot.
    public var pages: UInt64 { region.size / 4096 }
}

/// A VM (`KVM_CREATE_VM`): memory slots, dirty logging, stats. Owns its fd; the slots' memory
/// lives as long as the VM does.
public final class VirtualMachine: @unchecked Sendable {
    public let kvm: KVM
    let fd: FileDescriptor
    public private(set) var slots: [MemorySlot] = []
    /// Bytes of each vCPU's dirty ring, when enabled (before any vCPU).
    public private(set) var dirtyRingBytes: Int = 0
    public private(set) var manualDirtyProtect = false
    public private(set) var hasIRQChip = false
    var vcpuCount = 0

    public init(kvm: KVM) throws(KVMError) {
        self.kvm = kvm
        fd = FileDescriptor(try checked(ckvm_create_vm(kvm.fd.raw, 0), "KVM_CREATE_VM"))
        // VMX needs a 3-page TSS area below 4 GiB for real-mode emulation; others ignore it.
        if kvm.check(.setTSSAddress) > 0 {
            let r = ckvm_set_tss_addr(fd.raw, 0xfffb_d000)
            if r < 0 && kvm.platform == .vmx { throw KVMError.call("KVM_SET_TSS_ADDR", Errno(rawValue: -r)) }
        }
    }

    /// `KVM_SET_USER_MEMORY_REGION`: makes `region` guest-physical memory as slot `id`.
    public func addSlot(id: UInt32, region: GuestMemoryRegion, flags: MemorySlot.Flags = []) throws(KVMError) {
        var r = kvm_userspace_memory_region(
            slot: id, flags: flags.rawValue, guest_phys_addr: region.guestPhysical.rawValue,
            memory_size: region.size, userspace_addr: region.hostAddress.rawValue)
        _ = try checked(ckvm_set_user_memory_region(fd.raw, &r), "KVM_SET_USER_MEMORY_REGION(slot \(id))")
        slots.removeAll { $0.id == id }
        slots.append(MemorySlot(id: id, region: region, flags: flags))
    }

    /// Changes a slot's flags (e.g. turns dirty logging on or off) with the same memory.
    public func setSlotFlags(id: UInt32, _ flags: MemorySlot.Flags) throws(KVMError) {
        guard let s = slots.first(where: { $0.id == id }) else { throw KVMError.invalid("no memory slot \(id)") }
        try addSlot(id: id, region: s.region, flags: flags)
    }

    /// The slot backing `gpa`.
    public func region(containing gpa: GuestPhysicalAddress, length: UInt64 = 1) -> GuestMemoryRegion? {
        slots.first { $0.region.contains(gpa, length: length) }?.region
    }

    /// `KVM_CREATE_IRQCHIP`: in-kernel LAPIC/IOAPIC/PIC (needed for async page faults).
    public func createIRQChip() throws(KVMError) {
        _ = try checked(ckvm_create_irqchip(fd.raw), "KVM_CREATE_IRQCHIP")
        hasIRQChip = true
    }

    /// `KVM_ENABLE_CAP(KVM_CAP_HALT_POLL, 0)`: a halted vCPU sleeps at once instead of polling
    /// for up to halt_poll_ns (200 us by default), which would hide (or fake) overlap.
    public func disableHaltPolling() throws(KVMError) {
        guard kvm.check(.haltPoll) > 0 else { throw KVMError.unavailable("KVM_CAP_HALT_POLL is not supported") }
        var cap = kvm_enable_cap()
        cap.cap = UInt32(KVMCapability.haltPoll.rawValue)
        cap.args.0 = 0
        _ = try checked(ckvm_enable_cap(fd.raw, &cap), "KVM_ENABLE_CAP(KVM_CAP_HALT_POLL, 0)")
    }

    /// `KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING, bytes)`: a dirty ring of `bytes` per vCPU.
    /// Must come before the first vCPU.
    public func enableDirtyRing(bytes: Int) throws(KVMError) {
        guard vcpuCount == 0 else { throw KVMError.invalid("the dirty ring must be enabled before any vCPU is created") }
        let max = kvm.check(.dirtyLogRing)
        guard max > 0 else { throw KVMError.unavailable("KVM_CAP_DIRTY_LOG_RING is not supported") }
        guard bytes > 0, bytes <= max, bytes & (bytes - 1) == 0 else {
            throw KVMError.invalid("dirty ring of \(bytes) bytes: must be a power of two up to \(max)")
        }
        var cap = kvm_enable_cap()
        cap.cap = UInt32(KVMCapability.dirtyLogRing.rawValue)
        cap.args.0 = UInt64(bytes)
        _ = try checked(ckvm_enable_cap(fd.raw, &cap), "KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING, \(bytes))")
        dirtyRingBytes = bytes
    }

    /// `KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)`: KVM_GET_DIRTY_LOG no longer
    /// re-protects; KVM_CLEAR_DIRTY_LOG does, for the pages asked.
    public func enableManualDirtyProtect(initiallySet: Bool = false) throws(KVMError) {
        guard kvm.check(.manualDirtyLogProtect2) > 0 else {
            throw KVMError.unavailable("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is not supported")
        }
        var cap = kvm_enable_cap()
        cap.cap = UInt32(KVMCapability.manualDirtyLogProtect2.rawValue)
        cap.args.0 = UInt64(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE) | (initiallySet ? UInt64(KVM_DIRTY_LOG_INITIALLY_SET) : 0)
        _ = try checked(ckvm_enable_cap(fd.raw, &cap), "KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)")
        manualDirtyProtect = true
    }

    /// `KVM_GET_DIRTY_LOG`: one bit per 4 KiB page of the slot, in 64-bit words.
    public func getDirtyLog(slot: UInt32, into bitmap: inout [UInt64]) throws(KVMError) {
        let r = bitmap.withUnsafeMutableBytes { b in
            var log = kvm_dirty_log()
            log.slot = slot
            log.dirty_bitmap = b.baseAddress
            return ckvm_get_dirty_log(fd.raw, &log)
        }
        _ = try checked(r, "KVM_GET_DIRTY_LOG(slot \(slot))")
    }

    /// `KVM_CLEAR_DIRTY_LOG`: re-protects the pages set in `bitmap` (first page a multiple of 64).
    public func clearDirtyLog(slot: UInt32, firstPage: UInt64, pages: UInt32, bitmap: inout [UInt64]) throws(KVMError) {
        let r = bitmap.withUnsafeMutableBytes { b in
            var c = kvm_clear_dirty_log()
            c.slot = slot
            c.num_pages = pages
            c.first_page = firstPage
            c.dirty_bitmap = b.baseAddress
            return ckvm_clear_dirty_log(fd.raw, &c)
        }
        _ = try checked(r, "KVM_CLEAR_DIRTY_LOG(slot \(slot))")
    }

    /// `KVM_RESET_DIRTY_RINGS`: re-protects the harvested ring entries; returns their count.
    @discardableResult public func resetDirtyRings() throws(KVMError) -> Int {
        Int(try checked(ckvm_reset_dirty_rings(fd.raw), "KVM_RESET_DIRTY_RINGS"))
    }

    /// The VM's binary stats (`KVM_GET_STATS_FD`).
    public func stats() throws(KVMError) -> StatsReader {
        try StatsReader(fd: FileDescriptor(try checked(ckvm_get_stats_fd(fd.raw), "KVM_GET_STATS_FD(vm)")))
    }

    /// `KVM_CREATE_VCPU`, with the vCPU's kvm_run (and dirty ring) mapped.
    public func createVCPU(id: Int) throws(KVMError) -> VirtualCPU {
        let v = try VirtualCPU(vm: self, id: id)
        vcpuCount += 1
        return v
    }
}
