import MemVirtCore
import MemVirtKVM
import MemVirtModel

/// One case of `memvirt validate`: a workload and the way both engines run it.
public struct ValidationCase: Sendable {
    public enum Kind: Sendable, Hashable {
        /// Page tables built before the run (the KVM guest runtime's layout): KVM's shadow MMU
        /// and the model's build shadow entries on first touch.
        case prebuilt
        /// Dirty logging on the data slot from the start, one harvest after the run.
        case dirtyLog(HarvestMethod)
        /// Host memory: the pager at a resident limit, async PF, KSM (ValidationHostCases.swift).
        case host(HostCase)
        /// A guest that edits its own page tables, running this script (ValidationGuestOps;
        /// `spec` is unused).
        case guestOps(GuestOpScript)
    }

    public var name: String
    public var spec: WorkloadSpec
    public var kind: Kind
    /// Guest page size of the workload's mapping (host pages stay 4 KiB in both engines).
    public var pageSize: PageSize

    public init(name: String, spec: WorkloadSpec, kind: Kind, pageSize: PageSize = .size4K) {
        self.name = name
        self.spec = spec
        self.kind = kind
        self.pageSize = pageSize
    }

    /// The cases of a run: the access patterns over prebuilt tables, then dirty logging
    /// harvested by bitmap and by ring. `quick`: 4 MiB, 100,000 accesses; else 64 MiB, 2 M.
    public static func all(quick: Bool) -> [ValidationCase] {
        let footprint: ByteCount = quick ? .mib(4) : .mib(64)
        let accesses: UInt64 = quick ? 100_000 : 2_000_000
        func spec(_ p: WorkloadSpec.Pattern) -> WorkloadSpec {
            WorkloadSpec(pattern: p, footprint: footprint, accesses: accesses, writeRatio: 0.3, seed: 11)
        }
        var cases: [ValidationCase] = [
            ValidationCase(name: "sequential", spec: spec(.sequential), kind: .prebuilt),
            ValidationCase(name: "strided-24k", spec: spec(.strided(stride: 24_576)), kind: .prebuilt),
            ValidationCase(name: "uniform", spec: spec(.uniform), kind: .prebuilt),
            ValidationCase(name: "zipf-0.99", spec: spec(.zipf(theta: 0.99)), kind: .prebuilt),
            ValidationCase(name: "chase", spec: spec(.chase), kind: .prebuilt),
            ValidationCase(name: "gups", spec: spec(.gups), kind: .prebuilt),
        ]
        cases.append(ValidationCase(name: "uniform-2m-guest-pages", spec: spec(.uniform), kind: .prebuilt, pageSize: .size2M))
        cases.append(ValidationCase(name: "dirty-log-bitmap", spec: spec(.uniform), kind: .dirtyLog(.bitmap)))
        cases.append(ValidationCase(name: "dirty-log-ring", spec: spec(.uniform), kind: .dirtyLog(.ring)))
        cases += hostCases(quick: quick)
        cases += ValidationGuestOps.cases(quick: quick)
        return cases
    }
}

/// What the model predicts for a case.
struct ModelSide {
    var counters: CounterSet
    var cycles: Double
    var seconds: Double
    var readSum: UInt64
    var dirtyPages: UInt64?
    var breakdown: [(String, Double)]
    /// The case's own counters beyond `counters` (the pager's, KSM's), by name.
    var extra: [(String, UInt64)] = []
    /// The part of `seconds` a native run of the stream also spends (`CostCategory.native`).
    var nativeSeconds: Double = 0

    /// This run's prediction priced `share` of the way from its costs to `slow`'s (the same
    /// case run on another machine: the same counts, other costs). The ledger is a sum of
    /// counts times costs, so the mix of the two runs is the run at the mixed costs.
    func mixed(with slow: ModelSide, share: Double) -> ModelSide {
        func mix(_ a: Double, _ b: Double) -> Double { a + share * (b - a) }
        var m = self
        m.cycles = mix(cycles, slow.cycles)
        m.seconds = mix(seconds, slow.seconds)
        m.nativeSeconds = mix(nativeSeconds, slow.nativeSeconds)
        let other = Dictionary(slow.breakdown, uniquingKeysWith: { a, _ in a })
        m.breakdown = breakdown.map { ($0.0, mix($0.1, other[$0.0] ?? 0)) }
        return m
    }
}

