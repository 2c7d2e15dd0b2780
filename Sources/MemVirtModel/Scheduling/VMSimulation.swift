import MemVirtCore

/// A VM of several vCPUs running guest threads in simulated time, over nested paging and a
/// host with limited memory and a swap device: the world of seed 001's async-page-fault
/// benchmark. See `VMSimulation` for the event loop.
public struct VMSimulationConfig: Sendable {
    public var vcpus = 4
    /// Guest RAM.
    public var guestMemory: ByteCount = .gib(2)
    /// The VM's host memory limit (nil: none).
    public var hostLimit: ByteCount? = .mib(512)
    /// Async page faults enabled in the guest (MSR_KVM_ASYNC_PF_EN).
    public var apf = true
    /// Simulated time to run after set-up, ns.
    public var duration: Double = 60e9
    /// Threads doing random accesses over their own buffer ("faulting").
    public var faultThreads = 4
    /// Threads incrementing a per-thread counter ("working").
    public var workThreads = 4
    /// Each faulting thread's buffer. 4 x 448 MiB = 1.75 GiB of a 2 GiB guest (the rest is
    /// the guest kernel's, not simulated).
    public var faultBuffer: ByteCount = .mib(448)
    /// Share of a faulting thread's accesses that write.
    public var faultWriteRatio = 0.5
    /// A faulting thread's own work per access (loop, SplitMix64 step), cycles.
    public var faultComputeCycles: Double = 50
    /// A counter thread's increments per second while it runs: 1.1e9, calibrated on the seed's
    /// APF run (258.8e9 increments by 4 workers in 60 s, 97.93% of the time working).
    public var incrementsPerSecond = 1.1e9
    public var device: SwapDeviceModel = .hdd
    public var hostCosts = HostCosts()
    public var guestCosts = GuestSchedulingCosts()
    public var scheduler = GuestSchedulerParameters.forCPUs(4)
    public var costs: CostModel = .bareMetal
    public var tlb: TLBConfig = .goldenCove
    public var paging = PagingConfig()
    /// KVM: at most 64 async page faults outstanding per vCPU (ASYNC_PF_PER_VCPU).
    public var maxOutstandingAPF = 64
    public var seed: UInt64 = 1
    public init() {}
}

/// Where a vCPU's time went.
public enum VCPUTime: Int, CaseIterable, Sendable {
    case workThread, faultThread, guestKernel, hypervisor, blocked, idle
    public var name: String {
        switch self {
        case .workThread: "work_thread"
        case .faultThread: "fault_thread"
        case .guestKernel: "guest_kernel"
        case .hypervisor: "hypervisor"
        case .blocked: "blocked"
        case .idle: "idle"
        }
    }
}

/// What a simulation measured.
public struct VMSimulationResult: Sendable {
    /// Per counter thread: increments done.
    public var workerIncrements: [Double]
    /// Per faulting thread: accesses completed.
    public var faultAccesses: [UInt64]
    /// Time by category summed over vCPUs (ns), indexed by `VCPUTime`.
    public var time: [Double]
    /// Counters of every vCPU merged (host and APF counters included).
    public var counters: CounterSet
    public var peakResidentFrames: UInt64
    public var limitFrames: UInt64?
    public var swapReads: UInt64
    public var swapWrites: UInt64
    public var writebackRescues: UInt64
    public var reclaimThrottles: UInt64
    public var simulatedSeconds: Double
    public var setupWallSeconds: Double
    public var runWallSeconds: Double
    public var events: UInt64
    /// The most async page faults outstanding on one vCPU at once.
    public var maxOutstandingAPF: Int
    /// A hash of every value the threads read: equal results mean equal guest behaviour.
    public var checksum: UInt64
    public var totalIncrements: Double { workerIncrements.reduce(0, +) }
    public func share(_ c: VCPUTime) -> Double { time[c.rawValue] / max(time.reduce(0, +), 1) }
}

