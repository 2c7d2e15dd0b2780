import CKVM
import MemVirtCore
import MemVirtGuest
#if canImport(Glibc)
import Glibc
#endif

/// How `KVMRunner` runs a workload.
public struct KVMRunOptions: Sendable {
    /// Guest page size of the workload's mapping.
    public var pageSize: PageSize = .size4K
    /// Back guest RAM with transparent huge pages (MADV_HUGEPAGE) instead of MADV_NOHUGEPAGE.
    public var transparentHugePages = false
    /// Serve guest RAM through a userfaultfd pager with at most this many bytes resident.
    public var residentLimit: UInt64? = nil
    /// With a pager: pages mapped ahead of each faulting page.
    public var readAhead = 0
    /// Serve guest RAM through the pager even without a resident limit.
    public var userfaultfd = false
    /// After the timed run, checksum the whole footprint in the guest (`memory_checksum`).
    public var verify = false
    /// Log dirty pages of the workload memory during the run and harvest at the end.
    public var dirtyLog: DirtyLogMode = .off
    /// Mark the workload memory MADV_MERGEABLE (KSM) and report KSM's counters.
    public var mergeable = false
    /// With `mergeable`: run ksmd (tuned, settings restored after) from before the workload
    /// until this many full scans after it, with the VM still alive. 0: leave ksmd as it is.
    public var ksmScans = 0
    /// Stop the guest and fail the run when it has not finished after this long (`--max-run`;
    /// nil: no limit, a synthetic workload always ends).
    public var maxRunNanos: UInt64? = nil
    /// Refuse the run when it would need more host memory than this (`--memory-limit`).
    public var memoryLimit: UInt64? = nil
    /// One vCPU: pin the run to the CPU the caller is on and time the host's speed there just
    /// before and just after the measured phase (`HostSpeedBracket`, outside the stats window).
    public var hostSpeedReference = false

    public init() {}
}

/// What the guest reported for one vCPU.
public struct GuestReport: Sendable {
    public var accesses: UInt64
    public var reads: UInt64
    public var writes: UInt64
    public var readSum: UInt64
    /// `memory_checksum` after the run (with `verify`), else nil.
    public var memoryChecksum: UInt64?
}

extension GuestReport {
    /// A workload's counters from its mailbox (no checksum yet).
    init(mailbox m: memvirt_mailbox) {
        self.init(accesses: m.done_accesses, reads: m.reads, writes: m.writes, readSum: m.read_sum, memoryChecksum: nil)
    }
}

/// A finished KVM run: the shared `RunResult` and the details behind it.
public struct KVMRunReport: Sendable {
    public var result: RunResult
    public var guests: [GuestReport]
    public var vmStats: StatValues
    public var vcpuStats: StatValues
    public var pager: PagerReport?
    public var dirty: DirtyHarvest?
    /// With `mergeable`: KSM's counters around the run.
    public var ksm: JSONValue? = nil
    /// With `hostSpeedReference`: the host's speed on the run's CPU before and after.
    public var hostSpeed: HostSpeedBracket? = nil
}

/// Runs a `WorkloadSpec` in a real VM: one vCPU per thread, each drawing its own stream.
public enum KVMRunner {
    /// Runs on dedicated threads; the caller's thread waits.
    public static func run(_ spec: WorkloadSpec, options: KVMRunOptions = KVMRunOptions()) throws(KVMError) -> KVMRunReport {
        try onDedicatedThread(name: "memvirt-run") { () throws(KVMError) in try runHere(spec, options: options) }
    }

    /// Same, from async code: no pool thread waits.
    public static func runAsync(_ spec: WorkloadSpec, options: KVMRunOptions = KVMRunOptions()) async throws(KVMError) -> KVMRunReport {
        try await onDedicatedThreadAsync(name: "memvirt-run") { () throws(KVMError) in try runHere(spec, options: options) }
    }

    /// The per-thread mailbox and lookup table for `spec`'s stream `thread`.
    static func prepare(_ spec: WorkloadSpec, thread: Int, layout: GuestLayout) throws(KVMError) -> (memvirt_mailbox, [UInt8]) {
        try prepare(spec, thread: thread, base: layout.dataVirtual.rawValue, table: layout.tables + layout.tableStride * UInt64(thread))
    }

