import CKVM
import MemVirtCore
import MemVirtGuest
#if canImport(Glibc)
import Glibc
#endif

/// MSRs the guest kernel logic writes from the VMM (KVM_SET_MSRS). x2APIC registers are
/// MSRs 0x800 + (xAPIC offset >> 4); the KVM ones are from Documentation/virt/kvm/x86/msr.rst.
enum GuestMSR {
    static let apicBase: UInt32 = 0x1b
    static let x2apicTPR: UInt32 = 0x808
    static let x2apicEOI: UInt32 = 0x80b
    static let x2apicSVR: UInt32 = 0x80f
    static let x2apicLVTTimer: UInt32 = 0x832
    static let x2apicTimerInitial: UInt32 = 0x838
    static let x2apicTimerDivide: UInt32 = 0x83e
    /// MSR_KVM_ASYNC_PF_EN: 64-byte aligned area | enable (bit 0) | deliver "page ready" as an
    /// interrupt (bit 3). Without bit 1 (SEND_ALWAYS) KVM sends "page not present" only at CPL3.
    static let asyncPFEnable: UInt32 = 0x4b56_4d02
    /// MSR_KVM_ASYNC_PF_INT: the "page ready" vector. Written before MSR_KVM_ASYNC_PF_EN.
    static let asyncPFInterrupt: UInt32 = 0x4b56_4d06
    /// MSR_KVM_ASYNC_PF_ACK: 1 = the token slot is free again, send the next "page ready".
    static let asyncPFAck: UInt32 = 0x4b56_4d07
}

/// How the VMM-side guest kernel schedules guest threads.
public struct GuestKernelOptions: Sendable {
    /// The LAPIC timer period: a thread runs at most this long before the next one in line.
    public var timeSliceNanos: UInt64 = 4_000_000
    /// Enable KVM's asynchronous page faults: a thread whose page KVM cannot map at once is
    /// parked on "page not present" and woken on "page ready"; without, the vCPU waits in KVM.
    public var asyncPF = false
    /// The run ends when every one of these threads reported DONE (the others, e.g. counting
    /// threads, run on until then). Nil: when all threads are done, or at the deadline.
    public var finishWhenDone: Set<Int>? = nil
    /// Record every async-PF event's VMM timestamps (`VCPUSchedulerReport.apfTimes`): for
    /// `kvm calibrate`'s "page not present" and "page ready" figures.
    public var recordAPFTimes = false
    /// Record every KVM_RUN return the scheduler handled (`VCPUSchedulerReport.exitLog`): its
    /// event, the thread that held the vCPU and the VMM's timestamps (instrumentation).
    public var recordExits = false
    public init() {}
}

/// One async-PF event as the VMM's scheduler saw it (host CLOCK_MONOTONIC nanoseconds).
public struct APFEventTiming: Sendable {
    /// false: "page not present" (the faulting thread parked); true: "page ready" (a parked
    /// thread woken; wake-all broadcasts and unmatched tokens are not recorded).
    public var ready: Bool
    /// The async-PF token (CR2 of "page not present", the area's token of "page ready").
    public var token: UInt32
    /// KVM_RUN returned with the event's stub exit.
    public var exitNanos: UInt64
    /// KVM_RUN entered again after the VMM handled it: with the next thread (not present) or
    /// the woken thread (ready). 0: the run ended first.
    public var nextEntryNanos: UInt64
}

/// One KVM_RUN return as the VMM's scheduler handled it (host CLOCK_MONOTONIC nanoseconds).
public struct SchedulerExitTiming: Sendable {
    /// The stub's vector (14 "page not present", the timer's, "page ready"), or -1: another
    /// exit (a port of the thread's own, DONE, an interrupted run).
    public var vector: Int16
    /// Position (on this vCPU) of the thread that held the vCPU when KVM_RUN returned, -1: idle.
    public var thread: Int8
    /// The KVM_RUN that returned: entered, returned; the next KVM_RUN entered (0: the run ended).
    public var enteredNanos: UInt64
    public var exitNanos: UInt64
    public var nextEntryNanos: UInt64
}

