import CKVM
import MemVirtCore
import MemVirtGuest
#if canImport(Glibc)
import Glibc
#endif

/// The async-PF phase of `kvm calibrate`: one vCPU under the VMM-side guest kernel
/// (`GuestKernel`, async PF on, in-kernel irqchip), a counting thread and a faulting thread
/// whose every read is of a page the userfaultfd pager holds back for `storeDelayNanos` (the
/// whole region starts in the pager's store), so each read goes async: "page not present",
/// the counting thread runs, the pager's UFFDIO_COPY, "page ready", the faulting thread again.
/// The faulting thread is MEMVIRT_CAL_TOUCH_READ: one read per page in order, each timed by
/// the guest TSC (the thread's whole fault, for cross-checking). Timestamps on both sides are
/// the host's CLOCK_MONOTONIC: the scheduler's (`GuestKernelOptions.recordAPFTimes`: KVM_RUN
/// returned with the event's exit, KVM_RUN entered next) and the pager's
/// (`PagerOptions.recordCopyTimes`: UFFDIO_COPY returned).
struct APFPhaseResult {
    /// Per fault, nanoseconds: "page not present" exit returned to the next thread entered.
    var notPresentHandling: [Double] = []
    /// UFFDIO_COPY returned to the "page ready" exit returned (KVM's worker, the injection,
    /// the guest stub's delivery and exit).
    var readyToExit: [Double] = []
    /// "Page ready" exit returned to the woken thread entered (the VMM's handler: token, EOI,
    /// ACK, wake, load).
    var readyHandling: [Double] = []
    /// UFFDIO_COPY returned to the woken thread entered: the whole "page ready".
    var ready: [Double] = []
    /// The guest-timed read (access to access done), the fault as the thread saw it.
    var faultTotal: [Double] = []
    /// The guest-timed read minus the VMM's "page not present" exit to the woken thread's
    /// entry: the legs inside KVM_RUN (the access to the exit; the entry to the read done).
    var kvmLegs: [Double] = []
    /// How late the pager served each recorded fault after its store delay, ns (its wake-up
    /// from ppoll on the other CPU while the vCPU runs the counting thread).
    var pagerLate: [Double] = []
    /// The guest timer's ticks that interrupted the counting thread: from the tick's due time
    /// (the timer's arming + k x the slice) to KVM_RUN returning with its stub's exit, ns.
    var tickDelivery: [Double] = []
    /// Counters over the recorded faults (apf_not_present, apf_ready; KVM's stats).
    var counters: [String: UInt64] = [:]
    /// Faults the phase recorded (= samples when every fault went async and matched).
    var faults = 0
    /// Reads the phase made, warm-up included (what `counters` cover).
    var phaseFaults = 0
    /// Why the reads could not be matched to their events, if so.
    var problem: String? = nil
}

extension Session {
    /// Store service time of the phase's pager: long enough that KVM's first, non-waiting try
    /// always fails (every read goes async), short enough to keep the phase under a second.
    static let apfStoreDelayNanos: UInt64 = 500_000
    /// How late a thread sleeping on a timeout wakes: `count` ppoll(2) sleeps of
    /// `apfStoreDelayNanos` (no fd: only the timeout), elapsed minus the timeout, ns, on the
    /// calibrating thread (unpinned, as the pager's thread sleeps until a page is due).
    func timerOvershoot(count: Int) -> [Double] {
        (0..<count).map { _ in
            let t0 = monotonicNanoseconds()
            _ = ckvm_ppoll_ns(nil, 0, Int64(Self.apfStoreDelayNanos))
            return Double(monotonicNanoseconds() - t0) - Double(Self.apfStoreDelayNanos)
        }
    }

    /// Runs `warm + samples` async faults and returns the `samples` after the warm-up.
    func apfPhase(samples: Int, warm: Int) throws(KVMError) -> APFPhaseResult {
        let (result, pager) = try apfVM(samples: samples, warm: warm)
        pager.stop()
        if let e = pager.error { throw e }
        return result
    }

