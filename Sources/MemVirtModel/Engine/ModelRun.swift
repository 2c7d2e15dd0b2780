#if canImport(Glibc)
import Glibc
#endif
import MemVirtCore

/// Which virtualization design the model runs.
public enum PagingKind: String, CaseIterable, Sendable {
    case native, shadow, nested
}

/// Everything a model run needs besides the workload.
public struct ModelConfig: Sendable {
    public var paging: PagingKind = .native
    /// Guest page size backing the workload's memory.
    public var pageSize: PageSize = .size4K
    public var tlb: TLBConfig = .goldenCove
    public var pagingConfig = PagingConfig()
    public var costs: CostModel = .bareMetal
    /// Map every page before the measured run (no faults in it).
    public var prefault = false
    /// Model where paging-entry reads hit in the data caches (slower to simulate).
    public var modelLineCache = true
    /// Host page size backing guest memory (nested and shadow paging).
    public var hostPageSize: PageSize = .size4K
    /// Host (EPT) paging levels: 4 or 5.
    public var hostLevels = 4
    /// Compute the guest memory checksum of the workload area after the run (the KVM guest's
    /// `memory_checksum`: sum of w[k] * (2k + 1) over the area's words).
    public var memoryChecksum = false
    /// A host memory limit for the VM (nested paging): beyond it host pages are reclaimed
    /// (clock on EPT A bits) and swapped to `swapDevice`.
    public var hostLimit: ByteCount?
    public var swapDevice: SwapDeviceModel = .nvme
    /// The workload's memory is a file on the guest's disk: first touches are hard faults.
    public var fileBacked = false
    /// Shadow MMU options (unsync, flood threshold, shadow-page limit).
    public var shadow = ShadowPaging.Options()
    /// The most host memory the model itself may use (`--memory-limit`); nil: what the host
    /// has available (MemAvailable, and the cgroup's limit). A run that would need more is
    /// refused before anything is allocated (`ModelEngine.checkMemory`).
    public var memoryLimit: ByteCount?
    public init() {}
}

/// Code to run on a machine of any paging mode.
public struct MachineBody<R> {
    let body: (any MachineRunner) throws -> R
    public init(_ f: @escaping (any MachineRunner) throws -> R) { body = f }
    func run<M: PagingMode>(_ m: Machine<M>) throws -> R { try body(m) }
}

/// What `MachineBody` sees of a machine (mode-erased).
public protocol MachineRunner: AnyObject {
    var modeName: String { get }
    var cpu: ModelCPU { get }
    var kernel: SimulatedGuestKernel { get }
    var space: AddressSpace { get }
    var checksum: UInt64 { get }
    var observer: ((UInt64, UInt64) -> Void)? { get set }
    var onSyncPoint: ((UInt64?) -> Void)? { get set }
    func step(_ a: Access) throws
    func finish() -> CounterSet
    func runProcessChurn(_ spec: ProcessChurnSpec, heapBase: UInt64) throws
    func switchAddressSpace(to space: AddressSpace)
    func flushTLB(of space: AddressSpace)
    func invalidatePage(_ va: UInt64, space: AddressSpace)
    var pagingMode: any PagingMode { get }
}

extension Machine: MachineRunner {
    public var modeName: String { mode.name }
    public var pagingMode: any PagingMode { mode }
}

extension MachineRunner {
    public func runProcessChurn(_ spec: ProcessChurnSpec) throws { try runProcessChurn(spec, heapBase: WorkloadSpec.defaultBase.rawValue) }
    public var mode: any PagingMode { pagingMode }
}

/// A trace replayed as an access source.
public struct TraceAccesses: AccessSource {
    let reader: LackeyTraceReader
    let budget: TraceBudget?
    var untilCheck = TraceBudget.interval
    public init(_ reader: LackeyTraceReader) { self.reader = reader; budget = nil }
    init(_ reader: LackeyTraceReader, budget: TraceBudget) { self.reader = reader; self.budget = budget }
    public mutating func nextAccess() throws(InputError) -> Access? {
        if budget != nil {
            untilCheck -= 1
            if untilCheck == 0 {
                untilCheck = TraceBudget.interval
                try budget!.check(reader)
            }
        }
        return try reader.next()
    }
}

