import CKVM
import MemVirtCore
import MemVirtGuest

/// `memvirt kvm probe`: the platform, its capabilities, and micro-measurements made with the
/// guest runtime (each a mean over many events, timed by the VMM between two port exits).
public struct KVMProbe: Sendable {
    public var platform: KVMPlatform
    public var apiVersion: Int
    public var capabilities: [(String, Int)]
    /// Nanoseconds per page: the guest's first write to a fresh page (KVM fault + host page),
    /// each write timed by the guest's TSC (the method `kvm calibrate` uses for its first
    /// touch, `KVMCalibration.firstTouchSamples`), in `firstTouchBatches` batches spread over
    /// ~`batchGapNanos` x batches (~0.3 s): the median of the batches' medians. One batch of all pages
    /// (~130 ms) caught this host's slow stretches whole (41.5 vs 30.4 us in two probes).
    public var firstTouchNanos: Double
    /// The mean of all per-page times (outliers included: shadow-page creation, host
    /// preemption).
    public var firstTouchMeanNanos: Double
    /// Nanoseconds per page: the same pages written again (mapped: no exit).
    public var retouchNanos: Double
    /// Nanoseconds per page: first write when a userfaultfd pager serves the page.
    public var userfaultfdNanos: Double
    /// The pager's own service time (read message -> UFFDIO_COPY done), p50 and p99, ns.
    public var userfaultfdServiceP50: UInt64
    public var userfaultfdServiceP99: UInt64
    /// Nanoseconds per `out` that exits to the VMM and back.
    public var exitRoundTripNanos: Double
    /// Nanoseconds per CPL0 instruction (emulated on PVM; native with VMX/SVM).
    public var emulatedInstructionNanos: Double
    public var pages: Int
    /// Each batch's median first touch, in order, and its CPL0 reference (one emulated
    /// instruction, timed right after the batch: the host's speed at that moment, as
    /// `kvm calibrate` records per round).
    public var firstTouchBatchMedians: [Double] = []
    /// The first touch at the host's base speed: the median of the batch medians whose CPL0
    /// reference was within 1.25x of the fastest batch's (as `kvm calibrate` takes its
    /// parameters; on kvm_pvm the host, itself a VM, runs exits and emulated CPL0 ~1.4x slower
    /// at times). `firstTouchNanos` where fewer than 3 batches ran at the base speed.
    public var firstTouchBaseNanos: Double = 0
    /// Batches whose reference was slow (above 1.25x the fastest).
    public var slowBatches = 0
    public var referenceBatchNanos: [Double] = []

    public static func run(pages: Int = 4096) throws(KVMError) -> KVMProbe {
        try onDedicatedThread(name: "memvirt-probe") { () throws(KVMError) in try measure(pages: pages) }
    }

    static func measure(pages: Int) throws(KVMError) -> KVMProbe {
        // As `kvm calibrate` does: SCHED_FIFO where permitted, so other processes' load does
        // not sit inside each exit's timing (see enterRealtimeScheduling).
        enterRealtimeScheduling()
        let kvm = try KVM()
        let caps = KVMCapability.reported.map { ($0.name, kvm.check($0)) }
        let size = UInt64(pages) * 4096

        // First touch and re-touch.
        var config = GuestConfig(dataSize: size)
        config.listCapacity = pages
        let g = try GuestVM(kvm: kvm, config: config)
        _ = try g.timeCPL0Loop(vcpu: 0, iterations: 1)
        let batches = min(firstTouchBatches, pages / 64)
        var firstSamples: [Double] = []
        var batchMedians: [Double] = [], references: [Double] = []
        for i in 0..<batches {
            let lo = i * pages / batches, hi = (i + 1) * pages / batches
            if i > 0 { usleepNanos(batchGapNanos) }
            let s = try KVMCalibration.firstTouchSamples(g, firstPage: lo, pages: hi - lo)
            firstSamples += s
            batchMedians.append(medianOf(s))
            let short = try g.timeCPL0Loop(vcpu: 0, iterations: 1)
            let long = try g.timeCPL0Loop(vcpu: 0, iterations: 501)
            references.append(Double(long > short ? long - short : 0) / 1000)
        }
        guard !firstSamples.isEmpty else { throw KVMError.invalid("probe: no first-touch samples (pages \(pages))") }
        let first = medianOf(batchMedians)
        let firstMean = firstSamples.reduce(0, +) / Double(firstSamples.count)
        let again = try touch(g, pages: pages)

        // Exit round trip.
        var m = GuestVM.command(MEMVIRT_CMD_PING)
        // 5,000: at ~30-90 us each, 20,000 took most of the probe (up to 1.8 s) for a mean.
        let pings: UInt64 = 5_000
        m.count = pings
        try g.setMailbox(0, m)
        let o = try g.execute(vcpu: 0)
        let exitNanos = Double(o.endNanos - o.startNanos) / Double(pings + 1)

        // CPL0 instructions: a loop of 1 vs 5001 iterations (2 instructions each), entered
        // directly at CPL0; the difference is 10,000 instructions.
        _ = try g.timeCPL0Loop(vcpu: 0, iterations: 1)
        var short = UInt64.max, long = UInt64.max
        for _ in 0..<3 {
            short = min(short, try g.timeCPL0Loop(vcpu: 0, iterations: 1))
            long = min(long, try g.timeCPL0Loop(vcpu: 0, iterations: 5001))
        }
        let emuNanos = Double(long > short ? long - short : 0) / 10_000

        // userfaultfd-served first touch.
        let gu = try GuestVM(kvm: kvm, config: GuestConfig(dataSize: size))
        let pager = try Pager(region: gu.data, options: PagerOptions())
        try pager.start()
        let uffd = try touch(gu, pages: pages)
        pager.stop()
        if let e = pager.error { throw e }
        let rep = pager.report()

        var probe = KVMProbe(
            platform: kvm.platform, apiVersion: kvm.apiVersion, capabilities: caps,
            firstTouchNanos: first, firstTouchMeanNanos: firstMean, retouchNanos: again, userfaultfdNanos: uffd,
            userfaultfdServiceP50: rep.serviceNanos.valueAtPercentile(50), userfaultfdServiceP99: rep.serviceNanos.valueAtPercentile(99),
            exitRoundTripNanos: exitNanos, emulatedInstructionNanos: emuNanos, pages: pages,
            firstTouchBatchMedians: batchMedians, referenceBatchNanos: references)
        if let lo = references.min(), lo > 0, references.count == batchMedians.count {
            let base = zip(batchMedians, references).filter { $0.1 <= 1.25 * lo }.map(\.0)
            probe.slowBatches = batchMedians.count - base.count
            probe.firstTouchBaseNanos = base.count >= 3 ? medianOf(base) : first
        } else {
            probe.firstTouchBaseNanos = first
        }
        return probe
    }