    /// The same, with the workload memory at `base` and the lookup table at `table` (addresses
    /// the code that runs the mailbox sees: guest-virtual in a VM, this process's own for
    /// `NativeGuestLoop`).
    static func prepare(_ spec: WorkloadSpec, thread: Int, base: UInt64, table tableAddress: UInt64) throws(KVMError) -> (memvirt_mailbox, [UInt8]) {
        var m = GuestVM.command(MEMVIRT_CMD_WORKLOAD)
        var rng = SplitMix64(seed: SplitMix64.derive(seed: spec.seed, stream: UInt64(thread)))
        var table: [UInt8] = []
        switch spec.pattern {
        case .sequential: m.pattern = 0
        case .strided(let s): m.pattern = 1; m.stride = s
        case .uniform: m.pattern = 2
        case .zipf(let theta):
            m.pattern = 3
            let z = ZipfTable(items: Int(spec.footprint.rawValue / 4096), theta: theta)
            // cdf[k] >= u53 * 2^-53  <=>  ceil(cdf[k] * 2^53) >= u53: the guest compares integers.
            let ints = z.cdf.map { UInt64(($0 * 0x1p53).rounded(.up)) }
            table = ints.withUnsafeBytes { Array($0) }
            m.table_len = UInt64(ints.count)
        case .chase:
            m.pattern = 4
            let next = AccessGenerator.sattoloCycle(slots: Int(spec.footprint.rawValue / 64), rng: &rng)
            table = next.withUnsafeBytes { Array($0) }
            m.table_len = UInt64(next.count)
        case .gups: m.pattern = 5
        case .lackey: throw KVMError.invalid("the KVM engine runs synthetic workloads; a lackey trace is for the model engine")
        }
        m.base = base
        m.footprint = spec.footprint.rawValue
        m.accesses = spec.accesses
        m.rng_state = rng.state
        m.write_threshold = spec.writeThreshold
        m.compute = spec.computePerAccess
        m.salt = UInt64(thread) << 56
        m.table = tableAddress
        return (m, table)
    }

    /// What a run of `spec` takes from the host, at most: the guest data it touches (all of the
    /// footprint for a workload that covers it; with a pager, the resident limit: evicted
    /// pages go to the store file under /tmp, on disk here), and the runtime area with the
    /// per-thread lookup tables and the page tables (one 4 KiB table per 2 MiB of footprint
    /// with 4K pages, plus the fixed runtime: `GuestVM`'s layout, rounded up to 2 MiB).
    public static func memoryBudget(_ spec: WorkloadSpec, pageSize: PageSize, residentLimit: UInt64?) -> HostMemoryBudget {
        let f = spec.footprint.rawValue
        let data = residentLimit.map { min($0, f) } ?? f
        let (tables, o1) = tableBytes(spec).multipliedReportingOverflow(by: UInt64(max(1, spec.threads)))
        let pageTables = (f / (2 << 20) + f / (1 << 30) + 16) * 4096
        // Fixed part: the runtime image, descriptor tables, mailboxes and stacks (`GuestVM`
        // rounds the runtime area to 2 MiB).
        let fixed: UInt64 = 2 << 20
        return HostMemoryBudget(parts: [("guest data", data), ("lookup tables", o1 ? .max : tables), ("runtime", pageTables + fixed)])
    }

    /// Refuses guest page sizes the host's KVM cannot give the guest, before any VM exists:
    /// 1 GiB pages need CPUID.80000001H:EDX.Page1GB (bit 26) in KVM_GET_SUPPORTED_CPUID, or
    /// the guest's first access through a 1 GiB mapping is a bare #PF (reserved bit).
    public static func checkPageSize(_ ps: PageSize, kvm: KVM) throws(KVMError) {
        guard ps == .size1G else { return }
        try checkPageSize(ps, extendedFeatureEDX: kvm.supportedCPUIDEntry(leaf: 0x8000_0001)?.edx)
    }