/// The model memory a trace replay may grow to (see `ModelEngine.memoryNeed`).
struct TraceBudget {
    static let interval = 1 << 16
    let upFront: UInt64
    let perPage: UInt64
    let limit: UInt64
    let limitSource: String
    let touchedPages: () -> UInt64
    func check(_ reader: LackeyTraceReader) throws(InputError) {
        let pages = touchedPages()
        let (grown, o1) = pages.multipliedReportingOverflow(by: perPage)
        let (total, o2) = grown.addingReportingOverflow(upFront)
        guard o1 || o2 || total > limit else { return }
        throw InputError("\(reader.path): refused at line \(reader.lineNumber): the trace has touched \(formatGrouped(pages)) distinct pages, "
            + "which the model holds in \(ByteCount(total)) (\(ByteCount(perPage)) per page + \(ByteCount(upFront)) up front); "
            + "\(limitSource) is \(ByteCount(limit))")
    }
}

/// What a model run will hold in host memory, worked out from the run's shape before anything
/// is allocated (`ModelEngine.memoryNeed`). Every item is an upper bound of what its structure
/// takes; `total` is their sum.
public struct ModelMemoryNeed: Sendable {
    /// (what, bytes), in the order they are allocated.
    public var items: [(String, UInt64)] = []
    /// Bytes allocated before the first access whatever the run touches.
    public var upFront: UInt64 = 0
    /// Bytes per distinct guest page touched (its data and the model's state for it).
    public var perTouchedPage: UInt64 = 0
    /// Distinct guest pages the run can touch (nil: a trace, known only as it is read).
    public var touchedPages: UInt64?
    public var total: UInt64 {
        items.reduce(UInt64(0)) { a, b in let (s, o) = a.addingReportingOverflow(b.1); return o ? .max : s }
    }
    public var description: String {
        items.map { "\($0.0) \(ByteCount($0.1))" }.joined(separator: ", ")
    }
}

/// Host memory the model uses per distinct 4 KiB guest page touched, besides the page's data
/// (4 KiB: frames are zeroed, so resident, when first mapped). Measured (docs/model-memory.md):
/// max RSS of `memvirt run --workload strided:4096` (one access per page) at 128 MiB and 1 GiB
/// footprints, and `--workload uniform` at 64 and 256 MiB with every page touched; the RSS
/// difference over the page difference, minus 4,096: native 9-40 bytes, shadow 137-170,
/// nested 17 (its records per frame are up front, counted apart). Rounded up generously: the
/// check is an upper bound, not an estimate.
public enum ModelMemoryCosts {
    public static let overheadPerPage: [PagingKind: UInt64] = [.native: 256, .shadow: 512, .nested: 256]
    /// Fixed cost of a model run: the binary, the Swift runtime, TLB and cache arrays, buffers
    /// (measured: 38 MB of the 128 MiB strided run's 165 MiB RSS is not its pages).
    public static let baseline: UInt64 = 64 << 20
}

/// The model engine's entry point: builds the machine for `config`, runs `spec`, reports.
public enum ModelEngine {
    /// Guest RAM to reserve for `spec` (lazily backed, so generous is free).
    static func guestCapacity(_ spec: WorkloadSpec, pageSize: PageSize) -> UInt64 {
        if case .lackey = spec.pattern { return 64 << 30 }
        let oneG = PageSize.size1G.bytes
        return ((spec.footprint.rawValue + oneG - 1) / oneG) * oneG + 2 * oneG
    }