/// One guest thread: the vCPU it is bound to and its command (in its own mailbox).
public struct GuestThreadSpec: Sendable {
    public var vcpu: Int
    public var mailbox: memvirt_mailbox
    public init(vcpu: Int, mailbox: memvirt_mailbox) {
        self.vcpu = vcpu
        self.mailbox = mailbox
    }
}

/// What one vCPU's scheduler did.
public struct VCPUSchedulerReport: Sendable {
    public var vcpu: Int
    /// KVM_RUN returns handled.
    public var exits: UInt64 = 0
    public var timerTicks: UInt64 = 0
    /// Thread switches (a different thread, or idle, after an exit).
    public var switches: UInt64 = 0
    /// "Page not present": a #PF with the async-PF flag set; the thread was parked.
    public var apfNotPresent: UInt64 = 0
    /// "Page ready" interrupts (a parked thread woken), wake-all broadcasts included.
    public var apfReady: UInt64 = 0
    /// "Page ready" with token 0xffffffff (wake all): after enabling, and when KVM flushes.
    public var apfWakeAll: UInt64 = 0
    /// "Page ready" whose token matched no parked thread.
    public var apfUnmatched: UInt64 = 0
    /// Times the vCPU had no runnable thread and went idle (hlt at CPL0).
    public var idleEntries: UInt64 = 0
    /// Nanoseconds spent idle.
    public var idleNanos: UInt64 = 0
    /// Nanoseconds the VMM spent handling exits (between KVM_RUN returns and re-entries).
    public var handlingNanos: UInt64 = 0
    /// Nanoseconds threads spent parked, "page not present" to "page ready" (summed).
    public var parkedNanos: UInt64 = 0
    /// Nanoseconds from a thread's wake-up to its next "page not present" (summed).
    public var runToFaultNanos: UInt64 = 0
    /// The vCPU thread's own time on a host CPU and waiting on a host run queue (runnable but
    /// not running: the host's CPU contention, a vCPU's steal time), from the host scheduler.
    public var hostRunNanos: UInt64? = nil
    public var hostWaitNanos: UInt64? = nil
    /// Per guest thread (by id): nanoseconds it held the vCPU, KVM_RUN entry to exit while it
    /// was the current thread (a fault it waits for inside KVM counts as its own time).
    public var threadNanos: [Int: UInt64] = [:]
    /// With `GuestKernelOptions.recordAPFTimes`: every async-PF event in order.
    public var apfTimes: [APFEventTiming] = []
    /// With `GuestKernelOptions.recordExits`: every handled KVM_RUN return in order.
    public var exitLog: [SchedulerExitTiming] = []

    public var json: JSONValue {
        .object([
            ("vcpu", .int(Int64(vcpu))), ("exits", .uint(exits)), ("timer_ticks", .uint(timerTicks)), ("switches", .uint(switches)),
            ("apf_not_present", .uint(apfNotPresent)), ("apf_ready", .uint(apfReady)), ("apf_wake_all", .uint(apfWakeAll)),
            ("apf_unmatched", .uint(apfUnmatched)), ("idle_entries", .uint(idleEntries)),
            ("idle_ms", .double(Double(idleNanos / 1000) / 1000)), ("vmm_handling_ms", .double(Double(handlingNanos / 1000) / 1000)),
            ("parked_us_mean", .double(apfNotPresent == 0 ? 0 : (Double(parkedNanos) / Double(apfNotPresent) / 1e3).rounded())),
            ("run_to_fault_us_mean", .double(apfReady <= apfWakeAll ? 0 : (Double(runToFaultNanos) / Double(apfReady - apfWakeAll) / 1e3).rounded())),
            ("host_run_ms", hostRunNanos.map { .double(Double($0 / 1000) / 1000) } ?? .null),
            ("host_runqueue_wait_ms", hostWaitNanos.map { .double(Double($0 / 1000) / 1000) } ?? .null),
        ])
    }
}

