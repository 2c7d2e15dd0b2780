import MemVirtCore
import MemVirtModel
import MemVirtReport

/// Seed 001's benchmark (KVM Forum 2010, async page faults): 4 vCPUs, a 2 GiB guest inside a
/// 512 MiB memory group, 4 threads doing random memory accesses (faulting) and 4 threads
/// incrementing per-thread counters (working), 60 s, with and without APF.
public struct AsyncPageFaults: Experiment {
    public static let name = "apf"
    public static let summary = "Async page faults: 4 faulting + 4 working threads, 2 GiB guest in 512 MiB, with and without APF"

    /// The seed's per-worker counters (docs/references.md, Seeds).
    static let seedWith: [Double] = [63_972_141_051, 65_149_033_299, 66_301_967_246, 63_423_000_989]
    static let seedWithout: [Double] = [30_619_912_622, 33_951_339_266, 31_577_780_093, 33_603_607_972]

    let config: VMSimulationConfig
    public init(quick: Bool) {
        var c = VMSimulationConfig()
        if quick {
            c.guestMemory = .mib(256)
            c.hostLimit = .mib(64)
            c.faultBuffer = .mib(56)
            c.duration = 5e9
        }
        config = c
    }
    public init(config: VMSimulationConfig) { self.config = config }

    /// Runs the pair (with APF, without).
    public static func runPair(_ config: VMSimulationConfig, progress: @Sendable (String) -> Void) throws -> (with: VMSimulationResult, without: VMSimulationResult) {
        var on = config
        on.apf = true
        var off = config
        off.apf = false
        progress("\(name): with APF, \(formatFixed(config.duration / 1e9, digits: 0)) simulated seconds")
        let a = try VMSimulation(config: on).run()
        progress("\(name): without APF")
        let b = try VMSimulation(config: off).run()
        return (a, b)
    }