    /// The same check on a CPUID leaf 0x80000001 EDX (nil: the leaf is missing).
    public static func checkPageSize(_ ps: PageSize, extendedFeatureEDX edx: UInt32?) throws(KVMError) {
        guard ps == .size1G else { return }
        guard let edx, edx & (1 << 26) != 0 else {
            throw KVMError.invalid("--page-size 1G: this host's KVM does not offer 1 GiB guest pages (CPUID 0x80000001 EDX bit 26, Page1GB, is clear in KVM_GET_SUPPORTED_CPUID); use 4K or 2M")
        }
    }

    /// Table bytes one thread needs.
    static func tableBytes(_ spec: WorkloadSpec) -> UInt64 {
        switch spec.pattern {
        case .zipf: spec.footprint.rawValue / 4096 * 8
        case .chase: spec.footprint.rawValue / 64 * 4
        default: 0
        }
    }

    static func runHere(_ spec: WorkloadSpec, options o: KVMRunOptions) throws(KVMError) -> KVMRunReport {
        guard o.mergeable || o.ksmScans == 0 else { throw KVMError.invalid("--ksm-scans needs --mergeable") }
        guard o.mergeable && o.ksmScans > 0 else { return try runVM(spec, options: o, ksm: nil) }
        return try KSM.withSession { (s) throws(KVMError) -> KVMRunReport in
            let r = try runVM(spec, options: o, ksm: s)
            // The VM is gone: let ksmd drop its pages (rmap items) from the host counters before
            // the settings go back (with run=0 they would stay until ksmd next runs).
            s.waitUntil(timeoutSeconds: 3) { KSM.processStat().map { $0.rmapItems ?? $0.mergingPages } ?? 0 == 0 }
            return r
        }
    }

