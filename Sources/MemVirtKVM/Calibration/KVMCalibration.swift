import CKVM
import MemVirtCore
import MemVirtGuest
#if canImport(Glibc)
import Glibc
#endif

/// What `memvirt kvm calibrate` runs.
public struct KVMCalibrationOptions: Sendable {
    /// Fewer samples (tests): `samplesPerBenchmark` 30 instead of 240.
    public var quick = false
    /// Samples per benchmark after warm-up (full: at least 200).
    public var samplesPerBenchmark: Int
    /// Benchmarks run round-robin in this many rounds, each taking its share of samples, so
    /// background load on the host falls on all of them alike. Derived parameters (a fault
    /// minus an exit) are the median of per-round differences: a round's parts were taken
    /// within the same second or two, so a drift of the host's speed cancels.
    public var rounds: Int
    /// Run the vCPU and userfaultfd threads at SCHED_FIFO priority 1 (where permitted), so
    /// other processes' load does not sit inside each exit's timing.
    public var realtime = true
    /// Guest-timed events (touches, exits, guest #PF, page-table writes, userfaultfd) are
    /// cheap to sample: they take this many times `samplesPerBenchmark` (full: 4), which keeps
    /// the small differences derived from them (a handler = a fault minus an exit) steady.
    public var eventSampleFactor: Int

    public init(quick: Bool = false) {
        self.quick = quick
        samplesPerBenchmark = quick ? 30 : 240
        rounds = quick ? 2 : 16
        eventSampleFactor = quick ? 1 : 4
    }
}

/// One micro-benchmark's result: its samples summarized (host nanoseconds per event) and the
/// KVM counters that moved while its timed events ran, per event, so a reader sees the path
/// taken was the intended one.
public struct CalibrationMeasurement: Sendable {
    /// Short id (`first_touch`, `exit_pio`, ...).
    public var name: String
    /// The per-event summary; `parameter` is the measurement's id here (not a model name).
    public var summary: CalibratedCost
    /// KVM binary-stat deltas over the timed events, divided by the events, nonzero only.
    public var countersPerEvent: [(String, Double)]
    /// The counter that must move once per event on the intended path, and whether it did
    /// (per-event delta within [0.9, 1.5]); nil where no counter marks the path.
    public var pathCounter: String?
    public var pathConfirmed: Bool
    /// The median of each round's samples (rounds with samples only, in order).
    public var roundMedians: [Double] = []

    public func counter(_ name: String) -> Double { countersPerEvent.first { $0.0 == name }?.1 ?? 0 }
}

/// Everything `kvm calibrate` measured: raw measurements and the model parameters derived
/// from them (the hand-off to machine profiles).
public struct CalibrationReport: Sendable {
    public var platform: KVMPlatform
    public var pagingMode: String
    public var tscKHz: Double
    public var quick: Bool
    public var date: String
    public var seconds: Double
    public var measurements: [CalibrationMeasurement]
    /// Model parameters ("StructName.property") in host nanoseconds: what a profile applies.
    public var costs: [CalibratedCost]
    /// Parameters derived below the resolution of the measurements they come from: a point
    /// estimate and an upper bound, not a measured median.
    public var bounds: [CalibratedBound] = []
    /// Parameters not produced and why (a derived value that came out non-positive, a path
    /// the counters did not confirm).
    public var omitted: [(String, String)]
    /// The host while the run went on (reference figure per round, steal time, load).
    public var conditions: CalibrationHostConditions? = nil
    /// The measuring threads ran at SCHED_FIFO (see `KVMCalibrationOptions.realtime`).
    public var realtime: Bool

    public func measurement(_ name: String) -> CalibrationMeasurement? { measurements.first { $0.name == name } }
    public func cost(_ parameter: String) -> CalibratedCost? { costs.first { $0.parameter == parameter } }

    public var json: JSONValue {
        func r(_ x: Double) -> JSONValue { .double((x * 10).rounded() / 10) }
        func cost(_ c: CalibratedCost) -> [(String, JSONValue)] {
            [("parameter", .string(c.parameter)), ("median_ns", r(c.medianNanos)), ("p10_ns", r(c.p10Nanos)),
             ("p90_ns", r(c.p90Nanos)), ("samples", .int(Int64(c.samples))), ("method", .string(c.method))]
            + (c.slowStateNanos.map { [("slow_state_ns", r($0)), ("slow_round_fraction", .double(c.slowRoundFraction ?? 0)), ("expected_ns", r(c.expectedNanos))] } ?? [])
        }
        let boundsJSON: [JSONValue] = bounds.map { b in
            let kv: [(String, JSONValue)] = [
                ("parameter", .string(b.parameter)), ("estimate_ns", r(b.estimateNanos)), ("upper_ns", r(b.upperNanos)),
                ("resolution_ns", r(b.resolutionNanos)), ("samples", .int(Int64(b.samples))), ("method", .string(b.method))]
            return .object(kv)
        }
        let measurementsJSON: [JSONValue] = measurements.map { m in
            var kv: [(String, JSONValue)] = [("name", .string(m.name))]
            kv += Array(cost(m.summary).dropFirst())
            kv.append(("path_counter", m.pathCounter.map { .string($0) } ?? .null))
            kv.append(("path_confirmed", .bool(m.pathConfirmed)))
            let counters: [(String, JSONValue)] = m.countersPerEvent.map { ($0.0, .double(($0.1 * 1000).rounded() / 1000)) }
            kv.append(("counters_per_event", .object(counters)))
            kv.append(("round_medians_ns", .array(m.roundMedians.map { r($0) })))
            return .object(kv)
        }
        let omittedJSON: [JSONValue] = omitted.map { .object([("parameter", .string($0.0)), ("reason", .string($0.1))]) }
        var top: [(String, JSONValue)] = [
            ("schema", "memvirt.kvm-calibrate/1"),
            ("platform", .string(platform.rawValue)), ("paging", .string(pagingMode)),
            ("tsc_khz", .double(tscKHz)), ("quick", .bool(quick)), ("realtime_scheduling", .bool(realtime)), ("date", .string(date)), ("seconds", r(seconds)),
        ]
        top.append(("costs", .array(costs.map { .object(cost($0)) })))
        top.append(("bounds", .array(boundsJSON)))
        top.append(("conditions", conditions?.json ?? .null))
        top.append(("measurements", .array(measurementsJSON)))
        top.append(("omitted", .array(omittedJSON)))
        return .object(top)
    }

    public var text: String {
        func us(_ ns: Double) -> String { formatFixed(ns / 1e3, digits: 3) }
        func pad(_ s: String, _ n: Int) -> String { s.count >= n ? s : s + String(repeating: " ", count: n - s.count) }
        func lpad(_ s: String, _ n: Int) -> String { s.count >= n ? s : String(repeating: " ", count: n - s.count) + s }
        var s = "kvm calibrate on \(platform.rawValue) (\(pagingMode) paging), guest TSC \(formatFixed(tscKHz / 1e3, digits: 1)) MHz, \(date), \(formatFixed(seconds, digits: 1)) s\(quick ? " (quick)" : "")\(realtime ? ", SCHED_FIFO" : ", normal scheduling")\n"
        s += "measurements (us per event; counters per event):\n"
        s += "  " + pad("benchmark", 22) + lpad("median", 10) + lpad("p10", 10) + lpad("p90", 10) + lpad("n", 6) + "  path\n"
        for m in measurements {
            let c = m.summary
            let path = m.pathCounter.map { "\($0) \(formatFixed(m.counter($0), digits: 2))\(m.pathConfirmed ? "" : " (NOT CONFIRMED)")" } ?? "-"
            s += "  " + pad(m.name, 22) + lpad(us(c.medianNanos), 10) + lpad(us(c.p10Nanos), 10) + lpad(us(c.p90Nanos), 10) + lpad("\(c.samples)", 6) + "  " + path + "\n"
        }
        s += "model parameters (us):\n"
        for c in costs {
            s += "  " + pad(c.parameter, 42) + lpad(us(c.medianNanos), 10) + lpad(us(c.p10Nanos), 10) + lpad(us(c.p90Nanos), 10) + lpad("\(c.samples)", 6) + "\n"
            s += "      " + c.method + "\n"
        }
        if !bounds.isEmpty { s += "bounded, below the resolution of what they are derived from (us): estimate, at most\n" }
        for b in bounds {
            s += "  " + pad(b.parameter, 42) + lpad(us(b.estimateNanos), 10) + "  <= " + us(b.upperNanos) + lpad("\(b.samples)", 6) + "\n"
            s += "      " + b.method + "\n"
        }
        for (p, why) in omitted { s += "  " + pad(p, 42) + "  not measured: \(why)\n" }
        if let c = conditions { s += "host: " + c.text + "\n" }
        return s
    }
}