    /// Builds a machine for `config` (mode, CPU, guest kernel, one empty address space) and
    /// hands it to `body`.
    public static func withMachine<R>(config: ModelConfig, capacity: UInt64, _ body: MachineBody<R>) throws -> R {
        let cpu = ModelCPU(tlb: config.tlb, paging: config.pagingConfig, costs: config.costs)
        cpu.modelLineCache = config.modelLineCache
        switch config.paging {
        case .native:
            let mode = NativePaging(memory: try PhysicalMemory(capacity: capacity, name: "guest-physical"))
            return try body.run(try machine(mode, cpu, config, capacity))
        case .nested:
            let mode = try nestedPaging(config, cpu: cpu, capacity: capacity)
            return try body.run(try machine(mode, cpu, config, capacity))
        case .shadow:
            let mode = try shadowPaging(config, capacity: capacity)
            return try body.run(try machine(mode, cpu, config, capacity))
        }
    }

    /// What running `spec` under `config` will hold in host memory, from the shapes alone:
    /// structures allocated up front (nested paging's host-frame and guest-page records, the
    /// chase cycles, the zipf tables) and, per distinct guest page the run can touch (at most
    /// min(footprint pages, accesses x threads), all with `prefault`), its data (the guest page
    /// size: a fresh frame is zeroed; 2 MiB and 1 GiB frames are zeroed by discarding, which
    /// leaves only the touched 4 KiB parts resident) and the model's state for it.
    public static func memoryNeed(spec: WorkloadSpec, config: ModelConfig) -> ModelMemoryNeed {
        var need = ModelMemoryNeed()
        func add(_ what: String, _ bytes: UInt64) { if bytes > 0 { need.items.append((what, bytes)) } }
        func mul(_ a: UInt64, _ b: UInt64) -> UInt64 { let (p, o) = a.multipliedReportingOverflow(by: b); return o ? .max : p }
        add("baseline", ModelMemoryCosts.baseline)
        let capacity = guestCapacity(spec, pageSize: config.pageSize)
        if config.paging == .nested {
            // HostMemory: one FrameInfo per host frame (guest RAM + 2 GiB for tables, whole GiB),
            // one Page per guest frame; both arrays are filled at creation.
            let hostBytes = ((capacity + (2 << 30)) + PageSize.size1G.offsetMask) & ~PageSize.size1G.offsetMask
            add("nested paging's host frame records", mul(hostBytes / 4096, UInt64(MemoryLayout<HostMemory.FrameInfo>.stride)))
            add("nested paging's guest page records", mul(capacity / 4096, UInt64(MemoryLayout<HostMemory.Page>.stride)))
        }
        let threads = UInt64(spec.threads)
        switch spec.pattern {
        case .chase:
            // Per thread a successor table of UInt32 per 64-byte slot; one more while the
            // current thread's permutation is built.
            add("chase cycles (4 bytes per 64-byte slot per thread)", mul(spec.footprint.rawValue / 64 * 4, threads + 1))
        case .zipf:
            add("zipf tables (8 bytes per page per thread)", mul(spec.footprint.rawValue / 4096 * 8, threads))
        default: break
        }
        need.upFront = need.total
        let pageBytes = config.pageSize.bytes
        let overhead = ModelMemoryCosts.overheadPerPage[config.paging] ?? 1024
        if case .lackey = spec.pattern {
            need.perTouchedPage = 4096 + overhead
            return need
        }
        let accesses = mul(spec.accesses, threads)
        let footprintPages = (spec.footprint.rawValue + pageBytes - 1) / pageBytes
        let pages = config.prefault ? footprintPages : min(footprintPages, accesses)
        need.touchedPages = pages
        // Data per touched page: the page itself for 4 KiB pages; for larger ones, the touched
        // 4 KiB parts (each access touches one; at most the page) backed by 2 MiB huge pages
        // where the host's THP gives them.
        let dataPerPage: UInt64
        if pageBytes == 4096 { dataPerPage = 4096 } else {
            let touchesPerPage = config.prefault ? 1 : max(1, accesses / max(pages, 1))
            dataPerPage = min(pageBytes, mul(touchesPerPage, 2 << 20))
        }
        need.perTouchedPage = dataPerPage + overhead
        add("\(formatGrouped(pages)) touched \(config.pageSize) pages x \(ByteCount(need.perTouchedPage))", mul(pages, need.perTouchedPage))
        return need
    }

