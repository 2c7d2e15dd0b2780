import MemVirtCore

/// The KVM engine's async-PF case (`AsyncPFBenchmark` with one vCPU) as it runs on a
/// shadow-paging host, event by event: a faulting thread reading random words of guest
/// memory behind the userfaultfd pager's FIFO resident limit, a working thread, both on one
/// vCPU scheduled round-robin by the guest kernel's periodic timer (MemVirtKVM's
/// `GuestKernel`: a tick puts the current thread at the back of the run queue; "page ready"
/// puts the woken thread in front and runs it at once), and KVM's async page faults:
///
/// - a read of a page that is not resident exits (the shadow fault, `vmExitRoundTrip` +
///   `shadowFaultHandler`); KVM queues the page-in on its async worker
///   (`kvm_arch_setup_async_pf`, `apfSetup`) and injects "page not present"
///   (`kvm_arch_async_page_not_present`); the exception reaches the guest kernel's #PF stub,
///   which exits to the VMM-side handler, and the woken thread's entry later returns to the
///   read (`apfFaultLegs`, both charged here, on the faulting thread's time); the guest kernel
///   parks the thread and loads the next (`guestExceptionRoundTrip` + `apfNotPresentHandler`);
/// - the worker's fault reaches the pager, which serves it `storeDelay` after it arrived
///   (its pending queue; it sleeps in ppoll until then and wakes `timerWakeLatency` late,
///   drawn over +- `timerWakeSpread` / 2: the variation keeps the fault cycle from locking to
///   the guest's timer),
///   evicting the oldest resident page first (store write + MADV_DONTNEED,
///   `storeWritePerPage` + `dontneedPerPage`; the evicted page's spte zapped, and
///   `kvm_flush_remote_tlbs` kicks the vCPU out of guest mode, where the working thread runs,
///   and waits for it: `remoteFlushInitiator`) and reading the page from the store
///   (`storeReadPerPage`); UFFDIO_COPY maps it;
/// - `pageReadyDelay` later (the worker's wake-up, `kvm_arch_async_page_ready` prefaulting the
///   shadow entry, the "page ready" interrupt, `kvm_arch_async_page_present`) the vCPU takes
///   the interrupt (`vmExitRoundTrip`) and the guest kernel wakes the thread and runs it
///   (`apfReadyHandler`); the read is repeated and hits. A tick that comes due during
///   `pageReadyDelay` is delivered after "page ready" (the higher vector) and so takes the
///   vCPU from the woken thread.
///
/// A read of a resident page costs `readCycles` (the guest loop's PRNG step, load and compare),
/// plus a shadow fault the first time after the page became resident without a shadow entry
/// (the pages the pager made resident before the run). A tick costs what `VMSimulation`
/// charges (`tickExits` x `vmExitRoundTrip` + `tickHandler`). Times in nanoseconds; cycles
/// are converted at the cost model's clock.
public struct PagerAsyncPFConfig: Sendable {
    /// Guest memory the faulting thread reads, in 4 KiB pages.
    public var pages: Int
    /// The pager's resident limit, pages (FIFO).
    public var residentPages: Int
    /// Pages 0..<residentPages resident (in FIFO order) before the run, without shadow entries.
    public var startFull = true
    /// The store's service time, ns after the fault reached the pager.
    public var storeDelay: Double
    /// The guest kernel's timer period (its round-robin time slice), ns.
    public var timeSlice: Double
    /// Simulated time, ns.
    public var duration: Double
    /// The faulting thread's PRNG state and its `bounded(state, n)` (the guest's
    /// memvirt_bounded, so the model reads the guest's sequence of words).
    public var rngState: UInt64 = 1
    public var bounded: @Sendable (inout UInt64, UInt64) -> UInt64 = { s, n in
        var g = SplitMix64(seed: s)
        let v = g.bounded(n)
        s = g.state
        return v
    }
    /// The faulting thread's own work per read (loop, PRNG step, compare), cycles: as
    /// `VMSimulationConfig.faultComputeCycles`.
    public var readCycles: Double = 50
    public var costs: CostModel
    public var guestCosts = GuestSchedulingCosts()
    public var hostCosts = HostCosts()

    public init(pages: Int, residentPages: Int, storeDelay: Double, timeSlice: Double, duration: Double, costs: CostModel) {
        self.pages = pages
        self.residentPages = residentPages
        self.storeDelay = storeDelay
        self.timeSlice = timeSlice
        self.duration = duration
        self.costs = costs
    }
}