/// What one vCPU's scheduler holds between runs: the saved registers of its threads (the
/// running one's live registers are the vCPU's own), who is parked on which async-PF token,
/// who is done, the run queue and the running thread. Together with the vCPU's state
/// (`VirtualCPU.saveState`: LAPIC, MSRs with async PF) and guest memory it is everything a
/// migration or snapshot needs to resume the guest kernel elsewhere.
public struct VCPUSchedulerState: @unchecked Sendable, Equatable {
    public enum Thread: Equatable, Sendable { case runnable, parked(token: UInt32), done }
    /// Guest thread ids on this vCPU (indices into the kernel's thread list).
    public var ids: [Int]
    public var regs: [kvm_regs]
    public var threads: [Thread]
    /// Positions in `ids`, next first.
    public var runQueue: [Int]
    /// The running thread (a position in `ids`), nil when the vCPU idles.
    public var current: Int?

    public var parked: Int { threads.filter { if case .parked = $0 { true } else { false } }.count }

    public static func == (a: Self, b: Self) -> Bool {
        a.ids == b.ids && a.threads == b.threads && a.runQueue == b.runQueue && a.current == b.current
            && a.regs.count == b.regs.count
            && zip(a.regs, b.regs).allSatisfy { x, y in withUnsafeBytes(of: x) { bx in withUnsafeBytes(of: y) { by in bx.elementsEqual(by) } } }
    }
}

/// A guest kernel whose logic lives in the VMM, because CPL0 code is emulated on this host
/// (kvm_pvm: ~1.2 us an instruction). The guest's CPL0 part is only the one-instruction
/// stubs: every exception and interrupt exits to here at once, and this scheduler saves the
/// interrupted thread's registers (GPRs from KVM_GET_REGS, rip/rsp/rflags from the frame the
/// CPU pushed on the kernel stack), picks the next thread and loads it (KVM_SET_REGS, then
/// KVM_SET_SREGS for the CPL3 segments: KVM_SET_REGS does not change the privilege level).
///
/// Per vCPU: x2APIC on (so EOI is one KVM_SET_MSRS from here), the LAPIC timer periodic at the
/// time slice, and optionally async PF: MSR_KVM_ASYNC_PF_INT then MSR_KVM_ASYNC_PF_EN (needs
/// the in-kernel irqchip, or KVM silently refuses both). Events:
/// - timer: EOI; the running thread goes to the back of the run queue.
/// - #PF with flags = 1 in the vCPU's async-PF area: "page not present", token = CR2; the
///   thread is parked on the token (flags reset to 0), another runs (or the vCPU idles).
/// - "page ready" interrupt: token from the area, slot zeroed, EOI, MSR_KVM_ASYNC_PF_ACK;
///   the parked thread (all of them for 0xffffffff) runs next, ahead of the interrupted one.
/// - any other exception: the guest is stopped with a report, as `GuestVM.execute` does.
public final class GuestKernel: @unchecked Sendable {
    public let g: GuestVM
    public let options: GuestKernelOptions
    let threads: [GuestThreadSpec]
    let stopFlag: UnsafeMutablePointer<UInt32>
    /// Each vCPU's scheduler state after the last `run` (or the one to resume from): a later
    /// `run` goes on from it.
    public private(set) var schedulerStates: [VCPUSchedulerState?]
    /// Per thread: 1 once it reported DONE (written by its vCPU's thread, read by any).
    let doneFlags: UnsafeMutablePointer<UInt32>
    /// Kicks the vCPU threads of the current run out of KVM_RUN (`requestStop`).
    let kicker: VCPUKicker
    /// Per vCPU, when its periodic LAPIC timer was armed (CLOCK_MONOTONIC right after the
    /// initial-count write returned): its ticks are due at this + k x the time slice.
    public private(set) var timerArmedNanos: [UInt64] = []