    static func runVM(_ spec: WorkloadSpec, options o: KVMRunOptions, ksm session: KSMSession?) throws(KVMError) -> KVMRunReport {
        do { try spec.validate() } catch { throw KVMError.invalid(error.message) }
        if case .lackey = spec.pattern { throw KVMError.invalid("the KVM engine runs synthetic workloads; a lackey trace is for the model engine") }
        let pagerOn = o.residentLimit != nil || o.userfaultfd || o.readAhead > 0
        if pagerOn && spec.threads > 1 {
            throw KVMError.invalid("the userfaultfd pager evicts only while the one vCPU waits on a fault: use --threads 1")
        }
        if pagerOn && o.pageSize != .size4K && o.residentLimit != nil {
            throw KVMError.invalid("--resident-limit works on 4K guest pages")
        }
        try memoryBudget(spec, pageSize: o.pageSize, residentLimit: o.residentLimit).check("this run", limit: o.memoryLimit)
        let kvm = try KVM()
        try checkPageSize(o.pageSize, kvm: kvm)
        var c = GuestConfig(dataSize: spec.footprint.rawValue)
        c.dataVirtual = spec.base
        c.dataPageSize = o.pageSize
        c.vcpus = spec.threads
        c.transparentHugePages = o.transparentHugePages
        c.tableBytesPerVCPU = tableBytes(spec)
        if o.dirtyLog != .off { c.dataSlotFlags = .logDirtyPages }
        if o.dirtyLog == .bitmapManual { c.manualDirtyProtect = true }
        if o.dirtyLog == .ring { c.dirtyRingBytes = min(kvm.check(.dirtyLogRing), 1 << 20) }
        c.mergeable = o.mergeable
        let g = try GuestVM(kvm: kvm, config: c)
        let ksmBefore = o.mergeable ? (try? KSM.counters(), KSM.processStat()) : nil
        let ring = o.dirtyLog == .ring ? DirtyRingCollector(vm: g) : nil
        if let ring { g.onDirtyRingFull = { v throws(KVMError) in try ring.harvest(v) } }

        for t in 0..<spec.threads {
            let (m, table) = try prepare(spec, thread: t, layout: g.layout)
            if !table.isEmpty {
                try g.runtime.write(array: table, at: GuestPhysicalAddress(rawValue: m.table))
            }
            try g.setMailbox(t, m)
        }
        var pager: Pager? = nil
        if pagerOn {
            var po = PagerOptions()
            po.residentLimitPages = o.residentLimit.map { Int(max(1, $0 / 4096)) }
            po.readAhead = o.readAhead
            pager = try Pager(region: g.data, options: po)
            try pager!.start()
        }
        defer { pager?.stop() }

        // The host's speed on the run's CPU, before the stats window opens (its CPL0 loops
        // count in insn_emulation and exits).
        if o.hostSpeedReference && spec.threads != 1 { throw KVMError.invalid("the host-speed reference brackets a one-vCPU run (threads \(spec.threads))") }
        let pin = o.hostSpeedReference ? HostSpeedBracket.pinToCurrentCPU() : nil
        defer { if let pin { setAffinityMask(pin.restore) } }
        let speedBefore = o.hostSpeedReference ? try HostSpeedBracket.reference(g) : nil

        let vmStats = try g.vm.stats()
        let vcpuStats = try g.vcpus.map { (v) throws(KVMError) in try v.stats() }
        let vmBefore = try vmStats.read()
        var vcpuBefore = StatValues(values: [:])
        for s in vcpuStats { vcpuBefore.add(try s.read()) }
        let usageBefore = ProcessUsage.now()
        let t0 = monotonicNanoseconds()

        let outcomes = try runAll(g, maxRunNanos: o.maxRunNanos)

        let t1 = monotonicNanoseconds()
        let usageAfter = ProcessUsage.now()
        // KSM after the run (and, with a session, after ksmd's scans over the finished guest).
        var ksmJSON: JSONValue? = nil
        if let (hostBefore, procBefore) = ksmBefore {
            var kv: [(String, JSONValue)] = [("mergeable_bytes", .uint(g.data.size))]
            var scanSeconds: Double? = nil
            if let s = session { scanSeconds = try s.waitForFullScans(UInt64(o.ksmScans), timeoutSeconds: 60) }
            if let h = try? KSM.settings() { kv.append(("settings", h.json)) }
            if let s = scanSeconds { kv.append(("full_scans_waited", .int(Int64(o.ksmScans)))); kv.append(("scan_seconds", .double(s))) }
            if let a = hostBefore, let b = try? KSM.counters() {
                kv.append(("host_before", a.json))
                kv.append(("host_after", b.json))
                kv.append(("pages_shared_delta", .int(Int64(b.pagesShared) - Int64(a.pagesShared))))
                kv.append(("pages_sharing_delta", .int(Int64(b.pagesSharing) - Int64(a.pagesSharing))))
            }
            if let p = KSM.processStat() {
                kv.append(("process", p.json))
                kv.append(("saved_bytes_process", .uint(p.mergingPages > 0 ? (p.mergingPages + (p.zeroPages ?? 0)) * 4096 : 0)))
                if let a = procBefore { kv.append(("ksm_merging_pages_delta", .int(Int64(p.mergingPages) - Int64(a.mergingPages)))) }
            }
            if KSM.isPresent, (try? KSM.settings().run) == 0 { kv.append(("note", "ksmd is not running (run=0): use --ksm-scans N to run it for this VM")) }
            if !KSM.isPresent { kv.append(("note", .string(KSM.unavailableReason() ?? "no KSM"))) }
            ksmJSON = .object(kv)
        }
        let vmAfter = try vmStats.read()
        var vcpuAfter = StatValues(values: [:])
        for s in vcpuStats { vcpuAfter.add(try s.read()) }
        let vmDelta = vmAfter.delta(since: vmBefore, descriptors: vmStats.descriptors)
        let vcpuDelta = vcpuAfter.delta(since: vcpuBefore, descriptors: vcpuStats[0].descriptors)
        let wall = Double(t1 - t0) / 1e9
        var hostSpeed: HostSpeedBracket? = nil
        if let before = speedBefore {
            hostSpeed = HostSpeedBracket(cpu: pin?.cpu ?? -1, beforeNanos: before, afterNanos: try HostSpeedBracket.reference(g))
        }

        var dirty: DirtyHarvest? = nil
        switch o.dirtyLog {
        case .off: break
        case .ring: dirty = try ring!.finish()
        case .bitmap, .bitmapManual: dirty = try DirtyBitmapLog(vm: g.vm, slot: GuestLayout.dataSlot).harvest()
        }

        var guests: [GuestReport] = []
        for t in 0..<spec.threads {
            let m = try g.mailbox(t)
            guests.append(GuestReport(mailbox: m))
        }
        if o.verify {
            guests[0].memoryChecksum = try g.checksumInGuest(bytes: spec.footprint.rawValue)
        }
        let pagerReport = pager?.report()

        var counters = CounterSet(applicable: [.accesses, .reads, .writes, .guestPageFaults, .hostMinorFaults, .hostMajorFaults])
        for r in guests {
            counters.add(.accesses, r.accesses)
            counters.add(.reads, r.reads)
            counters.add(.writes, r.writes)
        }
        // Page tables are built before the run and every #PF would end the VM: none reached the guest.
        counters[.guestPageFaults] = 0
        for c in Counter.allCases {
            if let v = vcpuDelta.values[c.name] { counters[c] = v } else if let v = vmDelta.values[c.name] { counters[c] = v }
        }
        counters[.guestPageTablePages] = g.layout.pageTablePages
        counters[.hostMinorFaults] = usageAfter.minorFaults &- usageBefore.minorFaults
        counters[.hostMajorFaults] = usageAfter.majorFaults &- usageBefore.majorFaults
        if let p = pagerReport {
            counters[.swapIns] = p.storeReads
            counters[.swapOuts] = p.evictions
        }

        var userspace: [String: UInt64] = [:]
        for oc in outcomes { for (k, v) in oc.userspaceExits { userspace[k, default: 0] += v } }
        var extra: [(String, JSONValue)] = [
            ("platform", .string(kvm.platform.rawValue)),
            ("vcpus", .int(Int64(spec.threads))),
            ("exits_by_reason", exitsByReason(vcpuDelta, userspace: userspace)),
            ("kvm_stats", .object([
                ("vm", statsJSON(vmDelta, vmStats.descriptors, wall: wall)),
                ("vcpu", statsJSON(vcpuDelta, vcpuStats[0].descriptors, wall: wall)),
            ])),
            ("pf_fixed_per_second", .double(wall > 0 ? Double(vcpuDelta["pf_fixed"]) / wall : 0)),
            ("host", .object([
                ("minor_faults", .uint(counters[.hostMinorFaults])), ("major_faults", .uint(counters[.hostMajorFaults])),
                ("user_seconds", .double(usageAfter.userSeconds - usageBefore.userSeconds)),
                ("system_seconds", .double(usageAfter.systemSeconds - usageBefore.systemSeconds)),
            ])),
            ("guest", .array(guests.map { r in
                var kv: [(String, JSONValue)] = [("accesses", .uint(r.accesses)), ("reads", .uint(r.reads)), ("writes", .uint(r.writes)),
                                                 ("read_sum", .uint(r.readSum))]
                if let c = r.memoryChecksum { kv.append(("memory_checksum", .uint(c))) }
                return .object(kv)
            })),
            ("memory", .object([
                ("runtime_bytes", .uint(g.layout.runtimeSize)), ("data_bytes", .uint(g.layout.dataSize)),
                ("guest_page_size", .string(o.pageSize.description)), ("transparent_huge_pages", .bool(o.transparentHugePages)),
            ])),
        ]
        if let p = pagerReport { extra.append(("pager", p.json)) }
        if let d = dirty { extra.append(("dirty_log", d.json)) }
        if let k = ksmJSON { extra.append(("ksm", k)) }
        let result = RunResult(engine: "kvm", paging: kvm.platform.pagingMode, pageSize: o.pageSize, workload: spec,
                               counters: counters, cycles: nil, wallSeconds: wall, extra: extra)
        var report = KVMRunReport(result: result, guests: guests, vmStats: vmDelta, vcpuStats: vcpuDelta, pager: pagerReport, dirty: dirty, ksm: ksmJSON)
        report.hostSpeed = hostSpeed
        return report
    }