/// What the model's run did (the KVM case's counters and its scheduler's times).
public struct PagerAsyncPFResult: Sendable, Equatable {
    public var reads: UInt64 = 0
    public var notPresent: UInt64 = 0
    public var ready: UInt64 = 0
    public var evictions: UInt64 = 0
    public var storeReads: UInt64 = 0
    /// Shadow faults on resident pages without a shadow entry (fixed at once).
    public var shadowFaults: UInt64 = 0
    public var ticks: UInt64 = 0
    /// Ticks that took the vCPU from the faulting thread (it waits a slice in the run queue).
    public var faultingPreempted: UInt64 = 0
    /// Sums over faults, ns, clocked as `VCPUSchedulerReport` clocks them (at the start of the
    /// guest kernel's handlers): "page not present" to "page ready" (the thread parked), and
    /// from a wake-up to the next "page not present".
    public var parkedNanos: Double = 0
    public var runToFaultNanos: Double = 0
    /// Time the faulting thread held the vCPU, and the working thread, ns.
    public var faultingNanos: Double = 0
    public var workingNanos: Double = 0
    /// Of the vCPU's time: hypervisor (exits, async-PF set-up), guest kernel (handlers, ticks).
    public var hypervisorNanos: Double = 0
    public var guestKernelNanos: Double = 0
    public var simulatedNanos: Double = 0
    /// Per fault, the pager's time (evict, store read) and the wait for the store, ns (sums).
    public var pagerWorkNanos: Double = 0
}