    /// The VM and kernel end before the pager stops (KVM's async workers may still wait on
    /// the userfaultfd while the VM exists), as `AsyncPFBenchmark` does.
    private func apfVM(samples: Int, warm: Int) throws(KVMError) -> (APFPhaseResult, Pager) {
        let total = warm + samples
        var gc = GuestConfig(dataSize: (UInt64(total) * 4096 + (2 << 20) - 1) / (2 << 20) * (2 << 20))
        gc.irqchip = true
        gc.threads = 2
        gc.listCapacity = max(total, 64)
        let g = try GuestVM(kvm: kvm, config: gc)
        try g.vm.disableHaltPolling()
        let perNano = try g.tscTicksPerNano()
        var po = PagerOptions()
        po.storeDelayNanos = Self.apfStoreDelayNanos
        po.storeContent = .pattern(salt: 0x6170_6663_616c)
        po.recordCopyTimes = true
        let pager = try Pager(region: g.data, options: po)
        try pager.start()
        let base = g.layout.dataVirtual.rawValue
        var f = GuestVM.command(MEMVIRT_CMD_CALIBRATE)
        f.pattern = UInt64(MEMVIRT_CAL_TOUCH_READ.rawValue)
        f.base = base
        f.count = UInt64(total)
        f.stride = 4096
        f.list = g.layout.list
        let specs = [GuestThreadSpec(vcpu: 0, mailbox: GuestVM.command(MEMVIRT_CMD_COUNT)), GuestThreadSpec(vcpu: 0, mailbox: f)]
        var ko = GuestKernelOptions()
        ko.asyncPF = true
        ko.recordAPFTimes = true
        ko.recordExits = true
        ko.finishWhenDone = [1]
        let kernel = try GuestKernel(vm: g, threads: specs, options: ko)
        let stats = try StatProbe(g)
        let before = try stats.read()
        // Each fault takes the store delay plus well under a millisecond; 20 ms each at most.
        let reports = try kernel.run(forNanos: UInt64(total) * 20_000_000 + 2_000_000_000)
        var counters = try stats.delta(since: before)
        let wait = monotonicNanoseconds()
        while pager.outstanding > 0 && monotonicNanoseconds() - wait < 2_000_000_000 { usleepNanos(1_000_000) }
        if let e = pager.error { throw e }
        guard kernel.isDone(1) else {
            throw KVMError.invalid("calibration async PF: the faulting thread did not finish its \(total) reads in time (\(reports[0].apfNotPresent) \"page not present\", \(reports[0].apfReady) \"page ready\")")
        }
        let rep = reports[0]
        let ticks = try (0..<total).map { (i) throws(KVMError) in
            try g.runtime.load(UInt64.self, at: GuestPhysicalAddress(rawValue: g.layout.list + UInt64(8 * i)))
        }
        // Matching: the faulting thread reads pages 0, 1, ... in order, one fault at a time, so
        // the i-th "page not present" is page i's, as is the pager's copy of page i; "page
        // ready" carries the token "page not present" gave (KVM's, in CR2: not the address).
        var copied: [Int: UInt64] = [:]
        for c in pager.report().copyTimes { copied[c.page] = c.nanos }
        let notPresent = rep.apfTimes.filter { !$0.ready }
        var ready: [UInt32: APFEventTiming] = [:]
        for e in rep.apfTimes where e.ready && e.nextEntryNanos > 0 { ready[e.token] = e }
        var out = APFPhaseResult()
        guard notPresent.count == total else {
            out.counters = counters
            out.phaseFaults = total
            out.problem = "\(notPresent.count) \"page not present\" for \(total) faulting reads (each read must go async once)"
            return (out, pager)
        }
        for i in warm..<total {
            let np = notPresent[i]
            guard np.nextEntryNanos > 0, let rd = ready[np.token], let c = copied[i], c >= np.exitNanos, rd.exitNanos >= c else { continue }
            let guestNanos = Double(ticks[i]) / perNano
            out.notPresentHandling.append(Double(np.nextEntryNanos - np.exitNanos))
            out.readyToExit.append(Double(rd.exitNanos - c))
            out.readyHandling.append(Double(rd.nextEntryNanos - rd.exitNanos))
            out.ready.append(Double(rd.nextEntryNanos - c))
            out.faultTotal.append(guestNanos)
            out.kvmLegs.append(guestNanos - Double(rd.nextEntryNanos - np.exitNanos))
        }
        out.faults = out.ready.count
        out.pagerLate = pager.report().lateNanos.suffix(samples).map { Double($0) }
        // Ticks on the counting thread (position 0) whose KVM_RUN was entered before they were
        // due: the timer's own way in (hrtimer, kick, injection, the stub's exit).
        if let armed = kernel.timerArmedNanos.first {
            let slice = ko.timeSliceNanos
            for e in rep.exitLog where e.vector == Int16(MEMVIRT_VECTOR_TIMER) && e.thread == 0 && e.exitNanos > armed + slice {
                let due = armed + (e.exitNanos - armed) / slice * slice
                if e.enteredNanos < due { out.tickDelivery.append(Double(e.exitNanos - due)) }
            }
        }
        // The scheduler's counts over the whole phase (warm-up included: `phaseFaults` reads)
        // beside KVM's stats: one "page not present" and one matched "page ready" per read
        // when every read went async.
        counters["apf_not_present"] = rep.apfNotPresent
        counters["apf_ready"] = rep.apfReady - rep.apfWakeAll - rep.apfUnmatched
        counters["apf_unmatched"] = rep.apfUnmatched
        out.counters = counters
        out.phaseFaults = total
        return (out, pager)
    }
}
