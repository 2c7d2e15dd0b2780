import MemVirtCore
import MemVirtGuest
import MemVirtKVM

/// One case of the async-PF benchmark (seed 001, "KVM asynchronous page faults", KVM Forum
/// 2010, scaled to this host): per vCPU a faulting thread (uniform random reads over guest
/// memory `memoryMultiple` times the resident limit, served by the userfaultfd pager from a
/// page store with a service time) and a working thread (counter increments), sharing the
/// vCPU by the guest timer. With async PF the faulting thread is parked on "page not present"
/// and the working thread runs; without, the vCPU waits in KVM for every page-in.
public struct AsyncPFCase: Sendable {
    public var vcpus = 2
    public var seconds: Double = 20
    public var residentLimit: UInt64 = 32 << 20
    public var memoryMultiple: UInt64 = 4
    public var storeDelayNanos: UInt64 = 1_000_000
    public var timeSliceNanos: UInt64 = 4_000_000
    public var asyncPF = true
    public var seed: UInt64 = 1
    /// Start at the steady state: the pager makes `residentLimit` of guest memory resident
    /// before the vCPUs run (the seed's guest had run long before its 60 s were measured).
    /// Otherwise the first `residentLimit / 4 KiB` faults only fill the limit and evict nothing.
    public var startFull = true
    /// Run the faulting threads (false: only the working threads, for the rate a working
    /// thread reaches with its vCPU to itself: the reference for work shares).
    public var faultingThreads = true
    public init() {}
}

/// Per-worker and per-vCPU results of one case.
public struct AsyncPFResult: Sendable {
    public var config: AsyncPFCase
    /// Working threads' counter increments, one per vCPU.
    public var work: [UInt64]
    /// Faulting threads' completed reads, one per vCPU.
    public var faultingReads: [UInt64]
    /// Words the faulting threads read that differed from the store's (must be 0).
    public var mismatches: UInt64
    public var schedulers: [VCPUSchedulerReport]
    public var pager: PagerReport
    public var wallSeconds: Double
    public var vcpuStats: StatValues

    public var totalWork: UInt64 { work.reduce(0, +) }
    public var notPresent: UInt64 { schedulers.map(\.apfNotPresent).reduce(0, +) }
    public var ready: UInt64 { schedulers.map(\.apfReady).reduce(0, +) }
    /// The vCPU threads' time waiting on a host run queue, as a share of the wall time (0: the
    /// host gave every vCPU a CPU whenever it could run; nil: no schedstat here).
    /// The working threads' share of vCPU time: how long they held their vCPUs (the VMM's
    /// scheduler clocks every KVM_RUN) against the run's wall time on every vCPU: the seed's
    /// guest profile (97.93% with APF, 63.42% without).
    public var workShare: Double {
        let per = config.faultingThreads ? 2 : 1
        let held = schedulers.map { s in s.threadNanos[per * s.vcpu] ?? 0 }.reduce(0, +)
        return wallSeconds > 0 ? Double(held) / 1e9 / wallSeconds / Double(max(1, schedulers.count)) : 0
    }

    public var hostWaitShare: Double? {
        let w = schedulers.compactMap(\.hostWaitNanos)
        guard w.count == schedulers.count, wallSeconds > 0 else { return nil }
        return Double(w.reduce(0, +)) / 1e9 / wallSeconds / Double(max(1, schedulers.count))
    }

    public var json: JSONValue {
        .object([
            ("async_pf", .bool(config.asyncPF)), ("vcpus", .int(Int64(config.vcpus))), ("seconds", .double(wallSeconds)),
            ("resident_limit_bytes", .uint(config.residentLimit)),
            ("memory_bytes", .uint(config.residentLimit * config.memoryMultiple)),
            ("store_delay_us", .double(Double(config.storeDelayNanos) / 1e3)),
            ("time_slice_us", .double(Double(config.timeSliceNanos) / 1e3)),
            ("work", .array(work.map { .uint($0) })), ("work_total", .uint(totalWork)),
            ("faulting_reads", .array(faultingReads.map { .uint($0) })), ("mismatches", .uint(mismatches)),
            ("apf_not_present", .uint(notPresent)), ("apf_ready", .uint(ready)),
            ("host_runqueue_wait_share", hostWaitShare.map { .double(($0 * 1000).rounded() / 1000) } ?? .null),
            ("schedulers", .array(schedulers.map(\.json))), ("pager", pager.json),
            ("pf_fixed", .uint(vcpuStats["pf_fixed"])), ("exits", .uint(vcpuStats["exits"])),
            ("halt_exits", .uint(vcpuStats["halt_exits"])),
        ])
    }
}

