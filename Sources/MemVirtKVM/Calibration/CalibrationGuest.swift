import CKVM
import MemVirtCore
import MemVirtGuest
#if canImport(Glibc)
import Glibc
#endif

/// The guest side of `kvm calibrate`: timed events run by the guest runtime's
/// MEMVIRT_CMD_CALIBRATE (CPL3, one `lfence; rdtsc` pair around each event), CPL0 loops
/// entered directly by the VMM, and the few page-table and IDT edits the calibration guest
/// needs. Every edit of guest tables happens before the VM's first KVM_RUN (a shadow MMU does
/// not see the VMM's later writes).
extension GuestVM {
    /// The guest TSC frequency (KVM_GET_TSC_KHZ) in ticks per nanosecond.
    func tscTicksPerNano(vcpu index: Int = 0) throws(KVMError) -> Double {
        let khz = ckvm_get_tsc_khz(vcpus[index].fd.raw)
        guard khz > 0 else { throw KVMError.call("KVM_GET_TSC_KHZ (the guest TSC rate, to convert the guest's timings)", Errno(rawValue: -khz)) }
        return Double(khz) / 1e6
    }

    /// Runs MEMVIRT_CMD_CALIBRATE `op` for `count` events on vCPU 0 and returns each event's
    /// TSC ticks. The output goes to the runtime's list area (`listCapacity` >= count).
    /// MMIO exits and pings are answered (the write is dropped); anything else is an error.
    /// `exits` counts the exits the VMM saw ("vmm_io_exits" for pings, "vmm_mmio_exits").
    func calibrateEvents(op: memvirt_calibrate_op, count: Int, base: UInt64, stride: UInt64 = 4096,
                         salt: UInt64 = 0, other: UInt64 = 0, exits: inout [String: UInt64]) throws(KVMError) -> [UInt64] {
        let outputs = [MEMVIRT_CAL_PAIR_TOUCH, MEMVIRT_CAL_PAIR_PF, MEMVIRT_CAL_PAIR_INVLPG_STUB, MEMVIRT_CAL_PAIR_CR3_STUB, MEMVIRT_CAL_PAIR_CR3_SWITCH_STUB, MEMVIRT_CAL_PAIR_STRING_ROOT].contains(op) ? 2 * count : count
        guard count >= 1, outputs <= layout.listCapacity else {
            throw KVMError.invalid("calibration batch of \(count) events (\(outputs) timings): the guest's list area holds 1...\(layout.listCapacity)")
        }
        var m = GuestVM.command(MEMVIRT_CMD_CALIBRATE)
        m.pattern = UInt64(op.rawValue)
        m.base = base
        m.count = UInt64(count)
        m.stride = stride
        m.salt = salt
        m.table = other
        m.list = layout.list
        try setMailbox(0, m)
        let v = vcpus[0]
        while true {
            switch try v.runOnce() {
            case .ioOut(let port, _, let data):
                switch Int32(port) {
                case MEMVIRT_PORT_DONE:
                    if data != UInt64(MEMVIRT_STATUS_OK.rawValue) { throw KVMError.guest(.badStatus(data)) }
                    var out = [UInt64](repeating: 0, count: outputs)
                    for i in 0..<outputs { out[i] = try runtime.load(UInt64.self, at: GuestPhysicalAddress(rawValue: layout.list + UInt64(8 * i))) }
                    return out
                case MEMVIRT_PORT_PING: exits["vmm_io_exits", default: 0] += 1
                case MEMVIRT_PORT_MARK: continue
                case MEMVIRT_PORT_VECTOR_BASE..<(MEMVIRT_PORT_VECTOR_BASE + MEMVIRT_TRAP_VECTORS):
                    throw KVMError.guest(try trapReport(v, vector: UInt8(Int32(port) - MEMVIRT_PORT_VECTOR_BASE)))
                default: throw KVMError.guest(.unknownPort(port: port, isWrite: true, size: 0, data: data))
                }
            case .mmio(let a, let w, let l):
                guard op == MEMVIRT_CAL_MMIO else { throw KVMError.guest(.outsideMemory(address: a, isWrite: w, length: l)) }
                exits["vmm_mmio_exits", default: 0] += 1
            case .interrupted: continue
            case .ioIn(let port, let size): throw KVMError.guest(.unknownPort(port: port, isWrite: false, size: size, data: 0))
            case .shutdown: throw KVMError.guest(.tripleFault(rip: (try? v.getRegs().rip) ?? 0))
            case .halt: throw KVMError.guest(.unexpectedHalt(rip: (try? v.getRegs().rip) ?? 0))
            case .failEntry(let r): throw KVMError.guest(.failEntry(reason: r))
            case .internalError(let s): throw KVMError.guest(.internalError(suberror: s))
            case .dirtyRingFull: throw KVMError.invalid("dirty ring full during a calibration batch (batches stay below the ring's size)")
            case .other(let r): throw KVMError.guest(.unexpectedExit(reason: r))
            }
        }
    }