/// `memvirt kvm calibrate`: micro-benchmarks on /dev/kvm, each event timed by the guest's own
/// TSC (or, for host-side operations, by the VMM's monotonic clock) and confirmed by the KVM
/// counters it moves; then the model's cost parameters derived from them.
public enum KVMCalibration {
    public static func run(_ options: KVMCalibrationOptions = KVMCalibrationOptions()) throws(KVMError) -> CalibrationReport {
        guard options.samplesPerBenchmark >= 1, options.rounds >= 1, options.rounds <= options.samplesPerBenchmark,
              options.eventSampleFactor >= 1, options.eventSampleFactor <= 16 else {
            throw KVMError.invalid("calibration: samples per benchmark \(options.samplesPerBenchmark) and rounds \(options.rounds) must be >= 1, rounds <= samples; event sample factor \(options.eventSampleFactor) in 1...16")
        }
        return try onDedicatedThread(name: "memvirt-calibrate") { () throws(KVMError) in try Session(options).run() }
    }

    /// The first-touch method shared with `kvm probe`: the guest writes one word in each of
    /// `pages` fresh 4 KiB pages, each write timed by its TSC; per-page nanoseconds.
    static func firstTouchSamples(_ g: GuestVM, firstPage: Int, pages: Int, write: Bool = true) throws(KVMError) -> [Double] {
        let perNano = try g.tscTicksPerNano()
        let ticks = try g.calibrateEvents(op: write ? MEMVIRT_CAL_TOUCH_WRITE : MEMVIRT_CAL_TOUCH_READ, count: pages,
                                          base: g.layout.dataVirtual.rawValue + UInt64(firstPage) * 4096)
        return ticks.map { Double($0) / perNano }
    }
}

/// Where the vCPU thread and the userfaultfd handler thread run while a userfaultfd fault is
/// timed. A fault is a hand-off: the faulting thread sleeps in the kernel, the handler wakes,
/// serves, and wakes it again. Across CPUs each wake-up is an IPI to a CPU that is idle (on
/// this cloud VM: halted, guest_halt_poll_ns 0, so the wake is an exit to the hypervisor
/// below); on one CPU it is a context switch. Left to the scheduler (`free`), the mix of the
/// two varies from run to run; pinned, each is one path.
enum UffdPlacement: String, CaseIterable, Sendable {
    /// Neither thread pinned (the scheduler places them, as the KVM engine's pager is).
    case free
    /// Both on the lowest allowed CPU.
    case same = "same_cpu"
    /// The vCPU thread on the lowest allowed CPU, the handler on the next.
    case cross = "cross_cpu"

    static func available() -> [UffdPlacement] {
        allowedCPUs().count >= 2 ? [.free, .same, .cross] : (allowedCPUs().count == 1 ? [.free, .same] : [.free])
    }

    var what: String {
        let c = allowedCPUs()
        switch self {
        case .free: return "neither thread pinned"
        case .same: return "the vCPU thread and the handler thread both pinned to CPU \(c.first ?? 0)"
        case .cross: return "the vCPU thread pinned to CPU \(c.first ?? 0), the handler thread to CPU \(c.dropFirst().first ?? 1)"
        }
    }

    /// (vCPU thread's mask, handler's mask); nil: unpinned (the caller's own mask).
    func masks(_ allowed: UInt64) -> (UInt64?, UInt64?) {
        let c = (0..<64).filter { allowed & (1 << UInt64($0)) != 0 }
        switch self {
        case .free: return (nil, nil)
        case .same: return c.isEmpty ? (nil, nil) : (1 << UInt64(c[0]), 1 << UInt64(c[0]))
        case .cross: return c.count < 2 ? (nil, nil) : (1 << UInt64(c[0]), 1 << UInt64(c[1]))
        }
    }
}

/// Samples and counter deltas of one benchmark as they accumulate over the rounds.
struct BenchAccumulator {
    let name: String
    let method: String
    let pathCounter: String?
    var samples: [Double] = []
    var events: Double = 0
    var counters: [String: UInt64] = [:]
    /// Where each round's samples start in `samples`.
    var roundStarts: [Int] = []

    mutating func add(_ s: [Double], events e: Int? = nil, counters d: [String: UInt64] = [:]) {
        samples += s
        events += Double(e ?? s.count)
        for (k, v) in d { counters[k, default: 0] &+= v }
    }

    func result() -> CalibrationMeasurement? {
        guard let c = CalibratedCost.summarize(parameter: name, nanos: samples, method: method) else { return nil }
        let per = counters.filter { $0.value != 0 }.map { ($0.key, Double($0.value) / max(1, events)) }.sorted { $0.0 < $1.0 }
        var ok = true
        if let p = pathCounter {
            let v = per.first { $0.0 == p }?.1 ?? 0
            ok = v >= 0.9 && v <= 1.5
        }
        var medians: [Double] = []
        for (i, start) in roundStarts.enumerated() {
            let end = i + 1 < roundStarts.count ? roundStarts[i + 1] : samples.count
            if end > start { medians.append(medianOf(Array(samples[start..<end]))) }
        }
        return CalibrationMeasurement(name: name, summary: c, countersPerEvent: per, pathCounter: pathCounter, pathConfirmed: ok,
                                      roundMedians: medians)
    }
}

/// KVM counters read around timed events: the VM's and vCPU 0's binary stats.
struct StatProbe {
    let vm: StatsReader
    let vcpu: StatsReader
    /// The stats a calibration reports (the rest are histograms or unrelated).
    static let names: Set<String> = [
        "exits", "io_exits", "mmio_exits", "irq_exits", "halt_exits", "pf_taken", "pf_fixed", "pf_guest", "pf_emulate",
        "pf_spurious", "pf_fast", "pf_mmio_spte_created", "insn_emulation", "insn_emulation_fail", "invlpg", "tlb_flush",
        "hypercalls", "mmu_pte_write", "mmu_pde_zapped", "mmu_flooded", "mmu_recycled", "mmu_cache_miss", "mmu_unsync",
        "mmu_shadow_zapped", "remote_tlb_flush", "pages_4k", "request_irq_exits", "signal_exits",
    ]

    init(_ g: GuestVM) throws(KVMError) {
        vm = try g.vm.stats()
        vcpu = try g.vcpus[0].stats()
    }

    func read() throws(KVMError) -> (StatValues, StatValues) { (try vm.read(), try vcpu.read()) }

    /// Cumulative deltas since `before` (instant stats such as pages_4k: the signed change, as
    /// a wrapped UInt64 only when it grew; a drop is reported as 0).
    func delta(since before: (StatValues, StatValues)) throws(KVMError) -> [String: UInt64] {
        let (a, b) = try read()
        var out: [String: UInt64] = [:]
        for (now, then, descs) in [(a, before.0, vm.descriptors), (b, before.1, vcpu.descriptors)] {
            for d in descs where Self.names.contains(d.name) {
                let x = now[d.name], y = then[d.name]
                out[d.name, default: 0] &+= x >= y ? x - y : 0
            }
        }
        return out
    }
}

/// One calibration session: the VMs, the benchmarks round-robin, the derivations.
final class Session {
    /// Empty dirty-ring harvests timed together per sample.
    let ringEmptyBatch = 64
    let o: KVMCalibrationOptions
    let kvm: KVM
    var acc: [String: BenchAccumulator] = [:]
    var order: [String] = []