    /// A guest kernel for `threads` on `g`. With `resume`, the schedulers go on from states
    /// saved elsewhere (a migrated or restored guest): the threads' mailboxes are then already
    /// in guest memory and are not written, and the caller restores each vCPU's state
    /// (`VirtualCPU.restoreState`) after this. Enabling async PF on a vCPU makes KVM send
    /// "page ready" to all (token 0xffffffff), which wakes the threads that were parked when
    /// the state was saved: the pages they waited for are not coming from this KVM.
    public init(vm g: GuestVM, threads: [GuestThreadSpec], options: GuestKernelOptions,
                resume: [VCPUSchedulerState]? = nil) throws(KVMError) {
        guard g.vm.hasIRQChip else { throw KVMError.invalid("the guest kernel needs the in-kernel irqchip (GuestConfig.irqchip)") }
        guard threads.count <= g.layout.threadCapacity else {
            throw KVMError.invalid("\(threads.count) guest threads, room for \(g.layout.threadCapacity) (GuestConfig.threads)")
        }
        guard options.timeSliceNanos >= 100_000, options.timeSliceNanos <= 1_000_000_000 else {
            throw KVMError.invalid("time slice \(options.timeSliceNanos) ns: use 100us...1s")
        }
        for t in threads where t.vcpu < 0 || t.vcpu >= g.vcpus.count {
            throw KVMError.invalid("guest thread bound to vCPU \(t.vcpu); the VM has \(g.vcpus.count)")
        }
        if options.asyncPF {
            guard g.kvm.check(.asyncPF) > 0, g.kvm.check(.asyncPFInt) > 0 else {
                throw KVMError.unavailable("KVM_CAP_ASYNC_PF / KVM_CAP_ASYNC_PF_INT not supported")
            }
        }
        self.g = g
        self.options = options
        self.threads = threads
        if let r = resume {
            guard r.count == g.vcpus.count else { throw KVMError.invalid("resume: \(r.count) scheduler states for \(g.vcpus.count) vCPUs") }
            for (i, st) in r.enumerated() {
                let mine = threads.enumerated().filter { $0.element.vcpu == i }.map(\.offset)
                guard st.ids == mine, st.regs.count == mine.count, st.threads.count == mine.count,
                      st.runQueue.allSatisfy({ $0 >= 0 && $0 < mine.count }), st.current.map({ $0 >= 0 && $0 < mine.count }) ?? true else {
                    throw KVMError.invalid("resume: vCPU \(i)'s scheduler state does not match its threads \(mine)")
                }
            }
        }
        stopFlag = .allocate(capacity: 1)
        stopFlag.initialize(to: 0)
        doneFlags = .allocate(capacity: max(1, threads.count))
        doneFlags.initialize(repeating: 0, count: max(1, threads.count))
        kicker = VCPUKicker(vm: g)
        schedulerStates = resume ?? g.vcpus.map { _ in nil }
        for st in resume ?? [] {
            for (k, t) in st.ids.enumerated() where st.threads[k] == .done { doneFlags[t] = 1 }
        }
        if resume == nil {
            for (t, spec) in threads.enumerated() {
                try g.runtime.store(spec.mailbox, at: GuestPhysicalAddress(rawValue: g.layout.threadMailbox(t)))
            }
        }
        for v in g.vcpus { try setUp(v) }
    }

    deinit {
        stopFlag.deallocate()
        doneFlags.deallocate()
    }

    /// Whether guest thread `t` reported DONE.
    public func isDone(_ t: Int) -> Bool { ckvm_load_acquire_u32(doneFlags + t) != 0 }

    /// Whether the run's finishing condition holds (`finishWhenDone`, or every thread done).
    public var finished: Bool {
        let ts = options.finishWhenDone.map(Array.init) ?? Array(threads.indices)
        return ts.allSatisfy(isDone)
    }

    /// A thread reported DONE (on its vCPU's thread): the run ends when that finishes it.
    func markDone(_ t: Int) {
        ckvm_store_release_u32(doneFlags + t, 1)
        if finished { requestStop() }
    }