/// What the KVM engine measured for a case.
struct KVMSide {
    var counters: [String: UInt64]
    /// CPU time (user + system) of the process over the measured phase.
    var seconds: Double
    /// Wall time of the measured phase.
    var wallSeconds: Double
    var readSum: UInt64
    var dirtyPages: UInt64?
    var userspaceExits: UInt64
    /// The case's own counters beyond KVM's stats (the pager's, KSM's), by name.
    var extra: [String: UInt64] = [:]
    /// The guest runtime's loop run natively (`NativeGuestLoop`) after the KVM run, median of
    /// its runs, and the first run's read_sum (the guest's when the stream is the same).
    var nativeSeconds: Double? = nil
    var nativeReadSum: UInt64? = nil
    /// The host's speed on the run's CPU before and after its phase (workload cases).
    var hostSpeed: HostSpeedBracket? = nil
    /// The run's share of the host's slow state where the model priced it so.
    var slowShare: Double? = nil
}

enum ValidationEngines {
    /// KVM's ring: `KVM_DIRTY_RING_RSVD_ENTRIES` (64) entries are kept free, so the ring is
    /// "soft full" that many entries before its end (virt/kvm/dirty_ring.c,
    /// kvm_dirty_ring_get_rsvd_entries).
    static let ringReservedEntries = 64

    /// The model's run of `c`: shadow paging (kvm_pvm's mode) with the guest's page tables
    /// built before the run exactly as the KVM guest runtime builds them (every data page mapped
    /// P|W|U to its own frame, A and D clear, data frames never touched), counters and the
    /// ledger zeroed after the build, then the same access stream.
    static func runModel(_ c: ValidationCase, machine: ReproductionMachine, ringBytes: UInt64?) throws -> ModelSide {
        var config = ModelConfig()
        config.paging = .shadow
        config.costs = machine.costs
        config.tlb = machine.tlb
        // The KVM engine backs guest RAM with anonymous 4 KiB host pages (MADV_NOHUGEPAGE):
        // a read before any write maps the host's zero page, copied on the first write.
        config.shadow.hostZeroPage = true
        let spec = c.spec
        guard spec.threads == 1 else { throw InputError("validate: the model side runs one vCPU (case \(c.name) has \(spec.threads) threads)") }
        let oneG = PageSize.size1G.bytes
        let capacity = ((spec.footprint.rawValue + oneG - 1) / oneG) * oneG + 2 * oneG
        return try ModelEngine.withMachine(config: config, capacity: capacity, MachineBody { r in
            guard let m = r as? Machine<ShadowPaging> else { throw InputError("validate: the model machine is not shadow-paged") }
            let ps = c.pageSize
            guard spec.footprint.rawValue % ps.bytes == 0 else { throw InputError("validate: case \(c.name): footprint is not a multiple of \(ps)") }
            let area = VirtualMemoryArea(start: spec.base.rawValue, end: spec.base.rawValue + spec.footprint.rawValue, pageSize: ps, writable: true)
            try m.kernel.map(area, in: m.space)
            var dataGfns = Set<UInt64>()
            var va = area.start
            while va < area.end {
                guard let frame = m.kernel.frames.allocate(ps) else { throw InputError("validate: guest memory exhausted building tables") }
                guard m.kernel.installLeaf(va, frame: frame, size: ps, flags: [.present, .writable, .user], space: m.space) else {
                    throw InputError("validate: guest memory exhausted building tables")
                }
                for i in 0..<ps.frames { dataGfns.insert((frame >> 12) + i) }
                va += ps.bytes
            }
            if case .dirtyLog(let method) = c.kind {
                var costs = machine.dirty
                if method == .ring, let bytes = ringBytes {
                    // The same ring as the KVM run (16-byte kvm_dirty_gfn entries).
                    costs.ringSoftFull = Int(bytes / 16) - ringReservedEntries
                }
                m.mode.startLogging(cpu: m.cpu, method: method, groupSize: 1, costs: costs)
            }
            m.mode.settle(cpu: m.cpu)
            m.resetStatistics()
            if case .gups = spec.pattern { m.readModifyWrite = true }
            var source = GeneratedAccesses(try AccessGenerator(spec: spec, thread: 0), count: spec.accesses)
            try m.run(&source)
            var dirty: UInt64? = nil
            if case .dirtyLog = c.kind {
                dirty = UInt64(m.mode.harvest(cpu: m.cpu).filter { dataGfns.contains($0) }.count)
            }
            let counters = m.finish()
            let ledger = m.cpu.ledger
            let hz = config.costs.clockGHz * 1e9
            var side = ModelSide(counters: counters, cycles: ledger.total, seconds: ledger.total / hz, readSum: m.checksum,
                                 dirtyPages: dirty, breakdown: ledger.breakdown)
            side.nativeSeconds = CostCategory.native.map { ledger.cycles[$0.rawValue] }.reduce(0, +) / hz
            return side
        })
    }