    init(_ o: KVMCalibrationOptions) throws(KVMError) {
        self.o = o
        kvm = try KVM()
    }

    func bench(_ name: String, path: String?, _ method: String) {
        acc[name] = BenchAccumulator(name: name, method: method, pathCounter: path)
        order.append(name)
    }

    /// Runs `body` (which returns samples and the events they cover) with counters read around it.
    func timed(_ name: String, _ stats: StatProbe, _ body: () throws(KVMError) -> ([Double], Int?)) throws(KVMError) {
        let before = try stats.read()
        let (s, e) = try body()
        let d = try stats.delta(since: before)
        acc[name]!.add(s, events: e, counters: d)
    }

    func run() throws(KVMError) -> CalibrationReport {
        let realtime = o.realtime && enterRealtimeScheduling()
        let t0 = monotonicNanoseconds()
        let steal0 = HostStealTime.read()
        var load = [Double](repeating: 0, count: 3)
        let loadAverage = getloadavg(&load, 3) >= 1 ? load[0] : -1
        let n = o.samplesPerBenchmark
        let rounds = o.rounds
        let chunk = (n + rounds - 1) / rounds
        let warm = 8
        let nested = kvm.platform.nestedPaging
        let pvm = kvm.platform == .pvm

        // VM A: touches, exits, guest #PF, page-table writes, CPL0 loops, MADV_DONTNEED.
        // Data: pages [0, touchPages) first-touched by writes, then the same count touched by
        // reads, then a 2 MiB region whose PDE the page-table benchmark writes (page 0 of it
        // re-linked after each write, page 1 not present for the guest #PF).
        let f = o.eventSampleFactor
        let touchPages = chunk * rounds * f + warm
        let touchBytes = (UInt64(2 * touchPages) * 4096 + (2 << 20) - 1) / (2 << 20) * (2 << 20)
        // After the special 2 MiB: the pairs' region, `pairWP` pages written once and then
        // write-protected by a dirty-log harvest before each batch (the reference exit, in this
        // VM), then `touchPages` fresh pages for the paired first touches.
        let pairWP = chunk * f
        let pairBytes = (UInt64(pairWP + touchPages) * 4096 + (2 << 20) - 1) / (2 << 20) * (2 << 20)
        var ca = GuestConfig(dataSize: touchBytes + (2 << 20) + pairBytes)
        ca.dataSlotFlags = .logDirtyPages
        ca.listCapacity = max(chunk * f, 64) * 4
        let a = try GuestVM(kvm: kvm, config: ca)
        let base = a.layout.dataVirtual.rawValue
        let readBase = base + UInt64(touchPages) * 4096
        let special = base + touchBytes
        let pfPage = special + 4096
        let wpBase = special + (2 << 20)
        let pairTouchBase = wpBase + UInt64(pairWP) * 4096
        let bitmapA = try DirtyBitmapLog(vm: a.vm, slot: GuestLayout.dataSlot)
        let pdeAddress = try a.pageTableEntryAddress(GuestVirtualAddress(rawValue: special), level: 2)
        let pdeValue = try a.runtime.load(UInt64.self, at: GuestPhysicalAddress(rawValue: pdeAddress))
        try a.installCalibrationPageFaultHandler()
        let secondRoot = try Session.installStubGates(a)
        try a.markNotPresent(GuestVirtualAddress(rawValue: pfPage))
        let sa = try StatProbe(a)
        let perNano = try a.tscTicksPerNano()
        // A host region for the host's own first touch (demand-zero), the part of a guest
        // first touch that is the host kernel's, not KVM's.
        let hostPages = touchPages
        let host = try Mapping(size: hostPages * 4096, flags: MAP_PRIVATE | MAP_ANONYMOUS, what: "calibration host pages")
        _ = madvise(host.base, hostPages * 4096, MADV_NOHUGEPAGE)

        // VM B: userfaultfd-served first touches (zero page for reads, copy for writes), in
        // three thread placements (see `UffdPlacement`): pages [0, 3 touchPages) read,
        // [3 touchPages, 6 touchPages) written.
        let uffdPlacements = UffdPlacement.available()
        let uffdSpan = uffdPlacements.count * (touchPages + 2 * (rounds + 1))
        var cb = GuestConfig(dataSize: (UInt64(2 * uffdSpan) * 4096 + (2 << 20) - 1) / (2 << 20) * (2 << 20))
        cb.listCapacity = max(chunk * f, 64) * 4
        let b = try GuestVM(kvm: kvm, config: cb)
        let server = try UffdServer(region: b.data, zeroPages: 0..<uffdSpan, realtime: realtime)
        try server.start()
        defer { server.stop() }
        let sb = try StatProbe(b)

        // VM C: dirty bitmap on a 1 GiB slot (guest 2 MiB pages: KVM still logs 4K).
        // The bitmap's per-page cost is a few tens of ns: 1,024 dirty pages per harvest keep it
        // well above the harvest's own jitter.
        let dirtyPages = o.quick ? 64 : 1024
        let bitmapPages = o.quick ? 64 : 1024
        var cc = GuestConfig(dataSize: 1 << 30)
        cc.dataPageSize = .size2M
        cc.dataSlotFlags = .logDirtyPages
        cc.listCapacity = bitmapPages
        let c = try GuestVM(kvm: kvm, config: cc)
        let sc = try StatProbe(c)
        let bitmap = try DirtyBitmapLog(vm: c.vm, slot: GuestLayout.dataSlot)
        // VM D: dirty ring (64 KiB per vCPU: 4,096 entries, batches of at most 1,024).
        var cd = GuestConfig(dataSize: 64 << 20)
        cd.dataSlotFlags = .logDirtyPages
        cd.dirtyRingBytes = 64 << 10
        cd.listCapacity = dirtyPages
        let d = try GuestVM(kvm: kvm, config: cd)
        let ring = DirtyRingCollector(vm: d)
        let sd = try StatProbe(d)
        // VM E: the userfaultfd pager in its steady state (PagerCalibration.swift).
        let pagerPhase = try PagerCalibrationPhase(kvm: kvm, batchCapacity: chunk * f)
        defer { pagerPhase.stop() }

        let firstTouchName = nested ? "EPT violation" : "shadow page fault"
        bench("first_touch", path: "pf_fixed", "guest write to a fresh 4 KiB page (\(firstTouchName) fixed by KVM, host page allocated), timed by the guest TSC")
        bench("first_touch_read", path: "pf_fixed", "guest read of a fresh 4 KiB page (KVM fault, the host maps its zero page)")
        bench(KVMCalibration.zeroPageCOWBenchmark, path: "pf_fixed", KVMCalibration.zeroPageCOWMethod)
        bench("host_first_touch", path: nil, "the VMM's own first write to a fresh private anonymous page (host demand-zero fault), monotonic clock")
        bench("store_write", path: nil, "pwrite(2) of one 4 KiB page to the pager's store (an unlinked O_TMPFILE in /tmp, 256 page slots written before the rounds, one at random: a rewrite of a cached page), monotonic clock")
        bench("store_read", path: nil, "pread(2) of one 4 KiB page from the pager's store (page cache), monotonic clock")
        let pagerSetup = "the userfaultfd pager's thread in its steady state (\(pagerPhase.residentPages) pages resident of \(pagerPhase.regionPages), FIFO, guest writing the region in order: every write faults, evicting the oldest page and reading one back), CLOCK_MONOTONIC around each call"
        bench("pager_store_write", path: nil, "pwrite(2) of an evicted page to the store, " + pagerSetup)
        bench("pager_dontneed", path: nil, "madvise(MADV_DONTNEED) of an evicted page (host unmap plus KVM's mmu-notifier zap, the vCPU waiting in handle_userfault), " + pagerSetup)
        bench("pager_store_read", path: nil, "pread(2) of a page back from the store, " + pagerSetup)
        bench("pager_fault", path: "pf_fixed", "guest write to a page the pager evicted: the whole fault as the guest's TSC sees it (exit, userfaultfd hand-off, the pager's eviction, pread and UFFDIO_COPY, the stale fault's retry); reported beside the parts the model charges")
        bench("dontneed", path: nil, "madvise(MADV_DONTNEED) of one guest page the guest has mapped (host unmap plus KVM's mmu-notifier zap), monotonic clock")
        let guestRunningMissing = Self.guestRunningDontneedMissing()
        if guestRunningMissing == nil {
            bench("dontneed_guest_running", path: "remote_tlb_flush", "madvise(MADV_DONTNEED) of one guest page the guest has mapped while its vCPU runs guest code (a counting loop) on another CPU: the zap's kvm_flush_remote_tlbs kicks it out of guest mode and waits; a VM per round, monotonic clock")
        }
        bench("refault_after_zap", path: "pf_fixed", "guest write to a page the host zapped with MADV_DONTNEED (KVM fault, new host page)")
        bench("timer_overshoot", path: nil, "ppoll(2) with a \(Self.apfStoreDelayNanos / 1000) us timeout and no fd, on the calibrating thread: elapsed minus the timeout (timer slack and the wake-up; the pager sleeps so until a page is due), monotonic clock")
        bench("host_loop", path: nil, "the VMM thread's own native loop, \(Self.hostLoopIterations) dependent square-and-adds (x = x * x + i), the whole loop, monotonic clock (no KVM: a reference for the host CPU's own speed beside the CPL0 one)")
        bench("exit_pio", path: "vmm_io_exits", "guest `out` to a port the VMM answers (exit to user space and back)")
        bench("exit_mmio", path: "vmm_mmio_exits", "guest write to guest-physical memory no slot backs (MMIO exit to user space and back)")
        bench("pair_touch_minus_wp", path: nil, "per pair, in one guest loop iteration: a first write to a fresh 4 KiB page minus a write to a page a dirty-log harvest write-protected (same VM, guest TSC)")
        bench("pair_pf_minus_wp", path: "pf_guest", "per pair, in one guest loop iteration: a guest #PF delivered to the 3-instruction handler and back (as guest_pf) minus a write to a harvested, write-protected page (same VM, guest TSC)")
        registerStubBenchmarks()
        bench("exit_cpuid", path: "exits", "guest CPUID (an exit KVM handles in the kernel)")
        bench("cpl0_instruction", path: "insn_emulation", "(one KVM_RUN of 2(1+k) CPL0 instructions - one of 2) / 2k, k = 50")
        bench("invlpg", path: "invlpg", "(KVM_RUN of k x {INVLPG; dec; jnz} - of k x {dec; jnz}) / k at CPL0, k = 50")
        if !a.vm.hasIRQChip {
            bench("exit_hlt", path: "halt_exits", "one KVM_RUN entered at a CPL0 HLT, VMM's monotonic clock: entry, the emulated HLT and its exit to the VMM (KVM_EXIT_HLT: no in-kernel irqchip, so KVM does not wait in the kernel)")
        }
        bench("cr3_write", path: nil, "(KVM_RUN of k x {mov to CR3 (same root); dec; jnz} - of k x {dec; jnz}) / k at CPL0, k = 50")
        bench("guest_pf", path: "pf_guest", "guest read of a page its own tables mark not present: #PF delivered to a 3-instruction CPL0 handler and IRET back")
        bench("pt_write", path: "mmu_pte_write", "guest write (same value) to a PDE of its own page directory while KVM shadows it (emulated write)")
        bench("uffd_zero_read", path: "pf_fixed", "guest read of a page a userfaultfd handler serves with UFFDIO_ZEROPAGE")
        bench("uffd_copy_write", path: "pf_fixed", "guest write to a page a userfaultfd handler serves with UFFDIO_COPY")
        bench("uffd_service", path: nil, "the userfaultfd handler's own time per fault (message read to UFFDIO_COPY/ZEROPAGE done)")
        for pl in uffdPlacements where pl != .free {
            bench("uffd_zero_read_" + pl.rawValue, path: "pf_fixed", "as uffd_zero_read, \(pl.what)")
            bench("uffd_copy_write_" + pl.rawValue, path: "pf_fixed", "as uffd_copy_write, \(pl.what)")
        }
        bench("wp_fault_after_harvest", path: "pf_fixed", "guest write to a page whose dirty bit was harvested (KVM_GET_DIRTY_LOG re-protected it)")
        bench("bitmap_empty_1gib", path: nil, "KVM_GET_DIRTY_LOG on a 1 GiB slot with no page dirty")
        bench("bitmap_per_dirty_page", path: nil, "(KVM_GET_DIRTY_LOG with \(bitmapPages) dirty pages - with none) / \(bitmapPages), 1 GiB slot")
        bench("ring_per_entry", path: nil, "(harvest + KVM_RESET_DIRTY_RINGS of \(dirtyPages) entries - one empty harvest + reset) / \(dirtyPages)")
        bench("bitmap_slope_per_page", path: nil, "(KVM_GET_DIRTY_LOG with \(bitmapPages) dirty pages - with \(bitmapPages / 2), right after) / \(bitmapPages - bitmapPages / 2), 1 GiB slot: the per-page cost without what a harvest costs once when any page is dirty")
        bench("bitmap_dirty_fixed", path: nil, "KVM_GET_DIRTY_LOG with \(bitmapPages / 2) dirty pages - with none - \(bitmapPages / 2) x bitmap_slope_per_page: what a harvest costs once when any page is dirty (the write-protect's TLB flush), 1 GiB slot")
        bench("ring_slope_per_entry", path: nil, "(harvest + KVM_RESET_DIRTY_RINGS of \(dirtyPages) entries - of \(dirtyPages / 2)) / \(dirtyPages - dirtyPages / 2)")
        bench("ring_dirty_fixed", path: nil, "harvest + reset of \(dirtyPages / 2) entries - an empty one - \(dirtyPages / 2) x ring_slope_per_entry: what a non-empty ring harvest costs once")
        bench("ring_empty", path: nil, "harvest + KVM_RESET_DIRTY_RINGS with no entry: a batch of \(ringEmptyBatch) calls timed together, / \(ringEmptyBatch)")
        let ksmMissing = KSM.unavailableReason()
        if ksmMissing == nil {
            bench("ksm_cow_break", path: "pf_fixed", "guest write to a mapped page KSM merged (KVM fault, host copy-on-write break); pages merged once before the rounds, broken a share per round")
            bench("pair_ksm_minus_touch", path: nil, "per pair, in one guest loop iteration: a KSM copy-on-write break (as ksm_cow_break) minus a first write to a fresh page of the same VM (guest TSC)")
        }
        // Async PF: a phase of its own after the rounds (a guest kernel with a counting and a
        // faulting thread; see APFCalibration.swift).
        let apfMissing: String? = kvm.check(.asyncPF) > 0 && kvm.check(.asyncPFInt) > 0 ? nil : "KVM_CAP_ASYNC_PF / KVM_CAP_ASYNC_PF_INT not supported"
        if apfMissing == nil {
            bench("apf_not_present", path: "apf_not_present", "\"page not present\" (a guest read of a page the userfaultfd pager holds back \(Self.apfStoreDelayNanos / 1000) us, made async by KVM): the VMM's monotonic clock from KVM_RUN returning with the #PF stub's exit to KVM_RUN entered with the counting thread (the VMM-side scheduler parked the faulting thread and loaded the next)")
            bench("apf_page_ready", path: "apf_ready", "\"page ready\": the pager's UFFDIO_COPY returned to KVM_RUN entered with the woken faulting thread (KVM's async worker, the page-ready interrupt, its stub's exit, the VMM's handler), monotonic clock on both sides")
            bench("apf_ready_to_exit", path: "apf_ready", "the first part of apf_page_ready: UFFDIO_COPY returned to KVM_RUN returning with the page-ready interrupt's stub exit")
            bench("apf_ready_handling", path: "apf_ready", "the second part of apf_page_ready: the VMM's handler (token, EOI, MSR_KVM_ASYNC_PF_ACK, wake, load the woken thread) to KVM_RUN entered")
            bench("apf_fault_total", path: "apf_not_present", "the faulting read as the guest thread saw it (guest TSC around the read): not present, parked while the counting thread runs, the store's \(Self.apfStoreDelayNanos / 1000) us, page ready, the read again")
            bench("apf_kvm_legs", path: nil, "per fault, apf_fault_total minus the VMM's time from the not-present exit to the woken thread's entry: the legs inside KVM_RUN (the read to the #PF stub's exit; the entry to the read done)")
            bench("apf_pager_late", path: nil, "the phase's pager: how late it served each fault after the store's \(Self.apfStoreDelayNanos / 1000) us (its ppoll's timeout wake-up on its CPU while the vCPU runs the counting thread), monotonic clock")
            bench("apf_tick_delivery", path: nil, "the phase's guest timer (\(GuestKernelOptions().timeSliceNanos / 1_000_000) ms periodic LAPIC timer): from a tick's due time (its arming + k periods) to KVM_RUN returning with its stub's exit, for ticks that interrupted the counting thread in guest mode, monotonic clock")
        }
        // The hypercall exit: probed in a VM of its own first (a guest that takes #UD for it
        // would end the VM).
        let insn = kvm.platform == .svm ? "VMMCALL" : "VMCALL"
        let hypercall = try probeHypercall()
        var hypercallProblem: String? = nil
        switch hypercall {
        case .kvm:
            bench("exit_hypercall", path: "hypercalls", "guest \(insn) at CPL3 with an unknown hypercall number (an in-kernel exit; KVM refuses a CPL3 hypercall)")
        case .below(let rax):
            // KVM never saw it: the instruction trapped to the hypervisor this host runs on,
            // which answered it. Reported (what an exit costs one level down), no parameter.
            bench("vmcall_below_kvm", path: nil, "guest \(insn) at CPL3: KVM counted no hypercall and no exit for it; it returned %rax = 0x\(String(rax, radix: 16)) (the hypervisor below this host answered it)")
            hypercallProblem = "a \(insn) at CPL3 never reaches KVM here (no hypercall, no exit counted; %rax = 0x\(String(rax, radix: 16)) came back): the hypervisor this host runs on answers it, reported as vmcall_below_kvm"
        case .fails(let why):
            hypercallProblem = why
        }

        // The userfaultfd pager's store (Pager.swift): an unlinked O_TMPFILE in the pager's
        // directory, written and read a 4 KiB page per call as the pager evicts and refaults.
        // Its 256 page slots (1 MiB) are written once before the rounds, so every timed write
        // rewrites a cached page and every read reads one, as the pager's are once each page
        // was evicted once.
        let store = try FileDescriptor.open(PagerOptions().storeDirectory, 0o20_200_000 | O_RDWR, mode: 0o600)
        let storeBuffer = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { storeBuffer.deallocate() }
        memset(storeBuffer, 0x5a, 4096)
        let storeSlots = 256
        for slot in 0..<storeSlots where pwrite(store.raw, storeBuffer, 4096, off_t(slot * 4096)) != 4096 {
            throw KVMError.call("pwrite(calibration page store, slot \(slot))", lastErrno())
        }
        var storeRandom = SplitMix64(seed: 0x5707e)
        // Warm-up: code, stack, mailbox and output pages mapped; shadow tables built.
        var next = 0  // next fresh page of the touch regions
        func touchRound(_ k: Int, record: Bool) throws(KVMError) {
            let first = next
            next += k
            let fa = try sa.read()
            let ft = try KVMCalibration.firstTouchSamples(a, firstPage: first, pages: k)
            let fd = try sa.delta(since: fa)
            let ra = try sa.read()
            let rt = try KVMCalibration.firstTouchSamples(a, firstPage: touchPages + first, pages: k, write: false)
            let rd = try sa.delta(since: ra)
            // The same pages written: the host's zero page copied (MemoryCalibration.swift).
            let ca = try sa.read()
            let ct = try KVMCalibration.zeroPageCOWSamples(a, firstPage: touchPages + first, pages: k)
            let cd = try sa.delta(since: ca)
            // The host's own demand-zero fault, page by page.
            var hs: [Double] = []
            for i in first..<(first + k) {
                let p = (host.base + i * 4096).assumingMemoryBound(to: UInt64.self)
                let h0 = monotonicNanoseconds()
                p.pointee = UInt64(i)
                hs.append(Double(monotonicNanoseconds() - h0))
            }
            // MADV_DONTNEED per page, then the guest's re-touch.
            let da = try sa.read()
            var ds: [Double] = []
            for i in first..<(first + k) {
                let p = a.data.mapping.base + i * 4096
                let h0 = monotonicNanoseconds()
                if madvise(p, 4096, MADV_DONTNEED) != 0 { throw KVMError.call("madvise(MADV_DONTNEED, guest page \(i))", lastErrno()) }
                ds.append(Double(monotonicNanoseconds() - h0))
            }
            let dd = try sa.delta(since: da)
            // The pager's store: a page written (an eviction), then a page read back (a refault).
            var sw: [Double] = [], sr: [Double] = []
            for _ in 0..<k {
                let off = off_t(Int(storeRandom.next() % UInt64(storeSlots)) * 4096)
                let w0 = monotonicNanoseconds()
                if pwrite(store.raw, storeBuffer, 4096, off) != 4096 { throw KVMError.call("pwrite(calibration page store)", lastErrno()) }
                sw.append(Double(monotonicNanoseconds() - w0))
            }
            for _ in 0..<k {
                let off = off_t(Int(storeRandom.next() % UInt64(storeSlots)) * 4096)
                let r0 = monotonicNanoseconds()
                let n = pread(store.raw, storeBuffer, 4096, off)
                sr.append(Double(monotonicNanoseconds() - r0))
                if n < 0 { throw KVMError.call("pread(calibration page store)", lastErrno()) }
            }
            let za = try sa.read()
            let zt = try KVMCalibration.firstTouchSamples(a, firstPage: first, pages: k)
            let zd = try sa.delta(since: za)
            guard record else { return }
            acc["first_touch"]!.add(ft, counters: fd)
            acc["first_touch_read"]!.add(rt, counters: rd)
            acc[KVMCalibration.zeroPageCOWBenchmark]!.add(ct, counters: cd)
            acc["host_first_touch"]!.add(hs)
            acc["dontneed"]!.add(ds, counters: dd)
            acc["store_write"]!.add(sw)
            acc["store_read"]!.add(sr)
            acc["refault_after_zap"]!.add(zt, counters: zd)
        }

        func events(_ g: GuestVM, _ st: StatProbe, _ name: String, _ op: memvirt_calibrate_op, _ k: Int, base: UInt64,
                    stride: UInt64 = 4096, salt: UInt64 = 0, other: UInt64 = 0, record: Bool) throws(KVMError) {
            let before = try st.read()
            var seen: [String: UInt64] = [:]
            let ticks = try g.calibrateEvents(op: op, count: k, base: base, stride: stride, salt: salt, other: other, exits: &seen)
            var dlt = try st.delta(since: before)
            dlt.merge(seen) { $0 + $1 }
            if record { acc[name]!.add(ticks.map { Double($0) / perNano }, counters: dlt) }
        }

        func cpl0Round(_ k: Int, record: Bool) throws(KVMError) {
            let loops: UInt64 = 50
            var ins: [Double] = [], inv: [Double] = [], cr3: [Double] = [], hlt: [Double] = []
            var di: [String: UInt64] = [:], dv: [String: UInt64] = [:], dc: [String: UInt64] = [:], dh: [String: UInt64] = [:]
            func add(_ into: inout [String: UInt64], _ x: [String: UInt64]) { for (kk, v) in x { into[kk, default: 0] &+= v } }
            for _ in 0..<k {
                let one = try a.timeCPL0(offset: a.cpl0LoopOffset, rcx: 1)
                var s0 = try sa.read()
                let many = try a.timeCPL0(offset: a.cpl0LoopOffset, rcx: 1 + loops)
                add(&di, try sa.delta(since: s0))
                ins.append((Double(many) - Double(one)) / Double(2 * loops))
                let plain = try a.timeCPL0(offset: a.cpl0LoopOffset, rcx: loops)
                s0 = try sa.read()
                let iv = try a.timeCPL0(offset: a.calibInvlpgOffset, rcx: loops, rdi: base)
                add(&dv, try sa.delta(since: s0))
                inv.append((Double(iv) - Double(plain)) / Double(loops))
                s0 = try sa.read()
                let cw = try a.timeCPL0(offset: a.calibCR3Offset, rcx: loops, rdx: a.layout.pageTables)
                add(&dc, try sa.delta(since: s0))
                cr3.append((Double(cw) - Double(plain)) / Double(loops))
                if acc["exit_hlt"] != nil {
                    s0 = try sa.read()
                    let h = try a.timeCPL0(offset: a.calibHltOffset, rcx: 1, endsInHalt: true)
                    add(&dh, try sa.delta(since: s0))
                    hlt.append(Double(h))
                }
            }
            guard record else { return }
            acc["cpl0_instruction"]!.add(ins, events: k * Int(2 * loops), counters: di)
            acc["invlpg"]!.add(inv, events: k * Int(loops), counters: dv)
            acc["cr3_write"]!.add(cr3, events: k * Int(loops), counters: dc)
            if acc["exit_hlt"] != nil { acc["exit_hlt"]!.add(hlt, events: k, counters: dh) }
        }

        var nextB = 0
        let callerMask = currentAffinityMask()
        /// One batch of userfaultfd-served reads and writes per placement: the vCPU thread (this
        /// one) and the handler thread pinned as `UffdPlacement` says, two unrecorded faults
        /// after each change (the threads settle on their CPUs), then the batch.
        func uffdRound(_ k: Int, record: Bool) throws(KVMError) {
            let bb = b.layout.dataVirtual.rawValue
            for pl in uffdPlacements {
                let (mine, handler) = pl.masks(callerMask ?? ~0)
                if let m = mine { setAffinityMask(m) } else if let m = callerMask { setAffinityMask(m) }
                server.pin(handler, allowed: callerMask ?? ~0)
                let settle = 2
                let first = nextB
                nextB += k + settle
                _ = try b.calibrateEvents(op: MEMVIRT_CAL_TOUCH_READ, count: settle, base: bb + UInt64(first) * 4096)
                server.resetSamples()
                let za = try sb.read()
                let zt = try b.calibrateEvents(op: MEMVIRT_CAL_TOUCH_READ, count: k, base: bb + UInt64(first + settle) * 4096)
                let zd = try sb.delta(since: za)
                let ca = try sb.read()
                let ct = try b.calibrateEvents(op: MEMVIRT_CAL_TOUCH_WRITE, count: k, base: bb + UInt64(uffdSpan + first + settle) * 4096)
                let cdl = try sb.delta(since: ca)
                if let e = server.error { throw e }
                let service = server.takeSamples()
                guard record else { continue }
                let suffix = pl == .free ? "" : "_" + pl.rawValue
                acc["uffd_zero_read" + suffix]!.add(zt.map { Double($0) / perNano }, counters: zd)
                acc["uffd_copy_write" + suffix]!.add(ct.map { Double($0) / perNano }, counters: cdl)
                if pl == .free { acc["uffd_service"]!.add(service) }
            }
            if let m = callerMask { setAffinityMask(m) }
            server.pin(nil, allowed: callerMask ?? ~0)
        }

        var dirtyPrimed = false
        func dirtyRound(_ k: Int, record: Bool) throws(KVMError) {
            let cBase = c.layout.dataVirtual.rawValue, dBase = d.layout.dataVirtual.rawValue
            if !dirtyPrimed {
                // First writes (first touches), then harvests: from here on each write is a
                // write-protect fault of a mapped page.
                _ = try c.calibrateEvents(op: MEMVIRT_CAL_TOUCH_WRITE, count: bitmapPages, base: cBase)
                _ = try bitmap.harvest()
                _ = try d.calibrateEvents(op: MEMVIRT_CAL_TOUCH_WRITE, count: dirtyPages, base: dBase)
                _ = try ring.finish()
                dirtyPrimed = true
            }
            for _ in 0..<k {
                let wa = try sc.read()
                let wt = try c.calibrateEvents(op: MEMVIRT_CAL_TOUCH_WRITE, count: bitmapPages, base: cBase)
                let wd = try sc.delta(since: wa)
                let full = try bitmap.harvest()
                let empty = try bitmap.harvest()
                guard full.pages.count == bitmapPages, empty.pages.isEmpty else {
                    throw KVMError.invalid("dirty bitmap: \(full.pages.count) pages dirty after \(bitmapPages) guest writes, then \(empty.pages.count)")
                }
                // Half the pages: the slope between two non-empty harvests leaves out what a
                // harvest costs once when anything is dirty (see bitmap_slope_per_page).
                _ = try c.calibrateEvents(op: MEMVIRT_CAL_TOUCH_WRITE, count: bitmapPages / 2, base: cBase)
                let half = try bitmap.harvest()
                guard half.pages.count == bitmapPages / 2 else {
                    throw KVMError.invalid("dirty bitmap: \(half.pages.count) pages dirty after \(bitmapPages / 2) guest writes")
                }
                _ = try d.calibrateEvents(op: MEMVIRT_CAL_TOUCH_WRITE, count: dirtyPages, base: dBase)
                let rf = try ring.finish()
                _ = try d.calibrateEvents(op: MEMVIRT_CAL_TOUCH_WRITE, count: dirtyPages / 2, base: dBase)
                let rh = try ring.finish()
                // Empty harvests: one call is ~0.3 us, near the clock's own cost, so a batch
                // is timed together.
                let e0 = monotonicNanoseconds()
                for _ in 0..<ringEmptyBatch { try ring.harvest(d.vcpus[0]) }
                let emptyPerCall = Double(monotonicNanoseconds() - e0) / Double(ringEmptyBatch)
                let re = try ring.finish()
                guard rf.pages.count == dirtyPages, rh.pages.count == dirtyPages / 2, re.entries == 0 else {
                    throw KVMError.invalid("dirty ring: \(rf.pages.count) pages harvested after \(dirtyPages) guest writes, then \(re.entries)")
                }
                guard record else { continue }
                let slotGiB = Double(c.layout.dataSize) / Double(1 << 30)
                acc["wp_fault_after_harvest"]!.add(wt.map { Double($0) / perNano }, counters: wd)
                acc["bitmap_empty_1gib"]!.add([Double(empty.harvestNanos) / slotGiB])
                acc["bitmap_per_dirty_page"]!.add([(Double(full.harvestNanos) - Double(empty.harvestNanos)) / Double(bitmapPages)])
                let rn = Double(rf.harvestNanos + rf.resetNanos)
                acc["ring_per_entry"]!.add([(rn - emptyPerCall) / Double(dirtyPages)])
                acc["ring_empty"]!.add([emptyPerCall])
                let rhn = Double(rh.harvestNanos + rh.resetNanos)
                let fullN = Double(full.harvestNanos), halfN = Double(half.harvestNanos), emptyN = Double(empty.harvestNanos)
                let bSlope = (fullN - halfN) / Double(bitmapPages - bitmapPages / 2)
                acc["bitmap_slope_per_page"]!.add([bSlope])
                acc["bitmap_dirty_fixed"]!.add([halfN - emptyN - bSlope * Double(bitmapPages / 2)])
                let rSlope = (rn - rhn) / Double(dirtyPages - dirtyPages / 2)
                acc["ring_slope_per_entry"]!.add([rSlope])
                acc["ring_dirty_fixed"]!.add([rhn - emptyPerCall - rSlope * Double(dirtyPages / 2)])
            }
        }

        var nextPair = 0
        var pairPrimed = false
        /// Same-iteration pairs: the write-protect fault (the reference exit) right before a
        /// first touch or a guest #PF, so both see the host at the same moment; the per-pair
        /// differences are the samples.
        func pairRound(_ k: Int, record: Bool) throws(KVMError) {
            if !pairPrimed {
                _ = try a.calibrateEvents(op: MEMVIRT_CAL_TOUCH_WRITE, count: pairWP, base: wpBase)
                pairPrimed = true
            }
            func batch(_ name: String, _ op: memvirt_calibrate_op, other: UInt64) throws(KVMError) {
                _ = try bitmapA.harvest()  // write-protects the wp pages the last batch dirtied
                let before = try sa.read()
                let t = try a.calibrateEvents(op: op, count: k, base: wpBase, other: other)
                let dl = try sa.delta(since: before)
                guard record else { return }
                var diffs: [Double] = []
                for i in 0..<k { diffs.append((Double(t[2 * i + 1]) - Double(t[2 * i])) / perNano) }
                acc[name]!.add(diffs, counters: dl)
            }
            try batch("pair_touch_minus_wp", MEMVIRT_CAL_PAIR_TOUCH, other: pairTouchBase + UInt64(nextPair) * 4096)
            nextPair += k
            try batch("pair_pf_minus_wp", MEMVIRT_CAL_PAIR_PF, other: pfPage)
        }

        func guestRound(_ k: Int, record: Bool) throws(KVMError) {
            try events(a, sa, "exit_pio", MEMVIRT_CAL_PIO, k, base: 0, record: record)
            try events(a, sa, "exit_mmio", MEMVIRT_CAL_MMIO, k, base: GuestLayout.holeVirtual.rawValue, record: record)
            try events(a, sa, "exit_cpuid", MEMVIRT_CAL_CPUID, k, base: 0, record: record)
            try events(a, sa, "guest_pf", MEMVIRT_CAL_GUEST_PF, k, base: pfPage, record: record)
            try events(a, sa, "pt_write", MEMVIRT_CAL_PT_WRITE, k, base: pdeAddress, salt: pdeValue, other: special, record: record)
            if acc["exit_hypercall"] != nil || acc["vmcall_below_kvm"] != nil {
                try events(a, sa, acc["exit_hypercall"] != nil ? "exit_hypercall" : "vmcall_below_kvm", MEMVIRT_CAL_VMCALL, k,
                           base: Self.unknownHypercall, salt: kvm.platform == .svm ? 1 : 0, record: record)
            }
        }

        // Warm-up, then the rounds: every benchmark takes its share in each round.
        try touchRound(warm, record: false)
        try guestRound(warm, record: false)
        try pairRound(warm, record: false)
        try stubPairRound(a, sa, bitmap: bitmapA, wpBase: wpBase, invlpgTarget: pfPage, secondRoot: secondRoot, perNano: perNano, k: warm, record: false)
        try cpl0Round(2, record: false)
        try uffdRound(warm, record: false)
        try dirtyRound(1, record: false)
        try pagerPhase.warm()
        // KSM: ksmd merges every page once, before the rounds (it takes its scans of every
        // mergeable page on the host; ksmd is stopped again after, merged pages stay merged);
        // each round then breaks its share, so the copy-on-write breaks see the same host as
        // the first touches they are compared with. Not merged in time: left out.
        var ksmProblem = ksmMissing
        var ksm: KSMPool? = nil
        if ksmMissing == nil {
            do {
                let pool = try ksmPrepare(n * f + warm, timeoutSeconds: o.quick ? 20 : 60)
                _ = try pool.breakNext(warm)
                ksm = pool
            } catch {
                ksmProblem = "\(error)"
            }
        }
        // Async PF: a VM of its own (a guest kernel with two threads) per round, taking the
        // round's share of faults, so these hand-offs see the same stretches of the host as
        // the rest (one phase after the rounds caught one host speed: -31% between runs).
        var apfFaults = 0
        var report0Notes: [(String, String)] = []
        var apfRoundProblem: String? = nil
        var apfStalls: [String] = []
        var apfStopped = false
        /// A round's async-PF VM sometimes stalls (its faulting thread finishes no more reads
        /// after the first one to three: 1-3 of 16 round VMs under load 3-7); that round is
        /// taken again in a new VM and the stall recorded. After `apfMaxStalls` stalls the phase
        /// ends for the remaining rounds (its parameters keep the rounds already taken).
        func apfRound(_ k: Int) throws(KVMError) {
            while !apfStopped {
                let p: APFPhaseResult
                do { p = try apfPhase(samples: k, warm: Self.apfWarmPerRound) } catch {
                    apfStalls.append("\(error)")
                    apfStopped = apfStalls.count >= Self.apfMaxStalls
                    continue
                }
                let ev = p.phaseFaults
                acc["apf_not_present"]!.add(p.notPresentHandling, events: ev, counters: p.counters)
                acc["apf_page_ready"]!.add(p.ready, events: ev, counters: p.counters)
                acc["apf_ready_to_exit"]!.add(p.readyToExit, events: ev, counters: p.counters)
                acc["apf_ready_handling"]!.add(p.readyHandling, events: ev, counters: p.counters)
                acc["apf_fault_total"]!.add(p.faultTotal, events: ev, counters: p.counters)
                acc["apf_kvm_legs"]!.add(p.kvmLegs, events: ev, counters: p.counters)
                acc["apf_pager_late"]!.add(p.pagerLate)
                acc["apf_tick_delivery"]!.add(p.tickDelivery)
                apfFaults += p.faults
                if let why = p.problem, apfRoundProblem == nil { apfRoundProblem = why }
                return
            }
        }
        var left = n
        while left > 0 {
            let k = min(chunk, left)
            for key in order { acc[key]!.roundStarts.append(acc[key]!.samples.count) }
            try touchRound(k * f, record: true)
            try guestRound(k * f, record: true)
            try pairRound(k * f, record: true)
            try stubPairRound(a, sa, bitmap: bitmapA, wpBase: wpBase, invlpgTarget: pfPage, secondRoot: secondRoot, perNano: perNano, k: k * f, record: true)
            try cpl0Round(k, record: true)
            var hl: [Double] = []
            for _ in 0..<k { hl.append(hostLoop()) }
            acc["host_loop"]!.add(hl)
            acc["timer_overshoot"]!.add(timerOvershoot(count: k))
            try uffdRound(k * f, record: true)
            try dirtyRound(max(1, k), record: true)
            if guestRunningMissing == nil {
                let d = try dontneedWhileGuestRuns(pages: k * f)
                acc["dontneed_guest_running"]!.add(d.samples, counters: d.counters)
            }
            let pr = try pagerPhase.round(k * f)
            acc["pager_fault"]!.add(pr.faults, counters: pr.counters)
            acc["pager_store_write"]!.add(pr.operations.storeWrite)
            acc["pager_dontneed"]!.add(pr.operations.dontneed)
            acc["pager_store_read"]!.add(pr.operations.storeRead)
            if apfMissing == nil { try apfRound(k) }
            if let pool = ksm {
                let (t, diffs, dl) = try pool.breakNext(k * f)
                acc["ksm_cow_break"]!.add(t, counters: dl)
                acc["pair_ksm_minus_touch"]!.add(diffs, counters: dl)
            }
            left -= k
        }
        if ksm == nil, ksmMissing == nil {
            acc["ksm_cow_break"]!.samples = []
            acc["pair_ksm_minus_touch"]!.samples = []
        }
        server.stop()
        if let e = server.error { throw e }
        var apfProblem = apfMissing ?? apfRoundProblem
        if !apfStalls.isEmpty {
            report0Notes.append(("async PF (apf_*) rounds retried", "\(apfStalls.count) round VM(s) stalled and were taken again\(apfStopped ? "; the phase stopped at \(Self.apfMaxStalls) stalls" : ""): " + apfStalls.joined(separator: "; ")))
        }
        if apfMissing == nil, apfFaults < n, apfProblem == nil {
            apfProblem = "only \(apfFaults) of \(n) faulting reads had their four timestamps in order (not present, copy, ready)"
        }

        let measurements = order.compactMap { acc[$0]!.result() }
        var report = CalibrationReport(
            platform: kvm.platform, pagingMode: kvm.platform.pagingMode, tscKHz: perNano * 1e6, quick: o.quick,
            date: isoDateNow(), seconds: Double(monotonicNanoseconds() - t0) / 1e9,
            measurements: measurements, costs: [], omitted: [], realtime: realtime)
        derive(&report, nested: nested, pvm: pvm)
        if let why = ksmProblem { report.omitted.append(("HostCosts.pageCopy", "ksm_cow_break: " + why)) }
        if let why = hypercallProblem { report.omitted.append(("exit_hypercall (reported only)", why)) }
        if let why = apfProblem { report.omitted.append(("async PF (apf_*)", why)) }
        if let why = guestRunningMissing { report.omitted.append(("HostCosts.remoteFlushInitiator", "dontneed_guest_running " + why)) }
        report.omitted += report0Notes
        if let ref = report.measurement("cpl0_instruction") {
            let steal1 = HostStealTime.read()
            let loop = report.measurement("host_loop")
            report.conditions = CalibrationHostConditions(
                hostLoopNanos: loop?.summary.medianNanos ?? -1, hostLoopRoundMinNanos: loop?.roundMedians.min() ?? -1,
                hostLoopRoundMaxNanos: loop?.roundMedians.max() ?? -1,
                reference: "cpl0_instruction", referenceNanos: ref.summary.medianNanos,
                roundMinNanos: ref.roundMedians.min() ?? ref.summary.medianNanos, roundMaxNanos: ref.roundMedians.max() ?? ref.summary.medianNanos,
                stealPercent: steal0.flatMap { a in steal1.map { b in b.percent(since: a) } } ?? -1,
                loadAverage: loadAverage, runSeconds: report.seconds)
        }
        return report
    }