    /// One KVM_RUN of a CPL0 routine of the image at `offset` (rcx, rdi, rdx set), in host
    /// nanoseconds; then the vCPU is put back at CPL3 at the entry (KVM_SET_REGS does not
    /// restore the privilege level: the CPL3 segments go back first).
    func timeCPL0(offset: UInt64, rcx: UInt64, rdi: UInt64 = 0, rdx: UInt64 = 0, endsInHalt: Bool = false) throws(KVMError) -> UInt64 {
        let v = vcpus[0]
        let saved = try v.getSregs()
        var s = saved
        s.cs = kvm_segment(base: 0, limit: 0xffff_ffff, selector: 0x08, type: 11, present: 1, dpl: 0, db: 0, s: 1, l: 1, g: 1, avl: 0, unusable: 0, padding: 0)
        let d = kvm_segment(base: 0, limit: 0xffff_ffff, selector: 0x10, type: 3, present: 1, dpl: 0, db: 1, s: 1, l: 0, g: 1, avl: 0, unusable: 0, padding: 0)
        s.ss = d; s.ds = d; s.es = d
        try v.setSregs(s)
        var r = kvm_regs()
        r.rip = GuestLayout.image + offset
        r.rsp = GuestLayout.kernelStack(v.id) - 8
        r.rcx = max(1, rcx)
        r.rdi = rdi
        r.rdx = rdx
        r.rflags = 0x2
        try v.setRegs(r)
        let t0 = monotonicNanoseconds()
        let exit = try v.runOnce()
        let t1 = monotonicNanoseconds()
        try v.setSregs(saved)
        try resetRegisters(v)
        if endsInHalt {
            guard case .halt = exit else { throw KVMError.invalid("CPL0 routine at image offset \(offset) ended with \(exit), expected a HLT exit") }
            return t1 - t0
        }
        guard case .ioOut(let port, _, _) = exit, port == UInt16(MEMVIRT_PORT_MARK) else {
            throw KVMError.invalid("CPL0 routine at image offset \(offset) ended with \(exit), expected a MARK exit")
        }
        return t1 - t0
    }

    func calibrateEvents(op: memvirt_calibrate_op, count: Int, base: UInt64, stride: UInt64 = 4096,
                         salt: UInt64 = 0, other: UInt64 = 0) throws(KVMError) -> [UInt64] {
        var ignored: [String: UInt64] = [:]
        return try calibrateEvents(op: op, count: count, base: base, stride: stride, salt: salt, other: other, exits: &ignored)
    }

    var calibInvlpgOffset: UInt64 { image.calib_invlpg_offset }
    var calibCR3Offset: UInt64 { image.calib_cr3_offset }
    var cpl0LoopOffset: UInt64 { image.cpl0_loop_offset }
    var calibHltOffset: UInt64 { image.calib_hlt_offset }