    private func setUp(_ v: VirtualCPU) throws(KVMError) {
        // x2APIC (bit 10) and enabled (bit 11); bit 8 marks the bootstrap processor.
        let base: UInt64 = 0xFEE0_0000 | 0xC00 | (v.id == 0 ? 0x100 : 0)
        guard try v.setMSRs([(GuestMSR.apicBase, base)]) == 1 else {
            throw KVMError.unavailable("KVM refused x2APIC mode (IA32_APIC_BASE = 0x\(String(base, radix: 16)))")
        }
        let timer: [(UInt32, UInt64)] = [
            (GuestMSR.x2apicSVR, 0x1ff),  // software-enable, spurious vector 0xff
            (GuestMSR.x2apicTPR, 0),
            (GuestMSR.x2apicTimerDivide, 0xb),  // divide by 1: KVM's APIC bus ticks once a nanosecond
            (GuestMSR.x2apicLVTTimer, UInt64(MEMVIRT_VECTOR_TIMER) | 1 << 17),  // periodic
            (GuestMSR.x2apicTimerInitial, options.timeSliceNanos),
        ]
        let n = try v.setMSRs(timer)
        timerArmedNanos.append(monotonicNanoseconds())
        guard n == timer.count else {
            throw KVMError.unavailable("KVM refused x2APIC MSR 0x\(String(timer[n].0, radix: 16)) from the VMM")
        }
        if v.id > 0 { try v.setMPState(0) }  // KVM_MP_STATE_RUNNABLE
        if options.asyncPF {
            let area = GuestLayout.apfArea(v.id)
            try g.runtime.write(array: [UInt64](repeating: 0, count: 9), at: GuestPhysicalAddress(rawValue: area))
            guard try v.setMSRs([(GuestMSR.asyncPFInterrupt, UInt64(MEMVIRT_VECTOR_APF_READY))]) == 1,
                  try v.setMSRs([(GuestMSR.asyncPFEnable, area | 1 | 8)]) == 1 else {
                throw KVMError.unavailable("KVM refused the async-PF MSRs (MSR_KVM_ASYNC_PF_INT, MSR_KVM_ASYNC_PF_EN)")
            }
        }
    }

    /// Asks every vCPU to stop: each leaves KVM_RUN at once (immediate_exit and a signal, as
    /// api.rst describes; pending I/O completes first) and its scheduler stops at a clean point.
    public func requestStop() {
        ckvm_store_release_u32(stopFlag, 1)
        kicker.stop()
    }
    var stopRequested: Bool { ckvm_load_acquire_u32(stopFlag) != 0 }

    /// Clears an earlier stop so the next `run` can go (`run` does it itself unless told not
    /// to: a caller that may request a stop before `run` starts resets first, then runs).
    public func prepareRun() {
        ckvm_store_release_u32(stopFlag, 0)
        kicker.resume()
    }

    /// Runs every vCPU on its own dedicated thread until `nanos` have passed (or the finishing
    /// condition holds, or `requestStop`); the caller's thread waits. Returns at once when the
    /// finishing condition already holds (a resumed guest whose workload was done).
    public func run(forNanos nanos: UInt64, resetStop: Bool = true) throws(KVMError) -> [VCPUSchedulerReport] {
        let deadline = monotonicNanoseconds() + nanos
        if resetStop { prepareRun() }
        if finished { return g.vcpus.indices.map { VCPUSchedulerReport(vcpu: $0) } }
        let boxes = g.vcpus.map { _ in ResultBox<(VCPUSchedulerReport, VCPUSchedulerState)>() }
        var pthreads: [DedicatedThread] = []
        for (i, box) in boxes.enumerated() {
            let mine = threads.enumerated().filter { $0.element.vcpu == i }.map { $0.offset }
            let saved = schedulerStates[i]
            pthreads.append(try DedicatedThread.start(name: "memvirt-vcpu\(i)") { [self] in
                kicker.register(i)
                defer { kicker.unregister(i) }
                do {
                    var s = try saved.map { (st) throws(KVMError) in try VCPUScheduler(kernel: self, vcpu: g.vcpus[i], resume: st) }
                        ?? VCPUScheduler(kernel: self, vcpu: g.vcpus[i], threads: mine)
                    let r = try s.run(deadline: deadline)
                    box.value = .success((r, s.savedState))
                } catch let e as KVMError {
                    box.value = .failure(e)
                    requestStop()
                } catch {}
            })
        }
        for t in pthreads { t.join() }
        let results = try boxes.map { (b) throws(KVMError) in try b.value!.get() }
        schedulerStates = results.map(\.1)
        return results.map(\.0)
    }

    /// Guest thread `t`'s mailbox now.
    public func mailbox(_ t: Int) throws(KVMError) -> memvirt_mailbox {
        try g.runtime.load(memvirt_mailbox.self, at: GuestPhysicalAddress(rawValue: g.layout.threadMailbox(t)))
    }
}