    static let hostLoopIterations = 200_000
    /// Unrecorded async faults at the start of each round's async-PF VM (its guest kernel's
    /// first faults map code and stacks).
    static let apfWarmPerRound = 4
    static let apfMaxStalls = 6
    var sink: UInt64 = 0

    /// Nanoseconds of a dependent square-and-add chain (no closed form for the compiler to
    /// take) on this thread.
    func hostLoop() -> Double {
        var x = sink | 3
        let t0 = monotonicNanoseconds()
        for i in 0..<UInt64(Self.hostLoopIterations) { x = x &* x &+ i }
        let t1 = monotonicNanoseconds()
        sink = x
        return Double(t1 - t0)
    }

    /// A hypercall number KVM does not know (KVM_HC_* are small integers).
    static let unknownHypercall: UInt64 = 0x6d76_0001

    enum HypercallPath { case kvm, below(rax: UInt64), fails(String) }

    /// Runs a few hypercall events in a VM of their own: KVM counted them (its hypercall
    /// path), or they came back without KVM seeing an exit (answered below this host), or
    /// what happened instead (a guest that takes #UD for them, say).
    func probeHypercall() throws(KVMError) -> HypercallPath {
        let insn = kvm.platform == .svm ? "VMMCALL" : "VMCALL"
        var cfg = GuestConfig(dataSize: 2 << 20)
        cfg.listCapacity = 64
        let g = try GuestVM(kvm: kvm, config: cfg)
        let st = try StatProbe(g)
        let result = g.layout.dataVirtual.rawValue
        _ = try g.calibrateEvents(op: MEMVIRT_CAL_TOUCH_WRITE, count: 1, base: result)  // map the result word first
        let before = try st.read()
        let n = 16
        do {
            _ = try g.calibrateEvents(op: MEMVIRT_CAL_VMCALL, count: n, base: Self.unknownHypercall, salt: kvm.platform == .svm ? 1 : 0, other: result)
        } catch {
            return .fails("a \(insn) at CPL3 does not come back to the guest here: \(error)")
        }
        let dl = try st.delta(since: before)
        let rax = try g.data.load(UInt64.self, at: g.data.guestPhysical)
        let calls = dl["hypercalls", default: 0], exits = dl["exits", default: 0]
        if calls >= UInt64(n) { return .kvm }
        // The batch itself takes a few exits (its start and its end): far fewer than one per event.
        if calls == 0 && exits < UInt64(n / 2) { return .below(rax: rax) }
        return .fails("a \(insn) at CPL3 returned to the guest but KVM counted \(calls) hypercalls and \(exits) exits for \(n) (insn_emulation \(dl["insn_emulation", default: 0])): not an exit path this calibration can name")
    }

