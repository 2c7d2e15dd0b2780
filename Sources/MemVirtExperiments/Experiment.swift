import MemVirtCore
import MemVirtModel
import MemVirtReport

/// What every reproduction returns: tables for people, one JSON object for programs.
public struct ExperimentReport: Sendable {
    public var name: String
    public var title: String
    public var tables: [TextTable]
    /// Claims from the sources beside what was measured, one line each.
    public var notes: [String]
    public var json: JSONValue

    public init(name: String, title: String, tables: [TextTable], notes: [String] = [], json: JSONValue) {
        self.name = name
        self.title = title
        self.tables = tables
        self.notes = notes
        self.json = json
    }

    public var text: String {
        var out = "== \(name): \(title)\n\n"
        for t in tables { out += t.rendered + "\n" }
        for n in notes { out += "- " + n + "\n" }
        return out
    }
}

/// A seed reproduction: config in, report out, never printing.
public protocol Experiment: Sendable {
    static var name: String { get }
    static var summary: String { get }
    /// `quick`: a smaller run for tests.
    init(quick: Bool)
    func run(progress: @Sendable (String) -> Void) throws -> ExperimentReport
}

/// Every reproduction that exists, in the order `memvirt reproduce` runs them.
public enum Reproductions {
    public static let all: [any Experiment.Type] = [TLBReach.self, TwoDimensionalWalk.self, ShadowVersusNested.self, FaultCost.self] + hostMemory + migration

    public static var names: [String] { all.map { $0.name } }

    public static func named(_ name: String) -> (any Experiment.Type)? { all.first { $0.name == name } }

    /// Runs one reproduction.
    public static func run(_ type: any Experiment.Type, quick: Bool, progress: @Sendable (String) -> Void) throws -> ExperimentReport {
        try runTyped(type, quick: quick, progress: progress)
    }

    static func runTyped<E: Experiment>(_ type: E.Type, quick: Bool, progress: @Sendable (String) -> Void) throws -> ExperimentReport {
        try E(quick: quick).run(progress: progress)
    }
}

/// The machine that the reproductions' "this host" rows describe: the model rows set beside a
/// KVM measurement on this host (fault-cost's pvm-shadow row, KSM's and async PF's model
/// estimates). `memvirt reproduce --profile P` binds it for the run; the default is the
/// built-in pvm-shadow profile (a calibration of kvm_pvm on one machine, 2026-11-22).
public struct ReproductionMachine: Sendable {
    /// The profile's name, shown in the rows and reports.
    public var name: String
    public var costs: CostModel
    public var tlb: TLBConfig
    public var host: HostCosts
    public var scheduling: GuestSchedulingCosts
    public var dirty: DirtyTrackingCosts

    public init(name: String, costs: CostModel, tlb: TLBConfig, host: HostCosts, scheduling: GuestSchedulingCosts, dirty: DirtyTrackingCosts) {
        self.name = name
        self.costs = costs
        self.tlb = tlb
        self.host = host
        self.scheduling = scheduling
        self.dirty = dirty
    }

    /// The built-in pvm-shadow profile (the test `ProfileTests` keeps the two equal).
    public static let pvmShadow: ReproductionMachine = {
        var s = GuestSchedulingCosts()
        // 100-190 us measured on kvm_pvm (docs/references.md, async page faults).
        s.pageReadyDelay = 150_000
        return ReproductionMachine(name: "pvm-shadow", costs: .pvmShadow, tlb: .goldenCove, host: HostCosts(), scheduling: s, dirty: DirtyTrackingCosts())
    }()
}

extension Reproductions {
    /// This host's machine for the reproductions run in this scope.
    @TaskLocal public static var thisHost: ReproductionMachine = .pvmShadow
}