    /// First-touch batches and the pause between them (the batches span ~0.3 s of the host).
    static let firstTouchBatches = 16
    static let batchGapNanos: UInt64 = 20_000_000

    /// Nanoseconds per page for one write to each of `pages` pages, timed between two MARKs.
    static func touch(_ g: GuestVM, pages: Int) throws(KVMError) -> Double {
        var m = GuestVM.command(MEMVIRT_CMD_TOUCH_PAGES)
        m.base = g.layout.dataVirtual.rawValue
        m.count = UInt64(pages)
        try g.setMailbox(0, m)
        let o = try g.execute(vcpu: 0)
        return Double(o.marks[1] - o.marks[0]) / Double(pages)
    }

    public var json: JSONValue {
        func us(_ ns: Double) -> JSONValue { .double((ns / 10).rounded() / 100) }
        return .object([
            ("schema", "memvirt.kvm-probe/1"),
            ("platform", .string(platform.rawValue)), ("paging", .string(platform.pagingMode)),
            ("api_version", .int(Int64(apiVersion))),
            ("capabilities", .object(capabilities.map { ($0.0, .int(Int64($0.1))) })),
            ("pages", .int(Int64(pages))),
            ("first_touch_us", us(firstTouchNanos)), ("first_touch_mean_us", us(firstTouchMeanNanos)),
            ("first_touch_base_speed_us", us(firstTouchBaseNanos)), ("slow_batches", .int(Int64(slowBatches))),
            ("first_touch_batch_medians_us", .array(firstTouchBatchMedians.map { us($0) })),
            ("first_touch_batch_min_us", us(firstTouchBatchMedians.min() ?? 0)), ("first_touch_batch_max_us", us(firstTouchBatchMedians.max() ?? 0)),
            ("cpl0_reference_batch_ns", .array(referenceBatchNanos.map { .double(($0 * 10).rounded() / 10) })),
            ("retouch_us", us(retouchNanos)),
            ("userfaultfd_fault_us", us(userfaultfdNanos)),
            ("userfaultfd_service_p50_us", us(Double(userfaultfdServiceP50))),
            ("userfaultfd_service_p99_us", us(Double(userfaultfdServiceP99))),
            ("exit_round_trip_us", us(exitRoundTripNanos)),
            ("cpl0_instruction_us", us(emulatedInstructionNanos)),
        ])
    }

    public var text: String {
        func us(_ ns: Double) -> String { formatFixed(ns / 1e3, digits: 3) + " us" }
        var s = "platform \(platform.rawValue) (\(platform.pagingMode) paging), KVM API \(apiVersion)\n"
        s += "capabilities: " + capabilities.map { $0.1 > 0 ? ($0.1 == 1 ? $0.0 : "\($0.0)=\($0.1)") : "!\($0.0)" }.joined(separator: " ") + "\n"
        s += "per page over \(pages) pages:\n"
        s += "  first touch, base speed \(us(firstTouchBaseNanos))  (the batches whose CPL0 reference was within 1.25x of the fastest; \(slowBatches) of \(firstTouchBatchMedians.count) batches slow)\n"
        s += "  first touch            \(us(firstTouchNanos))  (median of \(firstTouchBatchMedians.count) batches' medians of per-page guest TSC times, batches \(us(firstTouchBatchMedians.min() ?? 0)) to \(us(firstTouchBatchMedians.max() ?? 0)); mean \(us(firstTouchMeanNanos)))\n"
        if let lo = referenceBatchNanos.min(), let hi = referenceBatchNanos.max() {
            s += "  CPL0 reference per batch \(formatFixed(lo, digits: 1)) to \(formatFixed(hi, digits: 1)) ns (the host's speed; kvm calibrate records the same per round)\n"
        }
        s += "  re-touch               \(us(retouchNanos))\n"
        s += "  userfaultfd-served     \(us(userfaultfdNanos))  (pager service p50 \(us(Double(userfaultfdServiceP50))), p99 \(us(Double(userfaultfdServiceP99))))\n"
        s += "exit round trip (out)    \(us(exitRoundTripNanos))\n"
        s += "CPL0 instruction         \(us(emulatedInstructionNanos))\n"
        return s
    }
}