    /// Guest-physical address of the 8-byte entry at `level` (1 = PTE ... 4 = PML4E) that maps
    /// `gva` in the tables the VMM built (the runtime is identity-mapped, so it is also the
    /// entry's GVA).
    func pageTableEntryAddress(_ gva: GuestVirtualAddress, level: Int) throws(KVMError) -> UInt64 {
        var table = layout.pageTables
        var l = 4
        while true {
            let slot = table + UInt64(gva.tableIndex(level: l)) * 8
            if l == level { return slot }
            let e = PageTableEntry(rawValue: try runtime.load(UInt64.self, at: GuestPhysicalAddress(rawValue: slot)))
            guard e.isPresent, !e.isLargePage else { throw KVMError.invalid("page tables: \(gva) has no level-\(level) entry") }
            table = e.address
            l -= 1
        }
    }

    /// Points vector 14 (#PF) at the calibration handler. Before the first KVM_RUN only.
    func installCalibrationPageFaultHandler() throws(KVMError) {
        let target = GuestLayout.image + image.calib_pf_offset
        let lo = (target & 0xffff) | (0x08 << 16) | (UInt64(0x8e) << 40) | (((target >> 16) & 0xffff) << 48)
        try runtime.write(array: [lo, target >> 32], at: GuestPhysicalAddress(rawValue: GuestLayout.idt + 14 * 16))
    }

    /// Clears the present bit of the guest PTE of `gva` (a 4K data page). Before the first
    /// KVM_RUN only.
    func markNotPresent(_ gva: GuestVirtualAddress) throws(KVMError) {
        let a = GuestPhysicalAddress(rawValue: try pageTableEntryAddress(gva, level: 1))
        let e = try runtime.load(UInt64.self, at: a)
        try runtime.store(e & ~1, at: a)
    }
}

/// Puts the calling thread in SCHED_FIFO at priority 1 (root): on a host whose CPUs other
/// processes keep busy, every return from the kernel (each exit) is otherwise a chance for the
/// scheduler to run them first, and that wait, not KVM, dominates the timings. Priority 1 is
/// the lowest real-time one; RT throttling still leaves the others 5%. False when refused.
@discardableResult func enterRealtimeScheduling() -> Bool {
    var p = sched_param()
    p.sched_priority = 1
    return pthread_setschedparam(pthread_self(), SCHED_FIFO, &p) == 0
}

/// Runs `body` with the calling thread at the normal scheduling class (SCHED_OTHER), as the
/// KVM engine's own threads run, then puts the thread's class back; threads `body` starts
/// inherit the normal class.
func withNormalScheduling<T>(_ body: () throws(KVMError) -> T) throws(KVMError) -> T {
    var policy: Int32 = 0
    var saved = sched_param()
    let known = pthread_getschedparam(pthread_self(), &policy, &saved) == 0
    if known && policy != SCHED_OTHER {
        var normal = sched_param()
        normal.sched_priority = 0
        pthread_setschedparam(pthread_self(), SCHED_OTHER, &normal)
    }
    defer { if known && policy != SCHED_OTHER { pthread_setschedparam(pthread_self(), policy, &saved) } }
    return try body()
}

/// The calling thread's CPU affinity, as a bit mask of CPUs 0-63 (kvm calibrate pins its
/// threads for the hand-off benchmarks and puts the mask back after). Nil when unreadable.
func currentAffinityMask() -> UInt64? {
    let m = ckvm_get_affinity(0)
    return m > 0 ? UInt64(m) : nil
}

/// Restricts the calling thread (`tid` 0) or thread `tid` to the CPUs of `mask` (CPUs 0-63).
/// False when refused.
@discardableResult func setAffinityMask(_ mask: UInt64, tid: Int32 = 0) -> Bool {
    ckvm_set_affinity(tid, mask) == 0
}

/// The CPUs this process may run on (the affinity mask's set bits, CPUs 0-63).
func allowedCPUs() -> [Int] {
    guard let m = currentAffinityMask() else { return [] }
    return (0..<64).filter { m & (1 << UInt64($0)) != 0 }
}