    /// Runs every vCPU's command on its own thread and waits for all, at most `maxRunNanos`:
    /// then the vCPUs are kicked out of KVM_RUN and the run fails, naming the limit.
    static func runAll(_ g: GuestVM, maxRunNanos: UInt64? = nil) throws(KVMError) -> [CommandOutcome] {
        let boxes = g.vcpus.map { _ in ResultBox<CommandOutcome>() }
        let kicker = VCPUKicker(vm: g)
        let running = RunningCount(g.vcpus.count)
        var threads: [DedicatedThread] = []
        for (i, box) in boxes.enumerated() {
            threads.append(try DedicatedThread.start(name: "memvirt-vcpu\(i)") {
                do { box.value = .success(try g.execute(vcpu: i, kicker: kicker)) } catch let e as KVMError { box.value = .failure(e) } catch {}
                running.finish()
            })
        }
        if let limit = maxRunNanos {
            let t0 = monotonicNanoseconds()
            while monotonicNanoseconds() - t0 < limit && running.value > 0 { usleepNanos(1_000_000) }
            if running.value > 0 { kicker.stop() }
        }
        for t in threads { t.join() }
        let outcomes = try boxes.map { (b) throws(KVMError) in try b.value!.get() }
        let unfinished = outcomes.filter(\.stopped).count
        if unfinished > 0, let limit = maxRunNanos {
            throw KVMError.invalid("the guest did not finish within --max-run \(Duration64(rawValue: limit)) (\(unfinished) of \(outcomes.count) vCPUs still running): stopped")
        }
        return outcomes
    }