    public func run(progress: @Sendable (String) -> Void) throws -> ExperimentReport {
        let (on, off) = try Self.runPair(config, progress: progress)
        let ratio = on.totalIncrements / max(off.totalIncrements, 1)
        let seconds = config.duration / 1e9
        let seedScale = seconds / 60

        var workers = TextTable(title: "Counter threads: increments in \(formatFixed(seconds, digits: 0)) simulated s",
                                header: ["worker", "with APF", "without APF", "seed with (60 s)", "seed without (60 s)"])
        for i in 0..<on.workerIncrements.count {
            workers.add(["\(i)", formatGrouped(UInt64(on.workerIncrements[i])), formatGrouped(UInt64(off.workerIncrements[i])),
                         i < 4 ? formatGrouped(UInt64(Self.seedWith[i])) : "", i < 4 ? formatGrouped(UInt64(Self.seedWithout[i])) : ""])
        }
        let seedTotalWith = Self.seedWith.reduce(0, +), seedTotalWithout = Self.seedWithout.reduce(0, +)
        workers.add(["total", formatGrouped(UInt64(on.totalIncrements)), formatGrouped(UInt64(off.totalIncrements)),
                     formatGrouped(UInt64(seedTotalWith)), formatGrouped(UInt64(seedTotalWithout))])
        workers.add(["ratio", formatFixed(ratio, digits: 3), "", formatFixed(seedTotalWith / seedTotalWithout, digits: 3), ""])

        var profile = TextTable(title: "Where vCPU time went (share of 4 vCPUs x \(formatFixed(seconds, digits: 0)) s)",
                                header: ["category", "with APF", "without APF", "seed with", "seed without"])
        let seedCol: [VCPUTime: (String, String)] = [.workThread: ("97.93%", "63.42%"), .faultThread: ("", "8.95%"), .guestKernel: ("", "13.64% do_softirq")]
        for c in VCPUTime.allCases {
            profile.add([c.name, pct(on.share(c)), pct(off.share(c)), seedCol[c]?.0 ?? "", seedCol[c]?.1 ?? ""])
        }
        let guestOn = guestVisible(on), guestOff = guestVisible(off)
        profile.add(["work_thread, of guest-running time", pct(guestOn), pct(guestOff), "97.93%", "63.42%"])

        var hostTable = TextTable(title: "Host and protocol", header: ["", "with APF", "without APF"])
        for c: Counter in [.hostMajorFaults, .hostMinorFaults, .swapIns, .swapOuts, .apfNotPresent, .apfReady, .exits, .tlbFlush] {
            hostTable.add([c.name, formatGrouped(on.counters[c]), formatGrouped(off.counters[c])])
        }
        hostTable.add(["faulting-thread accesses", formatGrouped(on.faultAccesses.reduce(0, +)), formatGrouped(off.faultAccesses.reduce(0, +))])
        hostTable.add(["peak resident / limit (pages)", "\(on.peakResidentFrames) / \(on.limitFrames.map(String.init) ?? "-")",
                       "\(off.peakResidentFrames) / \(off.limitFrames.map(String.init) ?? "-")"])
        hostTable.add(["wall s (set-up + run)", formatFixed(on.setupWallSeconds, digits: 2) + " + " + formatFixed(on.runWallSeconds, digits: 2),
                       formatFixed(off.setupWallSeconds, digits: 2) + " + " + formatFixed(off.runWallSeconds, digits: 2)])

        let notes = [
            "Seed (KVM Forum 2010): with APF 258,846,142,585 increments, without 129,752,639,953 (ratio 1.995); guest profile 97.93% work thread with APF, 63.42% without (13.64% do_softirq, 8.95% fault thread).",
            "Swap device: \(config.device.name), read \(formatFixed(config.device.readLatency / 1e6, digits: 2)) ms, queue depth \(config.device.queueDepth); counter rate \(formatFixed(config.incrementsPerSecond / 1e9, digits: 2))e9/s while running (calibrated on the seed's APF run).",
            "Without APF the vCPU blocks in the host while the faulting thread waits; the guest's CFS charges that time to the faulting thread, so the counter thread gets about half the vCPU. With APF the faulting thread sleeps on its token and the counter thread runs.",
            "'Of guest-running time' leaves out blocked and idle time: a guest profiler cannot sample while its vCPU is blocked, which is why the seed's profile without APF (63.42%) is higher than the counter thread's share of vCPU time.",
            "Scaled to 60 s the seed's totals are per-run; this run simulated \(formatFixed(seconds, digits: 0)) s (seed columns x \(formatFixed(seedScale, digits: 2)) to compare).",
        ]
        func side(_ r: VMSimulationResult) -> JSONValue {
            .object([
                ("workers", .array(r.workerIncrements.map { .uint(UInt64($0)) })),
                ("total", .uint(UInt64(r.totalIncrements))),
                ("fault_thread_accesses", .array(r.faultAccesses.map { .uint($0) })),
                ("time_profile", .object(VCPUTime.allCases.map { ($0.name, .double(r.share($0))) })),
                ("work_share_of_guest_running_time", .double(guestVisible(r))),
                ("counters", .object([Counter.hostMajorFaults, .hostMinorFaults, .swapIns, .swapOuts, .apfNotPresent, .apfReady, .exits, .eptViolations, .tlbFlush].map { ($0.name, .uint(r.counters[$0])) })),
                ("peak_resident_pages", .uint(r.peakResidentFrames)),
                ("limit_pages", r.limitFrames.map { .uint($0) } ?? .null),
                ("swap_device_reads", .uint(r.swapReads)), ("swap_device_writes", .uint(r.swapWrites)),
                ("events", .uint(r.events)),
                ("setup_wall_seconds", .double(r.setupWallSeconds)), ("run_wall_seconds", .double(r.runWallSeconds)),
            ])
        }
        let json: JSONValue = .object([
            ("schema", "memvirt.reproduce/1"), ("name", .string(Self.name)),
            ("simulated_seconds", .double(seconds)),
            ("apf_work_ratio", .double(ratio)),
            ("work_share_with_apf", .double(on.share(.workThread))),
            ("work_share_without_apf", .double(off.share(.workThread))),
            ("with_apf", side(on)), ("without_apf", side(off)),
            ("seed", .object([
                ("with_apf", .array(Self.seedWith.map { .uint(UInt64($0)) })), ("without_apf", .array(Self.seedWithout.map { .uint(UInt64($0)) })),
                ("apf_work_ratio", .double(seedTotalWith / seedTotalWithout)), ("work_share_with_apf", 0.9793), ("work_share_without_apf", 0.6342),
            ])),
            ("config", .object([
                ("vcpus", .int(Int64(config.vcpus))), ("guest_memory_bytes", .uint(config.guestMemory.rawValue)),
                ("host_limit_bytes", config.hostLimit.map { .uint($0.rawValue) } ?? .null), ("fault_buffer_bytes", .uint(config.faultBuffer.rawValue)),
                ("swap_device", .string(config.device.name)), ("swap_read_latency_ns", .double(config.device.readLatency)),
            ])),
        ])
        return ExperimentReport(name: Self.name, title: Self.summary, tables: [workers, profile, hostTable], notes: notes, json: json)
    }
}

