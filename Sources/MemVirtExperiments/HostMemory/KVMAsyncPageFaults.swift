import MemVirtCore
import MemVirtKVM
import MemVirtModel
import MemVirtReport
#if canImport(Glibc)
import Glibc
#endif

/// `apf` on the KVM engine: seed 001 (KVM Forum 2010, "Asynchronous page faults") on a real
/// VM. The seed ran 4 vCPUs, a 2 GiB guest in a 512 MiB memory group (1/4 resident), 4
/// faulting and 4 working threads for 60 s, with swap as the slow store: APF doubled the
/// working threads' count (258.8e9 vs 129.8e9 increments, x1.995). Here: one vCPU per host
/// core, a resident limit enforced by the userfaultfd pager, guest memory 4x that limit, a page
/// store with a service time (1 ms, a disk), the guest timer slicing each vCPU between its two
/// threads, halt polling off; the same run without and with APF.
public struct KVMAsyncPageFaults: Experiment {
    public static let name = "apf"
    public static let summary = "Async page faults on /dev/kvm: working threads' progress with and without APF (seed: x1.995)"
    public static let seedRatio = 1.995
    public var base = AsyncPFCase()
    /// Store service times to sweep (empty: the one case `base.storeDelayNanos`).
    public var sweepDelays: [UInt64] = []

    public init(quick: Bool) {
        base.vcpus = max(1, min(GuestLayout.maxVCPUs, hostCores()))
        base.seconds = quick ? 3 : 20
    }

    /// With `sweep`: store service times 0.1...4 ms, `seconds` per case.
    public init(quick: Bool, sweep: Bool, vcpus: Int? = nil, seconds: Double? = nil) {
        self.init(quick: quick)
        if let v = vcpus { base.vcpus = v }
        if sweep {
            sweepDelays = [100_000, 250_000, 500_000, 1_000_000, 2_000_000, 4_000_000]
            base.seconds = quick ? 2 : 5
        }
        if let s = seconds { base.seconds = s }
    }

    public func run(progress: @Sendable (String) -> Void) throws -> ExperimentReport {
        let delays = sweepDelays.isEmpty ? [base.storeDelayNanos] : sweepDelays
        var pairs: [(AsyncPFResult, AsyncPFResult)] = []
        for d in delays {
            var c = base
            c.storeDelayNanos = d
            c.asyncPF = false
            progress("apf: \(c.vcpus) vCPUs, store \(formatFixed(Double(d) / 1e6, digits: 2)) ms, without APF, \(formatFixed(c.seconds, digits: 0)) s")
            let off = try AsyncPFBenchmark.run(c)
            c.asyncPF = true
            progress("apf: \(c.vcpus) vCPUs, store \(formatFixed(Double(d) / 1e6, digits: 2)) ms, with APF, \(formatFixed(c.seconds, digits: 0)) s")
            let on = try AsyncPFBenchmark.run(c)
            pairs.append((off, on))
        }
        let on0 = (pairs.first(where: { $0.0.config.storeDelayNanos == 1_000_000 }) ?? pairs[0]).1
        let m = Self.modelConfig(on0.config)
        progress("apf: the model engine's VMSimulation of the same case, \(formatFixed(m.duration / 1e9, digits: 0)) simulated seconds")
        let (mOn, mOff) = try AsyncPageFaults.runPair(m, progress: { _ in })
        let model = ModelComparison(config: m, ratio: mOn.totalIncrements / max(mOff.totalIncrements, 1),
                                    notPresent: mOn.counters[.apfNotPresent], ready: mOn.counters[.apfReady])
        return Self.report(pairs, sweep: !sweepDelays.isEmpty, model: model)
    }

    /// The model engine's run of the same case.
    struct ModelComparison {
        var config: VMSimulationConfig
        var ratio: Double
        var notPresent: UInt64
        var ready: UInt64
    }

    /// The model engine's VMSimulation scaled to a KVM case: as many vCPUs, faulting and
    /// working threads, the same guest memory and resident limit, a store with the same
    /// fixed service time and no queueing (the pager serves every fault after the delay,
    /// overlapping), read-only faulting threads, this host's profile (`reproduce --profile`, else this host
    /// calibrated, else pvm-shadow) with that profile's page-ready delay (not measured by this run:
    /// calibration does not measure async PF; pvm-shadow's 150 us is from earlier kvm_pvm runs). The guest scheduler is the model's CFS (the KVM case round-robins
    /// its two threads on the LAPIC timer): the two agree when the faulting thread blocks.
    static func modelConfig(_ c: AsyncPFCase) -> VMSimulationConfig {
        var m = VMSimulationConfig()
        m.vcpus = c.vcpus
        m.faultThreads = c.vcpus
        m.workThreads = c.vcpus
        m.guestMemory = ByteCount(c.residentLimit * c.memoryMultiple)
        m.hostLimit = ByteCount(c.residentLimit)
        m.faultBuffer = ByteCount(c.residentLimit * c.memoryMultiple / UInt64(c.vcpus) & ~4095)
        m.faultWriteRatio = 0
        // The pager's store: a constant delay per page, served in parallel (Pager's pending
        // queue); its writes of evicted pages go to a file in the page cache (a few us:
        // estimate, pwrite of 4 KiB).
        // Bandwidth 10 bytes/ns (10 GB/s, a memory copy: assumed, never the bottleneck at one
        // page per store delay); queue depth 64 = KVM's async PFs per vCPU (ASYNC_PF_PER_VCPU).
        m.device = SwapDeviceModel(name: "pager-store", readLatency: Double(c.storeDelayNanos), writeLatency: 5_000,
                                   bandwidth: 10, queueDepth: 64)
        // This host's profile: `reproduce --profile`, else this host calibrated, else pvm-shadow
        // (whose page-ready delay, 150 us, comes from earlier kvm_pvm measurements: docs/references.md).
        m.costs = Reproductions.thisHost.costs
        m.guestCosts = Reproductions.thisHost.scheduling
        m.scheduler = .forCPUs(c.vcpus)
        m.duration = min(c.seconds, 5) * 1e9
        m.seed = c.seed
        return m
    }