/// The discrete-event simulation. Each vCPU is a timeline; events (a vCPU resuming, its timer
/// tick, an async "page ready") are kept in one heap ordered by time. A counter thread's work
/// is computed from the time it ran (no per-increment simulation); a faulting thread's
/// accesses are simulated one by one through the TLBs, the 2D walk and the host, each taking
/// the simulated time the cost model gives, and a vCPU runs accesses only up to the next
/// event of any vCPU, so effects between vCPUs (reclaim zapping another's pages, device
/// queueing) happen in time order.
///
/// The guest is a Linux of 2010: CFS per vCPU (vruntime, sched_latency, wake-up preemption
/// with GENTLE_FAIR_SLEEPERS), a 1 kHz tick stopped when idle, and the KVM async-page-fault
/// protocol: with APF on, a user-mode access that needs swap I/O sends "page not present"
/// with a token; the guest parks the thread and schedules another (or halts); on I/O
/// completion KVM prefaults the EPT entry and injects "page ready", which wakes the thread.
/// With APF off, or for a kernel-mode access, or with 64 faults outstanding, the vCPU
/// blocks in the host until the page is in; a page still in the swap cache is mapped at once
/// (the get_user_pages_noio rule: only faults that need I/O go async).
public final class VMSimulation {
    public let config: VMSimulationConfig
    public let host: HostMemory
    public let nested: NestedPaging
    public let kernel: SimulatedGuestKernel
    public let space: AddressSpace
    let ghz: Double

    final class Thread {
        enum Kind { case work, fault }
        enum State { case runnable, running, sleeping }
        let id: Int
        let kind: Kind
        let vcpu: Int
        var state: State = .runnable
        var vruntime: Double = 0
        var sumExec: Double = 0
        var execAtPick: Double = 0
        var increments: Double = 0
        let base: UInt64
        let pages: UInt64
        var rng: SplitMix64
        var pending: (va: UInt64, write: Bool)?
        var needsTouch = true
        var accesses: UInt64 = 0
        var apfGfn: UInt64 = 0
        init(id: Int, kind: Kind, vcpu: Int, base: UInt64, pages: UInt64, seed: UInt64) {
            self.id = id; self.kind = kind; self.vcpu = vcpu; self.base = base; self.pages = pages
            rng = SplitMix64(seed: SplitMix64.derive(seed: seed, stream: UInt64(id)))
        }
    }

    final class VCPU {
        enum State { case running, blocked, idle }
        let index: Int
        let cpu: ModelCPU
        var time: Double = 0
        var state: State = .running
        var current: Thread?
        var runqueue: [Thread] = []
        var blockedUntil: Double = 0
        var resumeGen: UInt32 = 0
        var tickScheduled = false
        var tickDeferred = false
        var needsResched = false
        var outstanding = 0
        var deferredReady: [Thread] = []
        var minVruntime: Double = 0
        var overhead: Double = 0
        var buckets = [Double](repeating: 0, count: VCPUTime.allCases.count)
        init(index: Int, cpu: ModelCPU) { self.index = index; self.cpu = cpu }
    }

    struct Event: Comparable {
        enum Kind: UInt8 { case resume, tick, pageReady }
        var time: Double
        var seq: UInt64
        var kind: Kind
        var vcpu: Int32
        var arg: Int32
        var gen: UInt32
        static func < (a: Event, b: Event) -> Bool { a.time < b.time || (a.time == b.time && a.seq < b.seq) }
    }

    var vcpus: [VCPU] = []
    var threads: [Thread] = []
    var heap = BinaryHeap<Event>()
    var seq: UInt64 = 0
    var events: UInt64 = 0
    var active: VCPU?
    var checksum: UInt64 = FNV1a.offsetBasis
    var setupSeconds = 0.0
    var prepared = false
    var maxOutstanding = 0