    /// The host memory the model may use: `config.memoryLimit` if given, else what the host
    /// has available (MemAvailable; less if this process's cgroup allows less). With its source.
    public static func memoryBudget(_ config: ModelConfig) -> (UInt64, String) {
        if let l = config.memoryLimit { return (l.rawValue, "--memory-limit") }
        return hostAvailableMemory()
    }

    /// MemAvailable from /proc/meminfo, lowered to the cgroup v2 limit minus usage when this
    /// process's cgroup has one; (UInt64.max, ...) when neither can be read.
    public static func hostAvailableMemory() -> (UInt64, String) {
        var best: (UInt64, String) = (.max, "the host's memory (unknown: /proc/meminfo unreadable)")
        if let meminfo = readSmallFile("/proc/meminfo") {
            for line in meminfo.split(separator: "\n") where line.hasPrefix("MemAvailable:") {
                let fields = line.split(separator: " ")
                if fields.count >= 2, let kib = UInt64(fields[1]) { best = (kib * 1024, "the host's available memory (MemAvailable)") }
            }
        }
        // The cgroup: v2 ("0::/path": memory.max, memory.current) or v1 ("N:memory:/path":
        // memory.limit_in_bytes, memory.usage_in_bytes); "max" or a huge v1 value is no limit.
        for line in (readSmallFile("/proc/self/cgroup") ?? "").split(separator: "\n") {
            let f = line.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false)
            guard f.count == 3 else { continue }
            let files: (String, String, String)
            if f[1].isEmpty { files = ("/sys/fs/cgroup" + f[2], "memory.max", "memory.current") }
            else if f[1].split(separator: ",").contains("memory") { files = ("/sys/fs/cgroup/memory" + f[2], "memory.limit_in_bytes", "memory.usage_in_bytes") }
            else { continue }
            guard let limitText = readSmallFile(files.0 + "/" + files.1), let limit = UInt64(limitText.trimmingCharacters()),
                  let usedText = readSmallFile(files.0 + "/" + files.2), let used = UInt64(usedText.trimmingCharacters()) else { continue }
            let free = limit > used ? limit - used : 0
            if free < best.0 { best = (free, "this cgroup's \(files.1) minus \(files.2)") }
        }
        return best
    }

    /// Refuses a run whose `memoryNeed` exceeds `memoryBudget`, with the numbers (issue 17
    /// defect 8: runs used to grow until the host ran out).
    public static func checkMemory(spec: WorkloadSpec, config: ModelConfig) throws(InputError) {
        let need = memoryNeed(spec: spec, config: config)
        let (budget, source) = memoryBudget(config)
        guard need.total > budget else { return }
        throw InputError("the model run needs up to \(ByteCount(need.total)) of host memory (\(need.description)), "
            + "more than \(source): \(ByteCount(budget)); use a smaller footprint or fewer accesses"
            + (config.memoryLimit == nil ? "" : ", or raise --memory-limit"))
    }

    /// Nested paging for `config` (with a host memory limit and swap when one is set).
    static func nestedPaging(_ config: ModelConfig, cpu: ModelCPU, capacity: UInt64) throws -> NestedPaging {
        try NestedPaging(
            cpu: cpu, guestCapacity: capacity, hostPageSize: config.hostPageSize, eptLevels: config.hostLevels,
            hostMemory: try config.hostLimit.map { limit throws(InputError) in
                try HostMemory(capacity: capacity + (2 << 30), limit: limit, swapDevice: config.swapDevice)
            })
    }

    static func shadowPaging(_ config: ModelConfig, capacity: UInt64) throws -> ShadowPaging {
        try ShadowPaging(guestCapacity: capacity, hostPageSize: config.hostPageSize, options: config.shadow)
    }

    static func machine<M: PagingMode>(_ mode: M, _ cpu: ModelCPU, _ config: ModelConfig, _ capacity: UInt64) throws -> Machine<M> {
        let kernel = SimulatedGuestKernel(memory: mode.guestMemory, capacity: capacity, paging: config.pagingConfig)
        let space = try kernel.createAddressSpace()
        let m = Machine(mode: mode, cpu: cpu, kernel: kernel, space: space)
        m.switchAddressSpace(to: space)
        return m
    }

    /// Runs the fork/exec/exit loop and reports it in the run shape.
    public static func runProcessChurn(_ spec: ProcessChurnSpec, config: ModelConfig) throws -> RunResult {
        let clock = WallClock()
        return try withMachine(config: config, capacity: 8 << 30, MachineBody { m in
            try m.runProcessChurn(spec)
            let counters = m.finish()
            var workload = WorkloadSpec(pattern: .uniform, footprint: ByteCount(UInt64(spec.parentPages) * 4096), accesses: 0, seed: spec.seed)
            workload.accesses = counters[.accesses]
            return RunResult(
                engine: "model", paging: m.mode.name, pageSize: spec.pageSize, workload: workload, counters: counters,
                cycles: m.cpu.ledger.total, cycleBreakdown: m.cpu.ledger.breakdown, wallSeconds: clock.seconds,
                extra: [("workload_kind", "process-churn"), ("forks", .uint(m.kernel.forks)), ("exits", .uint(m.kernel.exits)),
                        ("cow_copies", .uint(m.kernel.copyOnWriteCopies)), ("checksum", .string("0x" + String(m.checksum, radix: 16)))])
        })
    }

    public static func run(
        spec: WorkloadSpec, config: ModelConfig, progress: ((UInt64, UInt64) -> Void)? = nil
    ) throws -> RunResult {
        try spec.validate()
        try checkMemory(spec: spec, config: config)
        let capacity = guestCapacity(spec, pageSize: config.pageSize)
        switch config.paging {
        case .native:
            let memory = try PhysicalMemory(capacity: capacity, name: "guest-physical")
            let mode = NativePaging(memory: memory)
            return try run(spec: spec, config: config, mode: mode, capacity: capacity, progress: progress)
        case .nested:
            let cpu = ModelCPU(tlb: config.tlb, paging: config.pagingConfig, costs: config.costs)
            let mode = try nestedPaging(config, cpu: cpu, capacity: capacity)
            return try run(spec: spec, config: config, mode: mode, cpu: cpu, capacity: capacity, progress: progress)
        case .shadow:
            let mode = try shadowPaging(config, capacity: capacity)
            return try run(spec: spec, config: config, mode: mode, capacity: capacity, progress: progress)
        }
    }

    /// Runs `spec` over an already-built `mode`.
    public static func run<Mode: PagingMode>(
        spec: WorkloadSpec, config: ModelConfig, mode: Mode, cpu given: ModelCPU? = nil, capacity: UInt64,
        progress: ((UInt64, UInt64) -> Void)? = nil
    ) throws -> RunResult {
        let clock = WallClock()
        var loopClock = WallClock()
        let cpu = given ?? ModelCPU(tlb: config.tlb, paging: config.pagingConfig, costs: config.costs)
        cpu.modelLineCache = config.modelLineCache
        let kernel = SimulatedGuestKernel(memory: mode.guestMemory, capacity: capacity, paging: config.pagingConfig)
        let space = try kernel.createAddressSpace()
        mode.switchAddressSpace(to: space, cpu: cpu)
        let machine = Machine(mode: mode, cpu: cpu, kernel: kernel, space: space, computePerAccess: spec.computePerAccess)
        // --accesses is per thread: the product must be a count (issue 17 defect 4: it trapped).
        let product = spec.accesses.multipliedReportingOverflow(by: UInt64(spec.threads))
        var total = product.partialValue
        if product.overflow {
            throw InputError("accesses \(formatGrouped(spec.accesses)) per thread x \(spec.threads) threads is more than 2^64 - 1 accesses in all")
        }
        var traceReader: LackeyTraceReader? = nil
        if case .lackey(let path) = spec.pattern {
            // A traced process: its whole user half (and the kernel half, for the vsyscall page)
            // is one demand-zero area of 4 KiB pages.
            let userTop: UInt64 = 1 << UInt64(config.pagingConfig.virtualAddressBits - 1)
            try kernel.map(VirtualMemoryArea(start: 4096, end: userTop, pageSize: .size4K, writable: true, executable: true), in: space)
            try kernel.map(VirtualMemoryArea(start: 0 &- userTop, end: 0 &- 4096, pageSize: .size4K, writable: true, executable: true), in: space)
            let reader = try LackeyTraceReader(path: path)
            traceReader = reader
            // A trace's distinct pages are known only as it is read: the budget is checked as
            // it goes (every 2^16 accesses), against the same limit as the up-front check.
            let need = memoryNeed(spec: spec, config: config)
            let (budget, budgetSource) = memoryBudget(config)
            var source = TraceAccesses(reader, budget: TraceBudget(
                upFront: need.upFront, perPage: need.perTouchedPage, limit: budget, limitSource: budgetSource,
                touchedPages: { machine.demandZero }))
            total = 0
            loopClock = WallClock()
            try machine.run(&source, progress: progress.map { p in { n in p(n, 0) } })
            // An empty, header-only or CR-only file is not a trace of a program: say so rather
            // than report a run of 0 accesses.
            guard reader.linesRead > 0 else {
                throw InputError("\(path): no accesses in \(reader.lineNumber) line\(reader.lineNumber == 1 ? "" : "s"): not a lackey trace (valgrind --tool=lackey --trace-mem=yes; see scripts/make-lackey-trace)")
            }
        } else {
            let area = VirtualMemoryArea(
                start: spec.base.rawValue, end: spec.base.rawValue + roundUp(spec.footprint.rawValue, config.pageSize),
                pageSize: config.pageSize, writable: true, fileBacked: config.fileBacked)
            try kernel.map(area, in: space)
            if config.prefault { try prefault(machine, area: area) }
            if case .gups = spec.pattern { machine.readModifyWrite = true }
            let streams = try (0..<spec.threads).map { t throws(InputError) in
                GeneratedAccesses(try AccessGenerator(spec: spec, thread: t), count: spec.accesses)
            }
            loopClock = WallClock()
            if streams.count == 1 {
                var source = streams[0]
                try machine.run(&source, progress: progress.map { p in { n in p(n, total) } })
            } else {
                var source = InterleavedAccesses(streams)
                try machine.run(&source, progress: progress.map { p in { n in p(n, total) } })
            }
        }
        let loopSeconds = loopClock.seconds
        var memorySum: UInt64?
        if case .lackey = spec.pattern {} else if config.memoryChecksum {
            memorySum = machine.memoryChecksum(base: spec.base.rawValue, bytes: spec.footprint.rawValue)
        }
        let memoryChecksum: JSONValue = memorySum.map { .string("0x" + String($0, radix: 16)) } ?? .null
        let maxWalkRefs = (mode as? NestedPaging)?.maxWalkRefs ?? Int(machine.maxWalkRefs)
        let counters = machine.finish()
        // A trace's run reports the trace's own figures, not the flags' defaults: its accesses,
        // its footprint (distinct 4 KiB pages touched: each is one demand fault of the traced
        // area), its write ratio; a trace has no seed and one thread.
        var workload = spec
        if traceReader != nil {
            workload.accesses = counters[.accesses]
            workload.footprint = ByteCount(counters[.guestPageFaults] * 4096)
            workload.writeRatio = counters[.accesses] == 0 ? 0 : Double(counters[.writes]) / Double(counters[.accesses])
            workload.threads = 1
        }
        var result = RunResult(
            engine: "model", paging: mode.name, pageSize: config.pageSize, workload: workload, counters: counters,
            cycles: cpu.ledger.total, cycleBreakdown: cpu.ledger.breakdown, wallSeconds: clock.seconds,
            extra: [
                ("checksum", .string("0x" + String(machine.checksum, radix: 16))),
                ("read_sum", .uint(machine.checksum)),
                ("memory_checksum", memoryChecksum),
                ("cost_model", .string(config.costs.name)),
                ("max_walk_refs", .int(Int64(maxWalkRefs))),
                ("loop_seconds", .double(loopSeconds)),
                ("simulated_seconds", .double(cpu.ledger.total / (config.costs.clockGHz * 1e9))),
                ("walk_refs_by_where_hit", .object([
                    ("l1d", .uint(cpu.walkRefsSettled.l1)), ("l2", .uint(cpu.walkRefsSettled.l2)),
                    ("llc", .uint(cpu.walkRefsSettled.llc)), ("dram", .uint(cpu.walkRefsSettled.dram)),
                ])),
            ])
        result.facts = RunFacts(readSum: machine.checksum, memoryChecksum: memorySum, maxWalkRefs: maxWalkRefs, loopSeconds: loopSeconds)
        return result
    }

    /// Touches every page of `area` once (writes), then resets counters and the ledger.
    static func prefault<Mode>(_ machine: Machine<Mode>, area: VirtualMemoryArea) throws {
        var va = area.start
        while va < area.end {
            try machine.step(Access(address: GuestVirtualAddress(va), kind: .write))
            va += area.pageSize.bytes
        }
        machine.resetStatistics()
    }

    static func roundUp(_ v: UInt64, _ size: PageSize) -> UInt64 { (v + size.offsetMask) & ~size.offsetMask }
}

