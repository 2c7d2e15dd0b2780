import CKVM
import MemVirtCore
#if canImport(Glibc)
import Glibc
#endif

/// Why `KVM_RUN` returned, decoded from `struct kvm_run` (kvm-ioctls' `VcpuExit`).
public enum VCPUExit: Sendable, Equatable {
    /// KVM_EXIT_IO, out: `data` holds `size` bytes (the first of `count`).
    case ioOut(port: UInt16, size: Int, data: UInt64)
    /// KVM_EXIT_IO, in.
    case ioIn(port: UInt16, size: Int)
    /// KVM_EXIT_MMIO: an access to guest-physical memory no slot backs.
    case mmio(address: GuestPhysicalAddress, isWrite: Bool, length: Int)
    /// KVM_EXIT_HLT.
    case halt
    /// KVM_EXIT_SHUTDOWN: triple fault.
    case shutdown
    /// KVM_EXIT_FAIL_ENTRY.
    case failEntry(reason: UInt64)
    /// KVM_EXIT_INTERNAL_ERROR.
    case internalError(suberror: UInt32)
    /// KVM_EXIT_DIRTY_RING_FULL: harvest, reset, run again.
    case dirtyRingFull
    /// KVM_RUN returned EINTR/EAGAIN: the vCPU was kicked. Not an error.
    case interrupted
    /// Any other exit reason.
    case other(reason: UInt32)

    /// Decodes the exit in `run` (a pure function: tests feed it synthetic exits).
    static func decode(_ run: UnsafePointer<kvm_run>) -> VCPUExit {
        let r = run.pointee
        switch Int32(r.exit_reason) {
        case KVM_EXIT_IO:
            let io = r.io
            let size = Int(io.size)
            if Int32(io.direction) == KVM_EXIT_IO_OUT {
                var data: UInt64 = 0
                // SAFETY: data_offset points into the kvm_run mapping (KVM's ABI); size <= 4.
                let p = UnsafeRawPointer(run) + Int(io.data_offset)
                for i in 0..<min(size, 8) { data |= UInt64(p.load(fromByteOffset: i, as: UInt8.self)) << (8 * UInt64(i)) }
                return .ioOut(port: io.port, size: size, data: data)
            }
            return .ioIn(port: io.port, size: size)
        case KVM_EXIT_MMIO:
            return .mmio(address: GuestPhysicalAddress(rawValue: r.mmio.phys_addr), isWrite: r.mmio.is_write != 0, length: Int(r.mmio.len))
        case KVM_EXIT_HLT: return .halt
        case KVM_EXIT_SHUTDOWN: return .shutdown
        case KVM_EXIT_FAIL_ENTRY: return .failEntry(reason: r.fail_entry.hardware_entry_failure_reason)
        case KVM_EXIT_INTERNAL_ERROR: return .internalError(suberror: r.internal.suberror)
        case KVM_EXIT_DIRTY_RING_FULL: return .dirtyRingFull
        case KVM_EXIT_INTR: return .interrupted
        default: return .other(reason: r.exit_reason)
        }
    }
}

/// A vCPU's whole architectural state, as the migration and snapshot work needs it:
/// registers, segment and control registers, FPU/XSAVE and XCRs, MSRs (TSC and the KVM
/// paravirtual ones, async PF included), LAPIC (with an in-kernel irqchip), pending events,
/// MP state and debug registers.
public struct VCPUState: @unchecked Sendable {
    public var regs = kvm_regs()
    public var sregs = kvm_sregs()
    public var fpu = kvm_fpu()
    /// `struct kvm_xsave` bytes (empty when KVM has no XSAVE).
    public var xsave: [UInt8] = []
    public var xcrs: kvm_xcrs? = nil
    /// (index, value) pairs, in the order saved.
    public var msrs: [(UInt32, UInt64)] = []
    /// `struct kvm_lapic_state` bytes (nil without an in-kernel irqchip).
    public var lapic: [UInt8]? = nil
    public var events = kvm_vcpu_events()
    public var mpState: UInt32 = 0
    public var debugRegs = kvm_debugregs()
    /// The guest TSC frequency (`KVM_GET_TSC_KHZ`), nil when unknown.
    public var tscKHz: UInt32? = nil