    /// `host`: a host shared with other VMs (KSM across guests); nil makes one from `config`.
    public init(config: VMSimulationConfig, host shared: HostMemory? = nil) throws(InputError) {
        guard config.vcpus >= 1, config.faultThreads + config.workThreads >= 1 else { throw InputError("a VM needs vCPUs and threads") }
        self.config = config
        ghz = config.costs.clockGHz
        let capacity = (config.guestMemory.rawValue + PageSize.size1G.offsetMask) & ~PageSize.size1G.offsetMask
        if let h = shared { host = h } else {
            host = try HostMemory(capacity: capacity + (1 << 30), limit: config.hostLimit, swapDevice: config.device,
                                  swapSlots: Int(capacity / 4096), costs: config.hostCosts)
        }
        let cpus = (0..<config.vcpus).map { _ in ModelCPU(tlb: config.tlb, paging: config.paging, costs: config.costs) }
        nested = try NestedPaging(cpu: cpus[0], guestCapacity: capacity, hostMemory: host)
        for c in cpus { nested.bind(c) }
        nested.bind(cpus[0])
        nested.clockDriven = true
        kernel = SimulatedGuestKernel(memory: nested.guestMemory, capacity: capacity, paging: config.paging)
        space = try kernel.createAddressSpace()
        vcpus = cpus.enumerated().map { VCPU(index: $0.offset, cpu: $0.element) }
        for v in vcpus {
            v.cpu.modelLineCache = false
            v.cpu.counters.markApplicable([.hostMinorFaults, .hostMajorFaults, .swapIns, .swapOuts, .apfNotPresent, .apfReady, .exits, .eptViolations, .tlbFlush])
        }
        // Threads: faulting thread i and counter thread i share vCPU i mod n (the balanced
        // placement the guest's load balancer reaches with 8 threads on 4 vCPUs).
        let base = WorkloadSpec.defaultBase.rawValue
        let bufferPages = config.faultBuffer.rawValue / 4096
        guard UInt64(config.faultThreads) * config.faultBuffer.rawValue + UInt64(config.workThreads) * 4096 + (64 << 20) <= capacity else {
            throw InputError("\(config.faultThreads) x \(config.faultBuffer) of buffers do not fit \(config.guestMemory) of guest memory")
        }
        var id = 0
        for i in 0..<config.faultThreads {
            let start = base + UInt64(i) << 32
            try kernel.map(VirtualMemoryArea(start: start, end: start + bufferPages * 4096, pageSize: .size4K, writable: true), in: space)
            threads.append(Thread(id: id, kind: .fault, vcpu: i % config.vcpus, base: start, pages: bufferPages, seed: config.seed))
            id += 1
        }
        for i in 0..<config.workThreads {
            let start = base + UInt64(64 + i) << 32
            try kernel.map(VirtualMemoryArea(start: start, end: start + 4096, pageSize: .size4K, writable: true), in: space)
            threads.append(Thread(id: id, kind: .work, vcpu: i % config.vcpus, base: start, pages: 1, seed: config.seed))
            id += 1
        }
        for t in threads { vcpus[t.vcpu].runqueue.append(t) }
        nested.onFlush = { [unowned self] in self.flushed() }
    }

    @inline(__always) func ns(_ cycles: Double) -> Double { cycles / ghz }

    /// Guest-virtual bases and sizes (pages) of the faulting threads' buffers.
    public var faultBuffers: [(base: UInt64, pages: UInt64)] { threads.filter { $0.kind == .fault }.map { ($0.base, $0.pages) } }
    /// A vCPU's simulated clock (ns) and its time by `VCPUTime` category.
    public func clock(vcpu: Int) -> Double { vcpus[vcpu].time }
    public func setClock(vcpu: Int, _ t: Double) { vcpus[vcpu].time = max(vcpus[vcpu].time, t) }
    public func timeBuckets(vcpu: Int) -> [Double] { vcpus[vcpu].buckets }
    /// The guest-physical frame mapping `va` now (nil if the guest has not mapped it).
    public func guestFrame(of va: UInt64) -> UInt64? {
        kernel.lookupLeaf(va, space: space).map { $0.entry.address >> 12 }
    }
    /// Counters of every vCPU merged (settling the paging mode's own counts first).
    public func counters() -> CounterSet {
        nested.settle(cpu: vcpus[0].cpu)
        var c = CounterSet()
        for v in vcpus { v.cpu.settleCosts(); c.merge(v.cpu.counters) }
        return c
    }

    // MARK: Set-up