    /// KSM copy-on-write breaks: the guest maps `count` pages, the VMM makes them identical,
    /// ksmd merges them (KSM.withSession restores the host's settings after: merged pages
    /// stay merged), and `KSMPool.breakNext` has the guest write the next ones.
    /// `timeoutSeconds`: how long ksmd may take (another process's KSM session on the host can
    /// hold ksmd off: the benchmark is then left out, and `--quick` stays short).
    func ksmPrepare(_ count: Int, timeoutSeconds: Double) throws(KVMError) -> KSMPool {
        // `count` pages to merge, then `count` never touched (the paired first touches).
        var ce = GuestConfig(dataSize: (UInt64(2 * count) * 4096 + (2 << 20) - 1) / (2 << 20) * (2 << 20))
        ce.mergeable = true
        ce.listCapacity = 2 * count
        let e = try GuestVM(kvm: kvm, config: ce)
        let eBase = e.layout.dataVirtual.rawValue
        _ = try e.calibrateEvents(op: MEMVIRT_CAL_TOUCH_WRITE, count: count, base: eBase)
        for i in 0..<count {
            try e.data.store(UInt64(0x4d65_6d56_6972_7420), at: e.data.guestPhysical.advanced(by: UInt64(i) * 4096))
        }
        try KSM.withSession { (session) throws(KVMError) in
            let before = KSM.processStat()?.mergingPages ?? 0
            let merged = session.waitUntil(timeoutSeconds: timeoutSeconds) {
                (KSM.processStat()?.mergingPages ?? 0) >= before + UInt64(count) - UInt64(count / 256 + 2)
            }
            guard merged else {
                throw KVMError.invalid("ksmd merged \((KSM.processStat()?.mergingPages ?? 0) &- before) of \(count) identical pages in \(Int(timeoutSeconds)) s")
            }
        }
        return try KSMPool(vm: e, count: count)
    }
}