    public init() {}
}

/// A vCPU (`KVM_CREATE_VCPU`) with its shared `struct kvm_run` (and dirty ring) mapped.
/// Use from one thread at a time.
public final class VirtualCPU: @unchecked Sendable {
    public let id: Int
    unowned let vm: VirtualMachine
    let fd: FileDescriptor
    let runMapping: Mapping
    /// The dirty ring's entries, when the VM has one.
    let ringMapping: Mapping?
    /// Next ring entry to harvest.
    var ringFetchIndex: UInt32 = 0

    init(vm: VirtualMachine, id: Int) throws(KVMError) {
        self.id = id
        self.vm = vm
        let fd = FileDescriptor(try checked(ckvm_create_vcpu(vm.fd.raw, UInt(id)), "KVM_CREATE_VCPU(\(id))"))
        self.fd = fd
        runMapping = try Mapping(size: vm.kvm.vcpuMmapSize, flags: MAP_SHARED, fd: fd.raw, what: "kvm_run of vCPU \(id)")
        if vm.dirtyRingBytes > 0 {
            let page = Int(sysconf(Int32(_SC_PAGESIZE)))
            ringMapping = try Mapping(
                size: vm.dirtyRingBytes, flags: MAP_SHARED, fd: fd.raw, offset: off_t(Int(ckvm_dirty_log_page_offset()) * page),
                what: "dirty ring of vCPU \(id)")
        } else {
            ringMapping = nil
        }
        let cpuid = try vm.kvm.supportedCPUID()
        _ = try checked(cpuid.withPointer { ckvm_set_cpuid2(fd.raw, $0) }, "KVM_SET_CPUID2(vCPU \(id))")
    }

    var run: UnsafeMutablePointer<kvm_run> { runMapping.base.assumingMemoryBound(to: kvm_run.self) }

    /// `KVM_RUN` once, and the decoded exit. EINTR/EAGAIN give `.interrupted`, never an error.
    public func runOnce() throws(KVMError) -> VCPUExit {
        let r = ckvm_run(fd.raw)
        if r == -EINTR || r == -EAGAIN { return .interrupted }
        if r == -EFAULT {
            throw KVMError.call("KVM_RUN(vCPU \(id)) (guest memory could not be mapped: a dead pager or a bad slot)", Errno(rawValue: EFAULT))
        }
        _ = try checked(r, "KVM_RUN(vCPU \(id))")
        return VCPUExit.decode(run)
    }

    // MARK: registers

    public func getRegs() throws(KVMError) -> kvm_regs {
        var r = kvm_regs()
        _ = try checked(ckvm_get_regs(fd.raw, &r), "KVM_GET_REGS")
        return r
    }
    public func setRegs(_ r: kvm_regs) throws(KVMError) {
        var r = r
        _ = try checked(ckvm_set_regs(fd.raw, &r), "KVM_SET_REGS")
    }
    public func getSregs() throws(KVMError) -> kvm_sregs {
        var r = kvm_sregs()
        _ = try checked(ckvm_get_sregs(fd.raw, &r), "KVM_GET_SREGS")
        return r
    }
    public func setSregs(_ r: kvm_sregs) throws(KVMError) {
        var r = r
        _ = try checked(ckvm_set_sregs(fd.raw, &r), "KVM_SET_SREGS")
    }

    /// `KVM_SET_MP_STATE` (KVM_MP_STATE_RUNNABLE = 0: a secondary vCPU with an in-kernel
    /// irqchip starts waiting for INIT/SIPI otherwise).
    public func setMPState(_ state: UInt32) throws(KVMError) {
        var mp = kvm_mp_state(mp_state: state)
        _ = try checked(ckvm_set_mp_state(fd.raw, &mp), "KVM_SET_MP_STATE(\(state))")
    }