public enum AsyncPFBenchmark {
    /// Runs one case on dedicated threads (vCPUs, pager); the caller's thread waits.
    public static func run(_ c: AsyncPFCase) throws(KVMError) -> AsyncPFResult {
        guard c.vcpus >= 1, c.vcpus <= GuestLayout.maxVCPUs else { throw KVMError.invalid("vCPUs \(c.vcpus): use 1...\(GuestLayout.maxVCPUs)") }
        guard c.seconds > 0, c.seconds <= 3600 else { throw KVMError.invalid("duration \(c.seconds) s: use (0, 3600]") }
        guard c.residentLimit >= 1 << 20, c.residentLimit % 4096 == 0 else { throw KVMError.invalid("resident limit \(ByteCount(c.residentLimit)): at least 1MiB, whole pages") }
        guard c.memoryMultiple >= 1, c.memoryMultiple <= 64 else { throw KVMError.invalid("memory multiple \(c.memoryMultiple): use 1...64") }
        let (result, pager) = try runVM(c)
        pager.stop()
        var r = result
        r.pager = pager.report()
        if let e = pager.error { throw e }
        return r
    }

    /// Everything whose lifetime must end before the pager stops: KVM's async-PF workers may
    /// still wait on the userfaultfd when the vCPUs stop, and the VM goes away only after them.
    static func runVM(_ c: AsyncPFCase) throws(KVMError) -> (AsyncPFResult, Pager) {
        let kvm = try KVM()
        var gc = GuestConfig(dataSize: c.residentLimit * c.memoryMultiple)
        gc.vcpus = c.vcpus
        gc.irqchip = true
        gc.threads = (c.faultingThreads ? 2 : 1) * c.vcpus
        let g = try GuestVM(kvm: kvm, config: gc)
        try g.vm.disableHaltPolling()
        let salt = c.seed &* 0x2545_F491_4F6C_DD1D
        var po = PagerOptions()
        po.residentLimitPages = Int(c.residentLimit / 4096)
        po.storeDelayNanos = c.storeDelayNanos
        po.storeContent = .pattern(salt: salt)
        let pager = try Pager(region: g.data, options: po)
        if c.startFull { try pager.prefill(0..<Int(c.residentLimit / 4096)) }
        try pager.start()
        var specs: [GuestThreadSpec] = []
        for i in 0..<c.vcpus {
            specs.append(GuestThreadSpec(vcpu: i, mailbox: GuestVM.command(MEMVIRT_CMD_COUNT)))
            if !c.faultingThreads { continue }
            var f = GuestVM.command(MEMVIRT_CMD_RANDOM_READ)
            f.base = g.layout.dataVirtual.rawValue
            f.footprint = g.layout.dataSize
            f.rng_state = SplitMix64.derive(seed: c.seed, stream: UInt64(i))
            f.salt = salt
            specs.append(GuestThreadSpec(vcpu: i, mailbox: f))
        }
        var ko = GuestKernelOptions()
        ko.asyncPF = c.asyncPF
        ko.timeSliceNanos = c.timeSliceNanos
        let kernel = try GuestKernel(vm: g, threads: specs, options: ko)
        let stats = try g.vcpus.map { (v) throws(KVMError) in try v.stats() }
        var before = StatValues(values: [:])
        for s in stats { before.add(try s.read()) }
        let t0 = monotonicNanoseconds()
        let reports = try kernel.run(forNanos: UInt64(c.seconds * 1e9))
        let wall = Double(monotonicNanoseconds() - t0) / 1e9
        var after = StatValues(values: [:])
        for s in stats { after.add(try s.read()) }
        var work: [UInt64] = [], reads: [UInt64] = [], mismatches: UInt64 = 0
        let perVCPU = c.faultingThreads ? 2 : 1
        for i in 0..<c.vcpus {
            work.append(try kernel.mailbox(perVCPU * i).counter)
            guard c.faultingThreads else { reads.append(0); continue }
            let f = try kernel.mailbox(2 * i + 1)
            reads.append(f.done_accesses)
            mismatches += f.mismatches
        }
        // Let the page-ins still in flight finish, so the VM's async-PF work can end.
        let wait = monotonicNanoseconds()
        while pager.outstanding > 0 && monotonicNanoseconds() - wait < 2_000_000_000 { usleepNanos(1_000_000) }
        if let e = pager.error { throw e }
        let r = AsyncPFResult(config: c, work: work, faultingReads: reads, mismatches: mismatches, schedulers: reports,
                              pager: pager.report(), wallSeconds: wall,
                              vcpuStats: after.delta(since: before, descriptors: stats[0].descriptors))
        return (r, pager)
    }
}
