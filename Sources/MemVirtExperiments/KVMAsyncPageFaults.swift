import MemVirtCore
import MemVirtKVM
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
        return Self.report(pairs, sweep: !sweepDelays.isEmpty)
    }

    static func ratio(_ off: AsyncPFResult, _ on: AsyncPFResult) -> Double {
        // Per second, so a case that ran a little longer gains nothing.
        let a = Double(on.totalWork) / on.wallSeconds, b = Double(off.totalWork) / off.wallSeconds
        return b > 0 ? a / b : 0
    }

    static func report(_ pairs: [(AsyncPFResult, AsyncPFResult)], sweep: Bool) -> ExperimentReport {
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
        var cases = TextTable(title: "cases", header: ["store ms", "APF", "work/s", "page not present", "page ready", "store reads", "evictions", "idle ms", "mismatches"])
        for (off, on) in pairs {
            for r in [off, on] {
                cases.add([formatFixed(Double(r.config.storeDelayNanos) / 1e6, digits: 2), r.config.asyncPF ? "on" : "off",
                           formatGrouped(UInt64(Double(r.totalWork) / r.wallSeconds)), formatGrouped(r.notPresent), formatGrouped(r.ready),
                           formatGrouped(r.pager.storeReads), formatGrouped(r.pager.evictions),
                           formatFixed(r.schedulers.map { Double($0.idleNanos) / 1e6 }.reduce(0, +), digits: 0), formatGrouped(r.mismatches)])
            }
        }
        tables.append(cases)
        var ratios = TextTable(title: "apf_work_ratio (work with APF / work without, per second)", header: ["store ms", "measured", "seed (KVM Forum 2010)"])
        for (off, on) in pairs {
            ratios.add([formatFixed(Double(on.config.storeDelayNanos) / 1e6, digits: 2), "x" + formatFixed(ratio(off, on), digits: 3), "x1.995"])
        }
        tables.append(ratios)
        let main = ratio(off0, on0)
        var json: [(String, JSONValue)] = [
            ("schema", "memvirt.reproduce/1"), ("name", .string(name)), ("engine", "kvm"),
            ("vcpus", .int(Int64(on0.config.vcpus))),
            ("apf_work_ratio", .double((main * 1000).rounded() / 1000)),
            ("seed_ratio", .double(seedRatio)), ("model_ratio", .null),
            ("work_total_without_apf", .uint(off0.totalWork)), ("work_total_with_apf", .uint(on0.totalWork)),
            ("work_without_apf", .array(off0.work.map { .uint($0) })), ("work_with_apf", .array(on0.work.map { .uint($0) })),
            ("apf_not_present", .uint(on0.notPresent)), ("apf_ready", .uint(on0.ready)),
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
        return ExperimentReport(
            name: name, title: summary, tables: tables,
            notes: [
                "Seed: 4 vCPUs, 2 GiB guest in 512 MiB, 60 s: with APF 258,846,142,585 increments, without 129,752,639,953: x1.995; guest profile with APF 97.93% in the working thread.",
                "Here: \(on0.config.vcpus) vCPU(s), resident limit \(ByteCount(on0.config.residentLimit)), guest memory \(ByteCount(on0.config.residentLimit * on0.config.memoryMultiple)), time slice \(formatFixed(Double(on0.config.timeSliceNanos) / 1e6, digits: 1)) ms, halt polling off.",
                "APF costs two guest events per fault (a #PF and a 'page ready' interrupt through CPL0 stubs, emulated on kvm_pvm): it pays when page-ins are slow.",
                "The model engine has no APF reproduction yet (model_ratio null).",
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