    /// The KVM engine's run of `c` (the timed phase: the guest's command, `KVMRunner`'s wall).
    static func runKVM(_ c: ValidationCase) throws -> (KVMSide, ringBytes: UInt64?) {
        var o = KVMRunOptions()
        o.pageSize = c.pageSize
        o.hostSpeedReference = true
        switch c.kind {
        case .prebuilt: break
        case .dirtyLog(.bitmap): o.dirtyLog = .bitmap
        case .dirtyLog(.ring): o.dirtyLog = .ring
        case .host: throw InputError("validate: case \(c.name) runs through ValidationHostCases")
        case .guestOps: throw InputError("validate: case \(c.name) is a guest-op case (ValidationGuestOps runs it)")
        }
        let r: KVMRunReport
        do { r = try KVMRunner.run(c.spec, options: o) } catch { throw InputError("validate: case \(c.name): the KVM run failed: \(error)") }
        var ringBytes: UInt64? = nil
        if o.dirtyLog == .ring, let kvm = try? KVM() { ringBytes = UInt64(max(0, min(kvm.check(.dirtyLogRing), 1 << 20))) }
        var side = kvmSide(r)
        // The same loop natively, right after (the host at the same speed, as far as it can be).
        let native: NativeGuestLoop.Measurement
        do { native = try NativeGuestLoop.measure(c.spec) } catch { throw InputError("validate: case \(c.name): the native loop failed: \(error)") }
        side.hostSpeed = r.hostSpeed
        side.nativeSeconds = native.medianSeconds
        side.nativeReadSum = native.readSum
        return (side, ringBytes)
    }

    /// What a `KVMRunner` run measured, as one side of a case.
    static func kvmSide(_ r: KVMRunReport) -> KVMSide {
        var counters: [String: UInt64] = [:]
        for (k, v) in r.vcpuStats.values { counters[k] = v }
        for (k, v) in r.vmStats.values where counters[k] == nil { counters[k] = v }
        counters[Counter.hostMinorFaults.name] = r.result.counters[.hostMinorFaults]
        var userspace: UInt64 = 0
        if case .object(let kv)? = r.result.extra.first(where: { $0.0 == "exits_by_reason" })?.1,
           case .object(let u)? = kv.first(where: { $0.0 == "to_userspace" })?.1 {
            for (_, v) in u { if case .uint(let n) = v { userspace += n } }
        }
        var cpu = 0.0
        if case .object(let kv)? = r.result.extra.first(where: { $0.0 == "host" })?.1 {
            for (k, v) in kv where k == "user_seconds" || k == "system_seconds" { if case .double(let x) = v { cpu += x } }
        }
        return KVMSide(counters: counters, seconds: cpu, wallSeconds: r.result.wallSeconds, readSum: r.guests.first?.readSum ?? 0,
                       dirtyPages: r.dirty.map { UInt64($0.pages.count) }, userspaceExits: userspace)
    }
}
