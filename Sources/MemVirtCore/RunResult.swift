/// The result of one run, in the shape both engines share. `--json` prints `json`.
///
/// Schema `memvirt.run/1`: `{schema, engine, paging, page_size, workload{...},
/// counters{name: count}, cycles, cycle_breakdown{category: cycles}, wall_seconds, ...extra}`.
/// The model engine fills `cycles`; the KVM engine reports measured time and its own `extra`.
public struct RunResult: Sendable {
    public static let schema = "memvirt.run/1"
    public var engine: String
    public var paging: String
    public var pageSize: PageSize
    public var workload: WorkloadSpec
    public var counters: CounterSet
    /// Simulated cycles (model engine), nil for measured runs.
    public var cycles: Double?
    /// Simulated cycles by category, in the order the ledger declares them.
    public var cycleBreakdown: [(String, Double)]
    public var wallSeconds: Double
    /// Engine-specific extra fields, appended after the shared ones (for JSON and text).
    public var extra: [(String, JSONValue)]
    /// What callers read back from a run, as typed values (the same figures are in `extra`).
    public var facts = RunFacts()

    public init(
        engine: String, paging: String, pageSize: PageSize, workload: WorkloadSpec, counters: CounterSet,
        cycles: Double?, cycleBreakdown: [(String, Double)] = [], wallSeconds: Double, extra: [(String, JSONValue)] = []
    ) {
        self.engine = engine
        self.paging = paging
        self.pageSize = pageSize
        self.workload = workload
        self.counters = counters
        self.cycles = cycles
        self.cycleBreakdown = cycleBreakdown
        self.wallSeconds = wallSeconds
        self.extra = extra
    }

    public var json: JSONValue {
        var kv: [(String, JSONValue)] = [
            ("schema", .string(Self.schema)), ("engine", .string(engine)), ("paging", .string(paging)),
            ("page_size", .string(pageSize.description)), ("workload", workload.json), ("counters", counters.json),
        ]
        kv.append(("cycles", cycles.map { .double($0) } ?? .null))
        kv.append(("cycle_breakdown", .object(cycleBreakdown.map { ($0.0, .double($0.1)) })))
        kv.append(("wall_seconds", .double(wallSeconds)))
        return .object(kv + extra)
    }
}

/// Figures of a run that other code reads back: typed, so nobody looks them up by string.
public struct RunFacts: Sendable, Hashable {
    /// Sum of the values the workload read (the SplitMix64 oracle's `read_sum`).
    public var readSum: UInt64?
    /// FNV-1a of the workload's memory at the end (when asked for).
    public var memoryChecksum: UInt64?
    /// The longest page walk counted, in memory references.
    public var maxWalkRefs: Int?
    /// Wall time of the access loop alone (without set-up and pre-faulting), seconds.
    public var loopSeconds: Double?
    public init(readSum: UInt64? = nil, memoryChecksum: UInt64? = nil, maxWalkRefs: Int? = nil, loopSeconds: Double? = nil) {
        self.readSum = readSum
        self.memoryChecksum = memoryChecksum
        self.maxWalkRefs = maxWalkRefs
        self.loopSeconds = loopSeconds
    }
}