    static func statsJSON(_ s: StatValues, _ ds: [StatDescriptor], wall: Double) -> JSONValue {
        .object(ds.sorted { $0.name < $1.name }.compactMap { d in
            let v = s[d.name]
            if v == 0 { return nil }
            var kv: [(String, JSONValue)] = [("value", .uint(v))]
            if d.kind == .cumulative && wall > 0 { kv.append(("per_second", .double((Double(v) / wall).rounded()))) }
            if d.unit != .none { kv.append(("unit", .string(d.unit.rawValue))); kv.append(("exponent", .int(Int64(d.exponent)))) }
            if d.kind != .cumulative { kv.append(("kind", .string(d.kind.rawValue))) }
            return (d.name, .object(kv))
        })
    }

    static func exitsByReason(_ vcpu: StatValues, userspace: [String: UInt64]) -> JSONValue {
        var kv: [(String, JSONValue)] = [("exits", .uint(vcpu["exits"]))]
        for name in vcpu.values.keys.sorted() where name.hasSuffix("_exits") && vcpu[name] > 0 {
            kv.append((name, .uint(vcpu[name])))
        }
        kv.append(("to_userspace", .object(userspace.sorted { $0.key < $1.key }.map { ($0.key, .uint($0.value)) })))
        return .object(kv)
    }
}

/// vCPU threads still running (each calls `finish` as it ends), read by the thread that
/// enforces `--max-run`.
final class RunningCount: @unchecked Sendable {
    private var lock = pthread_mutex_t()
    private var count: Int
    init(_ n: Int) { count = n; pthread_mutex_init(&lock, nil) }
    deinit { pthread_mutex_destroy(&lock) }
    func finish() { pthread_mutex_lock(&lock); count -= 1; pthread_mutex_unlock(&lock) }
    var value: Int { pthread_mutex_lock(&lock); defer { pthread_mutex_unlock(&lock) }; return count }
}

extension KVM {
    /// One entry of KVM_GET_SUPPORTED_CPUID (index 0), or nil when KVM does not list the leaf.
    func supportedCPUIDEntry(leaf: UInt32) throws(KVMError) -> kvm_cpuid_entry2? {
        let buf = try supportedCPUID()
        return buf.withPointer { p -> kvm_cpuid_entry2? in
            let n = Int(p.pointee.nent)
            let entries = UnsafeRawPointer(p).advanced(by: MemoryLayout<kvm_cpuid2>.size).assumingMemoryBound(to: kvm_cpuid_entry2.self)
            for i in 0..<n where entries[i].function == leaf && entries[i].index == 0 { return entries[i] }
            return nil
        }
    }
}