func pct(_ x: Double) -> String { formatFixed(100 * x, digits: 2) + "%" }

/// The counter threads' share of the time the guest was running (not blocked, not idle).
func guestVisible(_ r: VMSimulationResult) -> Double {
    let running = r.time[VCPUTime.workThread.rawValue] + r.time[VCPUTime.faultThread.rawValue] + r.time[VCPUTime.guestKernel.rawValue] + r.time[VCPUTime.hypervisor.rawValue]
    return r.time[VCPUTime.workThread.rawValue] / max(running, 1)
}

/// `apf-sweep`: where APF stops paying, over the overcommit ratio (guest memory / limit) and
/// the swap device's read latency. A smaller guest (512 MiB) keeps each point short.
public struct AsyncPageFaultSweep: Experiment {
    public static let name = "apf-sweep"
    public static let summary = "Async page faults: work ratio over overcommit ratio and swap latency"
    let ratios: [UInt64]
    let latencies: [Double]
    let guest: ByteCount

    public init(quick: Bool) {
        ratios = quick ? [2, 4] : [2, 4, 8]
        latencies = quick ? [5_000_000, 20_000] : [5_000_000, 1_000_000, 200_000, 50_000, 10_000, 2_000]
        guest = quick ? .mib(128) : .mib(512)
    }

    /// The sweep's device: one shape, read latency varied; writes clustered 32 to a positioning.
    static func device(latency: Double) -> SwapDeviceModel {
        SwapDeviceModel(name: "sweep@\(formatFixed(latency / 1000, digits: 0))us", readLatency: latency, writeLatency: latency / 32, bandwidth: 0.5, queueDepth: 4)
    }

    public func run(progress: @Sendable (String) -> Void) throws -> ExperimentReport {
        var table = TextTable(title: "Work with APF / work without (guest \(guest), 4 vCPUs, 4 faulting + 4 working threads)",
                              header: ["overcommit"] + latencies.map { formatFixed($0 / 1000, digits: 0) + " us" })
        var rows: [JSONValue] = []
        for r in ratios {
            var cells = ["\(r)x"]
            for l in latencies {
                var c = VMSimulationConfig()
                c.guestMemory = guest
                c.faultBuffer = ByteCount((guest.rawValue - (64 << 20)) / 4 & ~4095)
                // Overcommit: the faulting threads' memory over the limit (plus room for the
                // counters and the guest's page tables).
                c.hostLimit = ByteCount((4 * c.faultBuffer.rawValue / r + (2 << 20)) & ~4095)
                c.device = Self.device(latency: l)
                c.duration = min(10e9, max(0.2e9, l * 2_000))
                progress("\(Self.name): overcommit \(r)x, read latency \(formatFixed(l / 1000, digits: 0)) us")
                let (on, off) = try AsyncPageFaults.runPair(c, progress: { _ in })
                let ratio = on.totalIncrements / max(off.totalIncrements, 1)
                cells.append(formatFixed(ratio, digits: 3))
                rows.append(.object([
                    ("overcommit", .uint(r)), ("read_latency_ns", .double(l)), ("simulated_seconds", .double(c.duration / 1e9)),
                    ("apf_work_ratio", .double(ratio)),
                    ("work_share_with_apf", .double(on.share(.workThread))), ("work_share_without_apf", .double(off.share(.workThread))),
                    ("major_faults_with_apf", .uint(on.counters[.hostMajorFaults])), ("major_faults_without_apf", .uint(off.counters[.hostMajorFaults])),
                    ("apf_not_present", .uint(on.counters[.apfNotPresent])),
                ]))
            }
            table.add(cells)
        }
        return ExperimentReport(
            name: Self.name, title: Self.summary, tables: [table],
            notes: [
                "Overcommit = the faulting threads' memory / the host limit. Device: read latency as the column, writes clustered (latency/32), 0.5 GB/s, 4 requests in service; each point simulates between 0.2 and 10 s.",
                "APF pays when a page-in takes much longer than its own cost (two injected exceptions, two guest context switches, the page-ready delay of \(formatFixed(GuestSchedulingCosts().pageReadyDelay / 1000, digits: 0)) us): ratio near 2 for disk latencies, falling toward 1 (or below) as the device gets as fast as the protocol.",
                "At 1x (everything fits) nothing is swapped after set-up and both runs are the same (ratio 1): a test checks this.",
            ],
            json: .object([("schema", "memvirt.reproduce/1"), ("name", .string(Self.name)), ("points", .array(rows))]))
    }
}