    /// Touches every page once (writes), untimed, interleaving the threads' buffers so every
    /// buffer ends with the same share resident; then resets statistics and the device.
    public func prepare() throws {
        guard !prepared else { return }
        prepared = true
        let clock = WallClock()
        host.timing = false
        let v = vcpus[0]
        let faulting = threads.filter { $0.kind == .fault }
        let maxPages = faulting.map(\.pages).max() ?? 0
        for p in 0..<maxPages {
            for t in faulting where p < t.pages {
                _ = try directAccess(v, va: t.base + p * 4096, write: true, value: t.base &+ p &* 0x9E37_79B9_7F4A_7C15)
            }
        }
        for t in threads where t.kind == .work { _ = try directAccess(v, va: t.base, write: true, value: 0) }
        host.timing = true
        host.device.reset()
        for v in vcpus {
            v.time = 0
            nested.settle(cpu: v.cpu)
            v.cpu.tlb.flushAll(keepGlobal: false)
            v.cpu.walkCaches.flushAll()
            v.cpu.resetStatistics()
            v.buckets = v.buckets.map { _ in 0 }
        }
        checksum = FNV1a.offsetBasis
        setupSeconds = clock.seconds
    }

    /// One access on `v` outside the event loop: I/O is waited for by moving the vCPU's clock.
    /// Returns the value read (or written).
    @discardableResult
    public func directAccess(vcpu index: Int = 0, va: UInt64, write: Bool, value: UInt64) throws -> UInt64 {
        try directAccess(vcpus[index], va: va, write: write, value: value)
    }

    func directAccess(_ v: VCPU, va: UInt64, write: Bool, value: UInt64) throws -> UInt64 {
        var tries = 0
        while true {
            tries += 1
            if tries > 64 { throw GuestError(message: "access to \(GuestVirtualAddress(va)) did not resolve") }
            switch try access(v, va: va, write: write, value: value, bucket: .faultThread) {
            case .done(let until, let read):
                if until > v.time { v.buckets[VCPUTime.blocked.rawValue] += until - v.time; v.time = until }
                return read
            case .io(_, let readyAt):
                if readyAt > v.time { v.buckets[VCPUTime.blocked.rawValue] += readyAt - v.time; v.time = readyAt }
            }
        }
    }

    // MARK: The event loop

    /// Runs `config.duration` of simulated time (preparing first if needed).
    public func run() throws -> VMSimulationResult {
        try prepare()
        let clock = WallClock()
        let end = config.duration
        for v in vcpus {
            scheduleResume(v, at: 0)
            scheduleTick(v, at: config.scheduler.tickPeriod * (1 + Double(v.index) / Double(vcpus.count)))
        }
        while let e = heap.popMin(), e.time <= end {
            events += 1
            let v = vcpus[Int(e.vcpu)]
            let t = max(e.time, v.time)
            switch e.kind {
            case .resume:
                guard e.gen == v.resumeGen else { continue }
                advance(v, to: t)
                if v.state == .blocked {
                    guard t >= v.blockedUntil else { continue }
                    unblock(v)
                }
                try dispatch(v)
            case .tick:
                v.tickScheduled = false
                advance(v, to: t)
                switch v.state {
                case .blocked: v.tickDeferred = true
                case .idle: break  // NOHZ: no tick while idle
                case .running:
                    tick(v)
                    scheduleTick(v, at: t + config.scheduler.tickPeriod)
                    try dispatch(v)
                }
            case .pageReady:
                advance(v, to: t)
                let th = threads[Int(e.arg)]
                if v.state == .blocked { v.deferredReady.append(th) } else {
                    pageReady(v, th)
                    try dispatch(v)
                }
            }
        }
        for v in vcpus { advance(v, to: end) }
        return result(wall: clock.seconds)
    }

    func unblock(_ v: VCPU) {
        v.state = .running
        // The vCPU thread is woken in the host and re-enters the guest.
        spend(v, ns(config.costs.vmExitRoundTrip), .hypervisor)
        if v.tickDeferred {
            // The timer interrupts that came due while blocked arrive as one on entry.
            v.tickDeferred = false
            tick(v)
            scheduleTick(v, at: v.time + config.scheduler.tickPeriod)
        }
        let ready = v.deferredReady
        v.deferredReady = []
        for th in ready { pageReady(v, th) }
    }