    static func ratio(_ off: AsyncPFResult, _ on: AsyncPFResult) -> Double {
        // Per second, so a case that ran a little longer gains nothing.
        let a = Double(on.totalWork) / on.wallSeconds, b = Double(off.totalWork) / off.wallSeconds
        return b > 0 ? a / b : 0
    }

    static func report(_ pairs: [(AsyncPFResult, AsyncPFResult)], sweep: Bool, model: ModelComparison) -> ExperimentReport {
        var tables: [TextTable] = []
        let (off0, on0) = pairs.first(where: { $0.0.config.storeDelayNanos == 1_000_000 }) ?? pairs[0]
        var workers = TextTable(title: "workers (store \(formatFixed(Double(on0.config.storeDelayNanos) / 1e6, digits: 2)) ms, \(formatFixed(on0.wallSeconds, digits: 1)) s per case)",
                                header: ["vCPU", "work without APF", "work with APF", "faulting reads without", "faulting reads with"])
        for i in 0..<on0.work.count {
            workers.add([String(i), formatGrouped(off0.work[i]), formatGrouped(on0.work[i]),
                         formatGrouped(off0.faultingReads[i]), formatGrouped(on0.faultingReads[i])])
        }
        workers.add(["total", formatGrouped(off0.totalWork), formatGrouped(on0.totalWork),
                     formatGrouped(off0.faultingReads.reduce(0, +)), formatGrouped(on0.faultingReads.reduce(0, +))])
        tables.append(workers)
        var cases = TextTable(title: "cases", header: ["store ms", "APF", "work/s", "page not present", "page ready", "store reads", "evictions", "idle ms", "host wait", "mismatches"])
        for (off, on) in pairs {
            for r in [off, on] {
                cases.add([formatFixed(Double(r.config.storeDelayNanos) / 1e6, digits: 2), r.config.asyncPF ? "on" : "off",
                           formatGrouped(UInt64(Double(r.totalWork) / r.wallSeconds)), formatGrouped(r.notPresent), formatGrouped(r.ready),
                           formatGrouped(r.pager.storeReads), formatGrouped(r.pager.evictions),
                           formatFixed(r.schedulers.map { Double($0.idleNanos) / 1e6 }.reduce(0, +), digits: 0),
                           r.hostWaitShare.map { formatFixed($0 * 100, digits: 1) + "%" } ?? "n/a", formatGrouped(r.mismatches)])
            }
        }
        tables.append(cases)
        var ratios = TextTable(title: "apf_work_ratio (work with APF / work without, per second)", header: ["store ms", "measured", "model engine", "seed (KVM Forum 2010)"])
        for (off, on) in pairs {
            ratios.add([formatFixed(Double(on.config.storeDelayNanos) / 1e6, digits: 2), "x" + formatFixed(ratio(off, on), digits: 3),
                        on.config.storeDelayNanos == UInt64(model.config.device.readLatency) ? "x" + formatFixed(model.ratio, digits: 3) : "", "x1.995"])
        }
        tables.append(ratios)
        // The seed's guest profile: the working thread's share of vCPU time, from the VMM's
        // scheduler (how long each thread held its vCPU, KVM_RUN to exit).
        func share(_ r: AsyncPFResult) -> Double { r.workShare }
        var profile = TextTable(title: "working threads' share of vCPU time (time they held their vCPUs, from the VMM's scheduler)",
                                header: ["", "without APF", "with APF"])
        profile.add(["measured", formatFixed(share(off0) * 100, digits: 1) + "%", formatFixed(share(on0) * 100, digits: 1) + "%"])
        profile.add(["seed (guest profile)", "63.42%", "97.93%"])
        tables.append(profile)
        let main = ratio(off0, on0)
        var json: [(String, JSONValue)] = [
            ("schema", "memvirt.reproduce/1"), ("name", .string(name)), ("engine", "kvm"),
            ("vcpus", .int(Int64(on0.config.vcpus))),
            ("apf_work_ratio", .double((main * 1000).rounded() / 1000)),
            ("seed_ratio", .double(seedRatio)), ("model_ratio", .double((model.ratio * 1000).rounded() / 1000)),
            ("model", .object([("apf_work_ratio", .double(model.ratio)), ("apf_not_present", .uint(model.notPresent)),
                               ("apf_ready", .uint(model.ready)), ("simulated_seconds", .double(model.config.duration / 1e9)),
                               ("costs", .string(model.config.costs.name)), ("page_ready_delay_us", .double(model.config.guestCosts.pageReadyDelay / 1e3))])),
            ("work_total_without_apf", .uint(off0.totalWork)), ("work_total_with_apf", .uint(on0.totalWork)),
            ("work_without_apf", .array(off0.work.map { .uint($0) })), ("work_with_apf", .array(on0.work.map { .uint($0) })),
            ("apf_not_present", .uint(on0.notPresent)), ("apf_ready", .uint(on0.ready)),
            ("work_share_without_apf", .double((share(off0) * 1000).rounded() / 1000)),
            ("work_share_with_apf", .double((share(on0) * 1000).rounded() / 1000)),
            ("mismatches", .uint(off0.mismatches + on0.mismatches)),
            ("without_apf", off0.json), ("with_apf", on0.json),
        ]
        if sweep {
            json.append(("sweep", .array(pairs.map { (off, on) in
                .object([("store_delay_us", .double(Double(on.config.storeDelayNanos) / 1e3)),
                         ("apf_work_ratio", .double((ratio(off, on) * 1000).rounded() / 1000)),
                         ("work_per_s_without_apf", .double((Double(off.totalWork) / off.wallSeconds).rounded())),
                         ("work_per_s_with_apf", .double((Double(on.totalWork) / on.wallSeconds).rounded())),
                         ("apf_not_present", .uint(on.notPresent)), ("apf_ready", .uint(on.ready))])
            })))
        }
        // A vCPU thread waiting for a host CPU loses work with APF (it would run all the time)
        // more than without (it sleeps in KVM half the time anyway): on a busy host the
        // measured ratio understates what APF does. Said when it happened.
        let busiest = pairs.flatMap { [$0.0, $0.1] }.compactMap(\.hostWaitShare).max() ?? 0
        json.append(("host_runqueue_wait_share_max", .double((busiest * 1000).rounded() / 1000)))
        var contention: [String] = []
        if busiest > 0.05 {
            contention.append("The host was busy: vCPU threads waited for a host CPU up to \(formatFixed(busiest * 100, digits: 0))% of the time (host wait). With APF a vCPU would run all the time, without it sleeps in KVM half of it, so contention lowers the measured ratio: measure on an idle host.")
        }
        return ExperimentReport(
            name: name, title: summary, tables: tables,
            notes: contention + [
                "Seed: 4 vCPUs, 2 GiB guest in 512 MiB, 60 s: with APF 258,846,142,585 increments, without 129,752,639,953: x1.995; guest profile with APF 97.93% in the working thread.",
                "Here: \(on0.config.vcpus) vCPU(s), resident limit \(ByteCount(on0.config.residentLimit)) (full from the start: steady state), guest memory \(ByteCount(on0.config.residentLimit * on0.config.memoryMultiple)), time slice \(formatFixed(Double(on0.config.timeSliceNanos) / 1e6, digits: 1)) ms, halt polling off.",
                "APF costs two guest events per fault (a #PF and a 'page ready' interrupt through CPL0 stubs, emulated on kvm_pvm): it pays when page-ins are slow.",
                "Model engine: VMSimulation of the same case (\(model.config.vcpus) vCPUs, \(model.config.guestMemory) in \(model.config.hostLimit.map { "\($0)" } ?? "no limit"), a store of \(formatFixed(model.config.device.readLatency / 1e6, digits: 2)) ms, \(model.config.costs.name) costs, the profile's page-ready delay of \(formatFixed(model.config.guestCosts.pageReadyDelay / 1e3, digits: 0)) us (not measured by this run), CFS guest scheduler), \(formatFixed(model.config.duration / 1e9, digits: 0)) simulated seconds: x\(formatFixed(model.ratio, digits: 3)).",
            ],
            json: .object(json))
    }
}

/// `apf-sweep` on the KVM engine: the same, over store service times 0.1...4 ms (5 s a case).
public struct KVMAsyncPageFaultsSweep: Experiment {
    public static let name = "apf-sweep"
    public static let summary = "Async page faults on /dev/kvm over store service times: where APF starts to pay"
    let inner: KVMAsyncPageFaults
    public init(quick: Bool) { inner = KVMAsyncPageFaults(quick: quick, sweep: true) }
    public func run(progress: @Sendable (String) -> Void) throws -> ExperimentReport {
        var r = try inner.run(progress: progress)
        r.name = Self.name
        return r
    }
}

/// Online host cores (sysconf(_SC_NPROCESSORS_ONLN)).
func hostCores() -> Int {
    #if canImport(Glibc)
    return Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))
    #else
    return 2
    #endif
}