public enum PagerAsyncPF {
    /// Runs the model for `config.duration` (the last read may end a little later).
    public static func run(_ c: PagerAsyncPFConfig) throws(InputError) -> PagerAsyncPFResult {
        guard c.pages >= 1 else { throw InputError("async-PF model: guest memory of \(c.pages) pages: at least 1") }
        guard c.residentPages >= 1, c.residentPages <= c.pages else {
            throw InputError("async-PF model: resident limit \(c.residentPages) pages: use 1...\(c.pages) (the guest memory)")
        }
        guard c.storeDelay >= 0, c.timeSlice > 0, c.duration > 0 else {
            throw InputError("async-PF model: store delay \(c.storeDelay) ns, time slice \(c.timeSlice) ns, duration \(c.duration) ns: need delay >= 0, slice and duration > 0")
        }
        let ghz = c.costs.clockGHz
        func ns(_ cycles: Double) -> Double { cycles / ghz }
        let k = c.costs, g = c.guestCosts, h = c.hostCosts
        let shadowFault = ns(k.vmExitRoundTrip + k.shadowFaultHandler)
        // kvm_arch_setup_async_pf's queueing, then the #PF stub's exit to the VMM and (after
        // "page ready") the entry back to the read: `apfFaultLegs`, charged before the handler.
        let npHyper = shadowFault + ns(g.apfSetup) + ns(g.apfFaultLegs)
        let npGuest = ns(k.guestExceptionRoundTrip + g.apfNotPresentHandler)
        // The pager's MADV_DONTNEED zaps the evicted page's spte through KVM's mmu notifier
        // (kvm_mmu_notifier_invalidate_range_start -> kvm_unmap_gfn_range), whose
        // kvm_flush_remote_tlbs kicks the vCPU (in guest mode: the working thread runs while the
        // faulting thread is parked) and waits for it.
        let evictWork = ns(h.storeWritePerPage + h.dontneedPerPage + h.remoteFlushInitiator)
        let readWork = ns(h.storeReadPerPage)
        // The pager sleeps in ppoll until the page is due, and wakes that late: each wake-up's
        // lateness drawn uniformly over timerWakeLatency +- timerWakeSpread / 2 (its own
        // generator: the reads' sequence stays the guest's).
        var wakeRNG = SplitMix64(seed: c.rngState ^ 0x7469_6d65_7277_616b)
        func storeWait() -> Double {
            guard c.storeDelay > 0 else { return 0 }
            let u = Double(wakeRNG.next() >> 11) / Double(1 << 53)
            return c.storeDelay + max(0, h.timerWakeLatency + (u - 0.5) * h.timerWakeSpread)
        }
        let readyHyper = ns(k.vmExitRoundTrip)
        let readyGuest = ns(g.apfReadyHandler)
        let tickHyper = ns(g.tickExits * k.vmExitRoundTrip)
        let tickGuest = ns(g.tickHandler)
        let readTime = ns(c.readCycles)

        var r = PagerAsyncPFResult()
        var resident = [Bool](repeating: false, count: c.pages)
        var mapped = [Bool](repeating: false, count: c.pages)
        var fifo: [Int32] = []
        fifo.reserveCapacity(c.pages)
        var head = 0
        if c.startFull {
            for p in 0..<c.residentPages { resident[p] = true; fifo.append(Int32(p)) }
        }
        var count = fifo.count
        var rng = c.rngState
        let words = UInt64(c.pages) * 512

        enum Who { case faulting, working }
        var t = 0.0
        var nextTick = c.timeSlice
        var current: Who = .faulting
        var faultingQueued = false  // the faulting thread waits in the run queue (after a tick)
        var readyAt: Double? = nil  // "page ready" reaches the vCPU (the faulting thread parked)
        var parkedAt = 0.0, wokenAt: Double? = nil
        var page = -1               // the page of the read in progress (-1: draw a new one)

        func tick() {
            r.ticks += 1
            t += tickHyper + tickGuest
            r.hypervisorNanos += tickHyper
            r.guestKernelNanos += tickGuest
            nextTick += c.timeSlice
            // GuestKernel: the current thread to the back, the first runnable loaded.
            if current == .faulting {
                r.faultingPreempted += 1
                faultingQueued = true
                current = .working
            } else if faultingQueued {
                faultingQueued = false
                current = .faulting
            }
        }

        while t < c.duration {
            switch current {
            case .working:
                // From the page's arrival KVM's "page ready" is on its way (the worker's
                // completion, kvm_arch_async_page_present_queued's request and kick; at the next
                // entry kvm_check_async_pf_completion -> kvm_arch_async_page_present sets the
                // interrupt): a tick that comes due in that span (pageReadyDelay) finds it
                // pending and is injected after it (vector 33 above the timer's 32), so it
                // takes the vCPU from the woken thread. (The span includes the worker's wake-up,
                // before the request is made: an upper bound on the window.)
                // A tick reaches the guest `tickDeliveryDelay` after it is due, so one due that
                // much before the page's arrival also finds "page ready" pending at its injection.
                let deferTick = readyAt.map { nextTick >= $0 - g.pageReadyDelay - g.tickDeliveryDelay } ?? false
                let until = deferTick ? readyAt! : min(nextTick, readyAt ?? .infinity)
                if until > t { r.workingNanos += until - t; t = until }
                if let ra = readyAt, ra <= nextTick || deferTick {
                    // "Page ready": the interrupt's exit, the guest's handler; the woken
                    // thread runs first, the interrupted one behind it.
                    readyAt = nil
                    r.ready += 1
                    // Parked until the guest kernel's "page ready" handler starts (after the
                    // interrupt's exit), as GuestKernel clocks it; woken from then on.
                    r.parkedNanos += t + readyHyper - parkedAt
                    wokenAt = t + readyHyper
                    t += readyHyper + readyGuest
                    r.hypervisorNanos += readyHyper
                    r.guestKernelNanos += readyGuest
                    current = .faulting
                } else {
                    tick()
                }
            case .faulting:
                if t >= nextTick { tick(); continue }
                if page < 0 { page = Int(c.bounded(&rng, words) / 512) }
                let start = t
                if !resident[page] {
                    // Not present: the fault exits, KVM goes async, the guest parks the thread.
                    r.notPresent += 1
                    // The guest kernel's clocks (GuestKernel) switch at its #PF handler's
                    // start: after the exit and the exception's delivery.
                    let handlerStart = t + npHyper + ns(k.guestExceptionRoundTrip)
                    if let w = wokenAt { r.runToFaultNanos += handlerStart - w; wokenAt = nil }
                    parkedAt = handlerStart
                    t += npHyper + npGuest
                    r.hypervisorNanos += npHyper
                    r.guestKernelNanos += npGuest
                    r.faultingNanos += t - start
                    // The pager: the fault arrives as the not-present exit reaches the VMM
                    // (KVM's async worker and then the pager thread are woken on other CPUs
                    // meanwhile; on kvm_pvm the pager read the message within 4 us of that
                    // exit, 2026-12-04 quick case); served after the store delay, evicting
                    // first.
                    var work = readWork
                    while count + 1 > c.residentPages && head < fifo.count {
                        let q = Int(fifo[head])
                        head += 1
                        if resident[q] {
                            resident[q] = false
                            mapped[q] = false
                            count -= 1
                            r.evictions += 1
                            work += evictWork
                        }
                    }
                    if head > 4096 && head * 2 > fifo.count { fifo.removeFirst(head); head = 0 }
                    resident[page] = true
                    mapped[page] = true  // kvm_arch_async_page_ready prefaults the shadow entry
                    fifo.append(Int32(page))
                    count += 1
                    r.storeReads += 1
                    r.pagerWorkNanos += work
                    readyAt = max(start + npHyper + storeWait() + work + g.pageReadyDelay, t)
                    current = .working
                    continue
                }
                if !mapped[page] {
                    mapped[page] = true
                    r.shadowFaults += 1
                    t += shadowFault
                    r.hypervisorNanos += shadowFault
                }
                t += readTime
                r.reads += 1
                page = -1
                r.faultingNanos += t - start
            }
        }
        r.simulatedNanos = t
        return r
    }
}