    /// Runs `v` until it has nothing to do before another event: a counter thread computes
    /// passively (its time is counted when the next event reaches this vCPU); a faulting
    /// thread makes accesses up to the next event's time.
    func dispatch(_ v: VCPU) throws {
        active = v
        if v.overhead > 0 {
            let o = v.overhead
            v.overhead = 0
            spend(v, o, .hypervisor)
        }
        while v.state == .running {
            if v.needsResched || v.current == nil {
                switchThread(v)
                if v.current == nil {
                    v.state = .idle  // HLT
                    return
                }
                continue
            }
            let th = v.current!
            switch th.kind {
            case .work:
                guard th.needsTouch || th.pending != nil else { return }
                th.needsTouch = false
                let (va, w) = th.pending ?? (th.base, true)
                if try !perform(v, th, va: va, write: w, bucket: .workThread) { return }
                if v.needsResched { continue }
                return
            case .fault:
                let horizon = min(heap.min?.time ?? config.duration, config.duration)
                var first = true
                while first || v.time < horizon {
                    first = false
                    let a: (va: UInt64, write: Bool)
                    if let p = th.pending { a = p } else {
                        let page = th.rng.bounded(th.pages)
                        let word = th.rng.bounded(512)
                        let w = th.rng.unitDouble() < config.faultWriteRatio
                        a = (th.base + page * 4096 + word * 8, w)
                    }
                    if try !perform(v, th, va: a.va, write: a.write, bucket: .faultThread) { return }
                    if v.needsResched || th.state != .running { break }
                }
                if v.needsResched || th.state != .running { continue }
                scheduleResume(v, at: v.time)
                return
            }
        }
    }

    /// One access of `th`, with what follows from it (async page fault, blocking). Returns
    /// false when the vCPU stopped (blocked in the host).
    func perform(_ v: VCPU, _ th: Thread, va: UInt64, write: Bool, bucket: VCPUTime) throws -> Bool {
        let value = write ? va ^ (th.accesses &* 0x9E37_79B9_7F4A_7C15) : 0
        switch try access(v, va: va, write: write, value: value, bucket: bucket) {
        case .done(let until, _):
            th.pending = nil
            th.accesses += 1
            if until > v.time { block(v, until: until); return false }
            return true
        case .io(let gfn, let readyAt):
            th.pending = (va, write)
            // KVM goes async only for a guest in user mode with interrupts on, APF enabled,
            // and fewer than 64 outstanding on this vCPU (kvm_can_do_async_pf).
            if config.apf && v.cpu.privilege == .user && v.outstanding < config.maxOutstandingAPF {
                notPresent(v, th, gfn: gfn, readyAt: readyAt)
                return true
            }
            block(v, until: readyAt)
            return false
        }
    }

    func block(_ v: VCPU, until: Double) {
        v.state = .blocked
        v.blockedUntil = until
        scheduleResume(v, at: until)
    }

    /// "Page not present": the thread sleeps on the token; the vCPU schedules another.
    func notPresent(_ v: VCPU, _ th: Thread, gfn: UInt64, readyAt: Double) {
        v.cpu.counters.add(.apfNotPresent, 1)
        v.outstanding += 1
        maxOutstanding = max(maxOutstanding, v.outstanding)
        spend(v, ns(config.guestCosts.apfSetup), .hypervisor)
        spend(v, ns(config.costs.guestExceptionRoundTrip + config.guestCosts.apfNotPresentHandler), .guestKernel)
        th.state = .sleeping
        th.apfGfn = gfn
        v.needsResched = true
        push(.pageReady, readyAt + config.guestCosts.pageReadyDelay, v, arg: th.id)
    }