    /// `KVM_GET_MSRS` for `indices`; MSRs KVM refuses are left out.
    public func getMSRs(_ indices: [UInt32]) throws(KVMError) -> [(UInt32, UInt64)] {
        if indices.isEmpty { return [] }
        let buf = MSRBuffer(indices.map { ($0, 0) })
        let n = Int(try checked(ckvm_get_msrs(fd.raw, buf.header), "KVM_GET_MSRS"))
        return (0..<n).map { (buf.entries[$0].index, buf.entries[$0].data) }
    }
    /// `KVM_SET_MSRS`; returns how many KVM accepted (it stops at the first refusal).
    @discardableResult public func setMSRs(_ msrs: [(UInt32, UInt64)]) throws(KVMError) -> Int {
        if msrs.isEmpty { return 0 }
        let buf = MSRBuffer(msrs)
        return Int(try checked(ckvm_set_msrs(fd.raw, buf.header), "KVM_SET_MSRS"))
    }

    /// The MSRs `saveState` keeps: TSC, SYSENTER/SYSCALL, PAT, kernel GS, TSC_AUX and the KVM
    /// paravirtual MSRs (wall clock, system time, async PF enable/interrupt, steal time, PV EOI,
    /// poll control), as far as KVM lists them (`KVM_GET_MSR_INDEX_LIST`).
    static let savedMSRCandidates: [UInt32] = [
        0x10, 0x3b, 0x174, 0x175, 0x176, 0x1a0, 0x277, 0x6e0,
        0xC000_0081, 0xC000_0082, 0xC000_0083, 0xC000_0084, 0xC000_0102, 0xC000_0103,
        0x4b56_4d00, 0x4b56_4d01, 0x4b56_4d02, 0x4b56_4d03, 0x4b56_4d04, 0x4b56_4d05, 0x4b56_4d06,
    ]

    /// Saves the whole state (see `VCPUState`).
    public func saveState() throws(KVMError) -> VCPUState {
        var s = VCPUState()
        s.regs = try getRegs()
        s.sregs = try getSregs()
        _ = try checked(ckvm_get_fpu(fd.raw, &s.fpu), "KVM_GET_FPU")
        let kvm = vm.kvm
        if kvm.check(.xsave) > 0 {
            let size = max(4096, kvm.check(.xsave2))
            var bytes = [UInt8](repeating: 0, count: size)
            let r = bytes.withUnsafeMutableBytes { b in
                let x = b.baseAddress!.assumingMemoryBound(to: kvm_xsave.self)
                return size > 4096 ? ckvm_get_xsave2(fd.raw, x) : ckvm_get_xsave(fd.raw, x)
            }
            _ = try checked(r, size > 4096 ? "KVM_GET_XSAVE2" : "KVM_GET_XSAVE")
            s.xsave = bytes
        }
        if kvm.check(.xcrs) > 0 {
            var x = kvm_xcrs()
            _ = try checked(ckvm_get_xcrs(fd.raw, &x), "KVM_GET_XCRS")
            s.xcrs = x
        }
        let listed = Set(try kvm.msrIndexList())
        s.msrs = try getMSRs(Self.savedMSRCandidates.filter { listed.contains($0) })
        if vm.hasIRQChip {
            var l = kvm_lapic_state()
            _ = try checked(ckvm_get_lapic(fd.raw, &l), "KVM_GET_LAPIC")
            s.lapic = withUnsafeBytes(of: &l) { Array($0) }
        }
        _ = try checked(ckvm_get_vcpu_events(fd.raw, &s.events), "KVM_GET_VCPU_EVENTS")
        var mp = kvm_mp_state()
        _ = try checked(ckvm_get_mp_state(fd.raw, &mp), "KVM_GET_MP_STATE")
        s.mpState = mp.mp_state
        _ = try checked(ckvm_get_debugregs(fd.raw, &s.debugRegs), "KVM_GET_DEBUGREGS")
        if kvm.check(.getTSCKHz) > 0 {
            let k = ckvm_get_tsc_khz(fd.raw)
            if k > 0 { s.tscKHz = UInt32(k) }
        }
        return s
    }