/// One vCPU's scheduler state; lives on that vCPU's thread.
struct VCPUScheduler {
    typealias State = VCPUSchedulerState.Thread
    let kernel: GuestKernel
    let v: VirtualCPU
    let ids: [Int]
    var regs: [kvm_regs]
    var state: [State]
    var runQueue: [Int] = []
    var current: Int? = nil
    let userSregs: kvm_sregs
    let kernelSregs: kvm_sregs
    let idleRegs: kvm_regs
    var report: VCPUSchedulerReport
    var idleSince: UInt64 = 0
    var parkedAt: [UInt64]
    var wokenAt: [UInt64]
    /// The vCPU's registers are the current thread's already (a resumed scheduler): no load
    /// before the first entry.
    var loaded = false
    /// When the last KVM_RUN returned, and whether the last recorded async-PF event waits for
    /// the next entry's timestamp.
    var lastExit: UInt64 = 0
    var apfAwaitingEntry = false

    /// Goes on from `st` (saved by an earlier run, here or in another VM).
    init(kernel: GuestKernel, vcpu v: VirtualCPU, resume st: VCPUSchedulerState) throws(KVMError) {
        try self.init(kernel: kernel, vcpu: v, threads: st.ids)
        regs = st.regs
        state = st.threads
        runQueue = st.runQueue
        current = st.current
        let now = monotonicNanoseconds()
        parkedAt = state.map { if case .parked = $0 { now } else { 0 } }
        loaded = true
    }

    /// The state to save: where every thread is; the vCPU's own registers are the current
    /// thread's, the idle loop's, or a stub's with the thread's frame on the kernel stack.
    var savedState: VCPUSchedulerState {
        VCPUSchedulerState(ids: ids, regs: regs, threads: state, runQueue: runQueue, current: current)
    }

    init(kernel: GuestKernel, vcpu v: VirtualCPU, threads ids: [Int]) throws(KVMError) {
        self.kernel = kernel
        self.v = v
        self.ids = ids
        let g = kernel.g
        let entry = GuestLayout.image + g.image.entry_offset
        regs = ids.map { t in
            var r = kvm_regs()
            r.rip = entry
            r.rsp = g.layout.threadStack(t)
            r.rdi = g.layout.threadMailbox(t)
            r.rflags = 0x202  // IF: the timer and "page ready" reach CPL3 code
            return r
        }
        state = ids.map { _ in .runnable }
        parkedAt = ids.map { _ in 0 }
        wokenAt = ids.map { _ in 0 }
        runQueue = Array(ids.indices)
        // Taken after the x2APIC switch: KVM_SET_SREGS also sets IA32_APIC_BASE from apic_base.
        var s = try v.getSregs()
        s.interrupt_bitmap = (0, 0, 0, 0)
        userSregs = s
        var k = s
        k.cs = kvm_segment(base: 0, limit: 0xffff_ffff, selector: 0x08, type: 11, present: 1, dpl: 0, db: 0, s: 1, l: 1, g: 1, avl: 0, unusable: 0, padding: 0)
        let d = kvm_segment(base: 0, limit: 0xffff_ffff, selector: 0x10, type: 3, present: 1, dpl: 0, db: 1, s: 1, l: 0, g: 1, avl: 0, unusable: 0, padding: 0)
        k.ss = d; k.ds = d; k.es = d
        kernelSregs = k
        var idle = kvm_regs()
        idle.rip = GuestLayout.image + g.image.idle_offset
        idle.rsp = GuestLayout.kernelStack(v.id) - 256
        idle.rflags = 0x2
        idleRegs = idle
        report = VCPUSchedulerReport(vcpu: v.id)
    }