    /// "Page ready": KVM has prefaulted the EPT entry; the guest wakes the thread.
    func pageReady(_ v: VCPU, _ th: Thread) {
        v.outstanding -= 1
        v.cpu.counters.add(.apfReady, 1)
        active = v
        nested.bind(v.cpu)
        nested.now = v.time
        let before = split(v.cpu.ledger)
        nested.prefault(th.apfGfn << 12)
        let after = split(v.cpu.ledger)
        spend(v, ns(after.2 - before.2), .hypervisor)
        if v.state == .idle {
            v.state = .running
            spend(v, ns(config.guestCosts.haltWakeExits * config.costs.vmExitRoundTrip), .hypervisor)
            scheduleTick(v, at: v.time + config.scheduler.tickPeriod)
        } else {
            spend(v, ns(config.costs.vmExitRoundTrip), .hypervisor)
        }
        spend(v, ns(config.guestCosts.apfReadyHandler), .guestKernel)
        th.state = .runnable
        // place_entity with GENTLE_FAIR_SLEEPERS: a sleeper gets at most half a latency of credit.
        th.vruntime = max(th.vruntime, v.minVruntime - config.scheduler.latency / 2)
        v.runqueue.append(th)
        if let c = v.current {
            if c.vruntime - th.vruntime > config.scheduler.wakeupGranularity { v.needsResched = true }
        } else {
            v.needsResched = true
        }
    }

    /// scheduler_tick: CFS's check_preempt_tick (2.6.32).
    func tick(_ v: VCPU) {
        spend(v, ns(config.guestCosts.tickHandler), .guestKernel)
        spend(v, ns(config.guestCosts.tickExits * config.costs.vmExitRoundTrip), .hypervisor)
        guard let c = v.current, !v.runqueue.isEmpty else { return }
        let s = config.scheduler
        let nr = Double(v.runqueue.count + 1)
        let period = nr > s.latency / s.minGranularity ? nr * s.minGranularity : s.latency
        let ideal = period / nr
        let delta = c.sumExec - c.execAtPick
        if delta > ideal { v.needsResched = true; return }
        if delta < s.minGranularity { return }
        if let left = v.runqueue.min(by: { $0.vruntime < $1.vruntime }), c.vruntime - left.vruntime > ideal { v.needsResched = true }
    }

    /// schedule(): the runnable thread with the smallest vruntime.
    func switchThread(_ v: VCPU) {
        v.needsResched = false
        let prev = v.current
        if let p = prev, p.state == .running {
            p.state = .runnable
            v.runqueue.append(p)
        }
        var best = -1
        for (i, t) in v.runqueue.enumerated() where best < 0 || t.vruntime < v.runqueue[best].vruntime || (t.vruntime == v.runqueue[best].vruntime && t.id < v.runqueue[best].id) {
            best = i
        }
        guard best >= 0 else { v.current = nil; return }
        let n = v.runqueue.remove(at: best)
        n.state = .running
        n.execAtPick = n.sumExec
        v.current = n
        v.minVruntime = max(v.minVruntime, min(n.vruntime, v.runqueue.map(\.vruntime).min() ?? n.vruntime))
        if n !== prev {
            if n.kind == .work { n.needsTouch = true }
            spend(v, ns(config.guestCosts.contextSwitch), .guestKernel)
        }
    }

    func result(wall: Double) -> VMSimulationResult {
        var counters = CounterSet()
        nested.settle(cpu: vcpus[0].cpu)
        for v in vcpus {
            v.cpu.settleCosts()
            counters.merge(v.cpu.counters)
        }
        var time = [Double](repeating: 0, count: VCPUTime.allCases.count)
        for v in vcpus { for i in time.indices { time[i] += v.buckets[i] } }
        return VMSimulationResult(
            workerIncrements: threads.filter { $0.kind == .work }.map(\.increments),
            faultAccesses: threads.filter { $0.kind == .fault }.map(\.accesses),
            time: time, counters: counters, peakResidentFrames: host.peakResidentFrames, limitFrames: host.limitFrames,
            swapReads: host.device.reads, swapWrites: host.device.writes, writebackRescues: host.writebackRescues,
            reclaimThrottles: host.throttles, simulatedSeconds: config.duration / 1e9, setupWallSeconds: setupSeconds,
            runWallSeconds: wall, events: events, maxOutstandingAPF: maxOutstanding, checksum: checksum)
    }
}