/// Merged pages of the KSM benchmark's VM, broken a batch at a time.
final class KSMPool {
    let vm: GuestVM
    let stats: StatProbe
    let count: Int
    let perNano: Double
    var next = 0

    init(vm: GuestVM, count: Int) throws(KVMError) {
        self.vm = vm
        self.count = count
        stats = try StatProbe(vm)
        perNano = try vm.tscTicksPerNano()
    }

    /// The guest writes the next `k` merged pages, each paired with a first write to a fresh
    /// page in the same loop iteration: the breaks' nanoseconds, the per-pair differences
    /// (break - first touch), and the counters over the batch (2 KVM faults per pair).
    func breakNext(_ k: Int) throws(KVMError) -> ([Double], [Double], [String: UInt64]) {
        guard next + k <= count else { throw KVMError.invalid("KSM pool: \(next + k) pages asked of \(count)") }
        let s0 = try stats.read()
        let base = vm.layout.dataVirtual.rawValue
        let ticks = try vm.calibrateEvents(op: MEMVIRT_CAL_PAIR_TOUCH, count: k, base: base + UInt64(next) * 4096,
                                           other: base + UInt64(count + next) * 4096)
        var dl = try stats.delta(since: s0)
        // Per break: the counters cover a break and a first touch each.
        dl["pf_fixed"] = (dl["pf_fixed"] ?? 0) / 2
        next += k
        var breaks: [Double] = [], diffs: [Double] = []
        for i in 0..<k {
            breaks.append(Double(ticks[2 * i]) / perNano)
            diffs.append((Double(ticks[2 * i]) - Double(ticks[2 * i + 1])) / perNano)
        }
        return (breaks, diffs, dl)
    }
}

/// Today's date and time in UTC, ISO 8601.
func isoDateNow() -> String {
    var t = time(nil)
    var tmv = tm()
    gmtime_r(&t, &tmv)
    func two(_ v: Int32) -> String { v < 10 ? "0\(v)" : "\(v)" }
    return "\(tmv.tm_year + 1900)-\(two(tmv.tm_mon + 1))-\(two(tmv.tm_mday))T\(two(tmv.tm_hour)):\(two(tmv.tm_min)):\(two(tmv.tm_sec))Z"
}