    mutating func run(deadline: UInt64) throws(KVMError) -> VCPUSchedulerReport {
        let host0 = ThreadSchedStat.current()
        if !loaded { try dispatch() }
        if current == nil { idleSince = monotonicNanoseconds() }
        // Stops between a handled exit and the next entry: the vCPU holds the current thread's
        // registers (or the idle loop's). A kick can also land after KVM delivered an event and
        // before its stub's `out`: the vCPU is then in the stub with the thread's frame on the
        // kernel stack, and on resume the `out` exits again and is handled from that frame
        // (in guest memory, which moves with the guest).
        loop: while monotonicNanoseconds() < deadline && !kernel.stopRequested {
            let entered = monotonicNanoseconds()
            if apfAwaitingEntry { report.apfTimes[report.apfTimes.count - 1].nextEntryNanos = entered; apfAwaitingEntry = false }
            if let last = report.exitLog.indices.last, report.exitLog[last].nextEntryNanos == 0 { report.exitLog[last].nextEntryNanos = entered }
            let heldBy = current
            let exit = try v.runOnce()
            let t0 = monotonicNanoseconds()
            var logged: Int16 = -1
            lastExit = t0
            if let c = current { report.threadNanos[ids[c], default: 0] += t0 - entered }
            report.exits += 1
            if current == nil && idleSince > 0 { report.idleNanos += t0 - idleSince; idleSince = 0 }
            switch exit {
            case .ioOut(let port, _, let data):
                let p = Int32(port)
                if p >= MEMVIRT_PORT_VECTOR_BASE && p < MEMVIRT_PORT_VECTOR_BASE + MEMVIRT_TRAP_VECTORS {
                    logged = Int16(p - MEMVIRT_PORT_VECTOR_BASE)
                    try vector(UInt8(p - MEMVIRT_PORT_VECTOR_BASE))
                } else if p == MEMVIRT_PORT_DONE, let cur = current {
                    if data != UInt64(MEMVIRT_STATUS_OK.rawValue) { throw KVMError.guest(.badStatus(data)) }
                    state[cur] = .done
                    kernel.markDone(ids[cur])
                    current = nil
                    if !state.contains(where: { $0 != .done }) { break loop }
                    try dispatch()
                } else if p == MEMVIRT_PORT_PING || p == MEMVIRT_PORT_MARK {
                    // A thread's own marks: nothing to schedule.
                } else {
                    throw KVMError.guest(.unknownPort(port: port, isWrite: true, size: 0, data: data))
                }
            case .interrupted: break
            case .ioIn(let port, let size): throw KVMError.guest(.unknownPort(port: port, isWrite: false, size: size, data: 0))
            case .mmio(let a, let w, let l): throw KVMError.guest(.outsideMemory(address: a, isWrite: w, length: l))
            case .shutdown: throw KVMError.guest(.tripleFault(rip: (try? v.getRegs().rip) ?? 0))
            case .halt: throw KVMError.guest(.unexpectedHalt(rip: (try? v.getRegs().rip) ?? 0))
            case .failEntry(let r): throw KVMError.guest(.failEntry(reason: r))
            case .internalError(let s): throw KVMError.guest(.internalError(suberror: s))
            case .dirtyRingFull: throw KVMError.invalid("dirty ring full under the guest kernel (not supported)")
            case .other(let r): throw KVMError.guest(.unexpectedExit(reason: r))
            }
            report.handlingNanos += monotonicNanoseconds() - t0
            if kernel.options.recordExits {
                report.exitLog.append(SchedulerExitTiming(vector: logged, thread: Int8(heldBy ?? -1), enteredNanos: entered, exitNanos: t0, nextEntryNanos: 0))
            }
        }
        if current == nil && idleSince > 0 { report.idleNanos += monotonicNanoseconds() - idleSince }
        if let a = host0, let b = ThreadSchedStat.current() {
            let d = b.since(a)
            report.hostRunNanos = d.runNanos
            report.hostWaitNanos = d.waitNanos
        }
        return report
    }