    /// Restores a state saved by `saveState` (on this vCPU or on a fresh one of another VM).
    public func restoreState(_ s: VCPUState) throws(KVMError) {
        let kvm = vm.kvm
        if let khz = s.tscKHz, kvm.check(.tscControl) > 0 {
            let cur = ckvm_get_tsc_khz(fd.raw)
            if cur != Int32(khz) { _ = try checked(ckvm_set_tsc_khz(fd.raw, UInt(khz)), "KVM_SET_TSC_KHZ") }
        }
        try setSregs(s.sregs)
        try setRegs(s.regs)
        if !s.xsave.isEmpty {
            // KVM_SET_XSAVE copies the vCPU's whole XSAVE size from our buffer (4,096 bytes, or
            // KVM_CAP_XSAVE2's size with dynamic features): a shorter state would be read past.
            let need = max(4096, kvm.check(.xsave2))
            guard s.xsave.count >= need else {
                throw KVMError.invalid("vCPU state: an XSAVE area of \(s.xsave.count) bytes, KVM_SET_XSAVE reads \(need) here")
            }
            let r = s.xsave.withUnsafeBytes { b in ckvm_set_xsave(fd.raw, b.baseAddress!.assumingMemoryBound(to: kvm_xsave.self)) }
            _ = try checked(r, "KVM_SET_XSAVE")
        } else {
            var f = s.fpu
            _ = try checked(ckvm_set_fpu(fd.raw, &f), "KVM_SET_FPU")
        }
        if var x = s.xcrs { _ = try checked(ckvm_set_xcrs(fd.raw, &x), "KVM_SET_XCRS") }
        if let l = s.lapic, vm.hasIRQChip {
            var st = kvm_lapic_state()
            withUnsafeMutableBytes(of: &st) { $0.copyBytes(from: l.prefix($0.count)) }
            _ = try checked(ckvm_set_lapic(fd.raw, &st), "KVM_SET_LAPIC")
        }
        // KVM_SET_MSRS stops at the first MSR it refuses. A refusal is harmless when the MSR
        // already holds the saved value (e.g. the async-PF MSRs at 0 without an irqchip).
        var rest = s.msrs[...]
        while !rest.isEmpty {
            let n = try setMSRs(Array(rest))
            if n == rest.count { break }
            let refused = rest[rest.startIndex + n]
            let now = try getMSRs([refused.0]).first?.1
            if now != refused.1 {
                throw KVMError.invalid("KVM_SET_MSRS refused MSR 0x\(String(refused.0, radix: 16)) = 0x\(String(refused.1, radix: 16))")
            }
            rest = rest[(rest.startIndex + n + 1)...]
        }
        var ev = s.events
        _ = try checked(ckvm_set_vcpu_events(fd.raw, &ev), "KVM_SET_VCPU_EVENTS")
        var mp = kvm_mp_state(mp_state: s.mpState)
        _ = try checked(ckvm_set_mp_state(fd.raw, &mp), "KVM_SET_MP_STATE")
        var d = s.debugRegs
        _ = try checked(ckvm_set_debugregs(fd.raw, &d), "KVM_SET_DEBUGREGS")
    }

    /// This vCPU's binary stats (`KVM_GET_STATS_FD`).
    public func stats() throws(KVMError) -> StatsReader {
        try StatsReader(fd: FileDescriptor(try checked(ckvm_get_stats_fd(fd.raw), "KVM_GET_STATS_FD(vcpu \(id))")))
    }
}

/// A `struct kvm_msrs` with its flexible array of entries.
final class MSRBuffer {
    let raw: UnsafeMutableRawPointer
    let count: Int
    init(_ msrs: [(UInt32, UInt64)]) {
        count = msrs.count
        let size = 8 + 16 * count
        raw = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 8)
        raw.initializeMemory(as: UInt8.self, repeating: 0, count: size)
        raw.storeBytes(of: UInt32(count), as: UInt32.self)
        for (i, m) in msrs.enumerated() {
            entries[i].index = m.0
            entries[i].data = m.1
        }
    }
    deinit { raw.deallocate() }
    var header: UnsafeMutablePointer<kvm_msrs> { raw.assumingMemoryBound(to: kvm_msrs.self) }
    var entries: UnsafeMutablePointer<kvm_msr_entry> { (raw + 8).assumingMemoryBound(to: kvm_msr_entry.self) }
}
