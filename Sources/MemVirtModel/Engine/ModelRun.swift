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
    var kernel: GuestKernel { get }
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
    public init(_ reader: LackeyTraceReader) { self.reader = reader }
    public mutating func nextAccess() throws(InputError) -> Access? { try reader.next() }
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
        let kernel = GuestKernel(memory: mode.guestMemory, capacity: capacity, paging: config.pagingConfig)
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
        let kernel = GuestKernel(memory: mode.guestMemory, capacity: capacity, paging: config.pagingConfig)
        let space = try kernel.createAddressSpace()
        mode.switchAddressSpace(to: space, cpu: cpu)
        let machine = Machine(mode: mode, cpu: cpu, kernel: kernel, space: space, computePerAccess: spec.computePerAccess)
        var total = spec.accesses * UInt64(spec.threads)
        if case .lackey(let path) = spec.pattern {
            // A traced process: its whole user half (and the kernel half, for the vsyscall page)
            // is one demand-zero area of 4 KiB pages.
            let userTop: UInt64 = 1 << UInt64(config.pagingConfig.virtualAddressBits - 1)
            try kernel.map(VirtualMemoryArea(start: 4096, end: userTop, pageSize: .size4K, writable: true, executable: true), in: space)
            try kernel.map(VirtualMemoryArea(start: 0 &- userTop, end: 0 &- 4096, pageSize: .size4K, writable: true, executable: true), in: space)
            var source = TraceAccesses(try LackeyTraceReader(path: path))
            total = 0
            loopClock = WallClock()
            try machine.run(&source, progress: progress.map { p in { n in p(n, 0) } })
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
        var memoryChecksum: JSONValue = .null
        if case .lackey = spec.pattern {} else if config.memoryChecksum {
            memoryChecksum = .string("0x" + String(machine.memoryChecksum(base: spec.base.rawValue, bytes: spec.footprint.rawValue), radix: 16))
        }
        let counters = machine.finish()
        return RunResult(
            engine: "model", paging: mode.name, pageSize: config.pageSize, workload: spec, counters: counters,
            cycles: cpu.ledger.total, cycleBreakdown: cpu.ledger.breakdown, wallSeconds: clock.seconds,
            extra: [
                ("checksum", .string("0x" + String(machine.checksum, radix: 16))),
                ("read_sum", .uint(machine.checksum)),
                ("memory_checksum", memoryChecksum),
                ("cost_model", .string(config.costs.name)),
                ("max_walk_refs", .int(Int64((mode as? NestedPaging)?.maxWalkRefs ?? Int(machine.maxWalkRefs)))),
                ("loop_seconds", .double(loopSeconds)),
                ("simulated_seconds", .double(cpu.ledger.total / (config.costs.clockGHz * 1e9))),
                ("walk_refs_by_where_hit", .object([
                    ("l1d", .uint(cpu.walkRefsSettled.l1)), ("l2", .uint(cpu.walkRefsSettled.l2)),
                    ("llc", .uint(cpu.walkRefsSettled.llc)), ("dram", .uint(cpu.walkRefsSettled.dram)),
                ])),
            ])
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