    /// An exception or interrupt reached stub `vec`: the vCPU is at CPL0 in the stub, the
    /// interrupted context's frame on the stack.
    mutating func vector(_ vec: UInt8) throws(KVMError) {
        let g = kernel.g
        var r = try v.getRegs()
        let hasCode: Set<UInt8> = [8, 10, 11, 12, 13, 14, 17, 21, 29, 30]
        var sp = r.rsp
        var code: UInt64? = nil
        func load(_ a: UInt64) throws(KVMError) -> UInt64 { try g.runtime.load(UInt64.self, at: GuestPhysicalAddress(rawValue: a)) }
        if hasCode.contains(vec) { code = try load(sp); sp += 8 }
        let rip = try load(sp), cs = try load(sp + 8), rflags = try load(sp + 16), rsp = try load(sp + 24)
        let fromUser = cs & 3 == 3
        if vec < 32 && !fromUser {
            // An exception in our own CPL0 code (idle loop, stub): a bug or a broken guest.
            throw KVMError.guest(.exception(vector: vec, errorCode: code, rip: rip, cr2: (try? v.getSregs().cr2) ?? 0))
        }
        if fromUser, let cur = current {
            r.rip = rip
            r.rsp = rsp
            r.rflags = rflags
            regs[cur] = r
        }
        let area = GuestPhysicalAddress(rawValue: GuestLayout.apfArea(v.id))
        switch Int32(vec) {
        case 14:
            let flags = kernel.options.asyncPF ? try g.runtime.load(UInt32.self, at: area) : 0
            let cr2 = try v.getSregs().cr2
            guard flags & 1 != 0, let cur = current else {
                throw KVMError.guest(.exception(vector: vec, errorCode: code, rip: rip, cr2: cr2))
            }
            try g.runtime.store(UInt32(0), at: area)
            state[cur] = .parked(token: UInt32(truncatingIfNeeded: cr2))
            let now = monotonicNanoseconds()
            parkedAt[cur] = now
            if wokenAt[cur] > 0 { report.runToFaultNanos += now - wokenAt[cur]; wokenAt[cur] = 0 }
            current = nil
            report.apfNotPresent += 1
            if kernel.options.recordAPFTimes {
                report.apfTimes.append(APFEventTiming(ready: false, token: UInt32(truncatingIfNeeded: cr2), exitNanos: lastExit, nextEntryNanos: 0))
                apfAwaitingEntry = true
            }
        case MEMVIRT_VECTOR_TIMER:
            report.timerTicks += 1
            try eoi()
            if let cur = current {
                runQueue.append(cur)
                current = nil
            }
        case MEMVIRT_VECTOR_APF_READY:
            let tokenAt = area.advanced(by: 4)
            let token = try g.runtime.load(UInt32.self, at: tokenAt)
            try g.runtime.store(UInt32(0), at: tokenAt)
            try eoi()
            guard try v.setMSRs([(GuestMSR.asyncPFAck, 1)]) == 1 else { throw KVMError.invalid("KVM refused MSR_KVM_ASYNC_PF_ACK") }
            report.apfReady += 1
            var woken: [Int] = []
            for i in state.indices {
                if case .parked(let t) = state[i], token == 0xffff_ffff || t == token {
                    state[i] = .runnable
                    woken.append(i)
                    let now = monotonicNanoseconds()
                    report.parkedNanos += now - parkedAt[i]
                    wokenAt[i] = now
                }
            }
            if token == 0xffff_ffff { report.apfWakeAll += 1 } else if woken.isEmpty { report.apfUnmatched += 1 }
            if kernel.options.recordAPFTimes && token != 0xffff_ffff && !woken.isEmpty {
                report.apfTimes.append(APFEventTiming(ready: true, token: token, exitNanos: lastExit, nextEntryNanos: 0))
                apfAwaitingEntry = true
            }
            // The woken thread runs next (it waited for its page); the interrupted one after it.
            if let cur = current { runQueue.insert(cur, at: 0); current = nil }
            runQueue.insert(contentsOf: woken, at: 0)
        default:
            if vec < 32 { throw KVMError.guest(.exception(vector: vec, errorCode: code, rip: rip, cr2: 0)) }
            throw KVMError.guest(.unexpectedExit(reason: UInt32(vec)))
        }
        try dispatch()
    }

    mutating func eoi() throws(KVMError) {
        guard try v.setMSRs([(GuestMSR.x2apicEOI, 0)]) == 1 else { throw KVMError.invalid("KVM refused the x2APIC EOI from the VMM") }
    }

    /// Loads the next runnable thread (the current one if it may go on), or the idle loop.
    mutating func dispatch() throws(KVMError) {
        let before = current
        if current == nil {
            while !runQueue.isEmpty {
                let c = runQueue.removeFirst()
                if state[c] == .runnable { current = c; break }
            }
        }
        if let cur = current {
            try v.setRegs(regs[cur])
            try v.setSregs(userSregs)
        } else {
            try v.setRegs(idleRegs)
            try v.setSregs(kernelSregs)
            report.idleEntries += 1
            idleSince = monotonicNanoseconds()
        }
        if before != current || before == nil { report.switches += 1 }
    }
}