extension Machine {
    /// Sum over the words w[k] of [base, base + bytes) of w[k] * (2k + 1) (mod 2^64), read
    /// through the guest's tables and the hypervisor's map without touching TLBs or counters;
    /// an unmapped page reads as zero (the KVM guest runtime's memory_checksum).
    public func memoryChecksum(base: UInt64, bytes: UInt64) -> UInt64 {
        var sum: UInt64 = 0
        var page = base
        while page < base + bytes {
            if let leaf = kernel.lookupLeaf(page, space: space) {
                let gpa = leaf.entry.pageBase(leaf.size) | (page & leaf.size.offsetMask)
                if let hpa = mode.dataAddress(ofGuestPhysical: gpa) {
                    var k = (page - base) >> 3
                    for off in stride(from: UInt64(0), to: 4096, by: 8) {
                        sum &+= GuestDataRules.checksumTerm(data.read64(hpa + off), index: k)
                        k &+= 1
                    }
                }
            }
            page += 4096
        }
        return sum
    }

    /// Zeroes every counter and the ledger (after a warm-up).
    public func resetStatistics() {
        accesses = 0; writes = 0; fetches = 0; l1Hits = 0; l2Hits = 0; misses = 0; walks = 0; walkRefs = 0
        faultedWalkRefs = 0; cowFaults = 0; majorFaults = 0; walkCacheHits = 0; walkRetries = 0; guestFaults = 0; demandZero = 0; chargedAccesses = 0; chargedL2Hits = 0; maxWalkRefs = 0
        // What the mode counted on its own so far (EPT violations, nested references, shadow
        // faults) is folded in now and dropped with the rest, not carried into the measured run.
        mode.settle(cpu: cpu)
        (mode as? NestedPaging)?.maxWalkRefs = 0
        cpu.resetStatistics()
    }
}

/// Monotonic wall time since creation.
public struct WallClock: Sendable {
    let start: UInt64
    public init() { start = WallClock.now() }
    public var seconds: Double { Double(WallClock.now() - start) / 1e9 }
    public static func now() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }
}

/// The text of a small file (procfs, sysfs), nil when it cannot be read.
func readSmallFile(_ path: String) -> String? {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var out: [UInt8] = []
    var buf = [UInt8](repeating: 0, count: 4096)
    while out.count < 1 << 20 {
        let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, 4096) }
        if n <= 0 { break }
        out += buf[0..<n]
    }
    return String(decoding: out, as: UTF8.self)
}

extension String {
    func trimmingCharacters() -> String {
        var s = Substring(self)
        while let c = s.last, c == "\n" || c == " " { s = s.dropLast() }
        return String(s)
    }
}
