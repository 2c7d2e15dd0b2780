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
    /// The series it is about, with the reference points it reproduces (charts in the HTML).
    public var figures: [Figure]
    /// The finding in one sentence, with its number beside the seed's or the target's.
    public var headline: Headline?

    /// `figures` and `headline` default to those `ReproductionFigures` builds from `json`
    /// (the rows the reproduction already computed).
    public init(name: String, title: String, tables: [TextTable], notes: [String] = [], json: JSONValue,
                figures: [Figure]? = nil, headline: Headline? = nil) {
        self.name = name
        self.title = title
        self.tables = tables
        self.notes = notes
        self.json = json
        if let figures {
            self.figures = figures
            self.headline = headline
        } else {
            let (f, h) = ReproductionFigures.derive(name: name, json: json)
            self.figures = f
            self.headline = headline ?? h
        }
    }

    /// "model" or "kvm", from the JSON's "engine" key; for reproductions whose JSON has none,
    /// what they run on (`validate` runs both engines, the QEMU comparison runs on KVM).
    public var engine: String { json["engine"]?.asString ?? Self.implicitEngine(name) }

    /// The engine of a reproduction whose JSON names none.
    public static func implicitEngine(_ name: String) -> String {
        ["validate": "model+kvm", "migration-vs-qemu": "kvm"][name] ?? "model"
    }

    /// `json` with what rebuilds the report beside it ("title", "tables", "notes",
    /// "headline", "figures"): what report.json stores, and `memvirt report` reads back.
    public var savedJSON: JSONValue {
        guard case .object(var kv) = json else { return json }
        if !kv.contains(where: { $0.0 == "engine" }) && engine != "model" { kv.append(("engine", .string(engine))) }
        for (k, v) in ReportSection.savedKeys(title: title, tables: tables, notes: notes, headline: headline, figures: figures) where !kv.contains(where: { $0.0 == k }) {
            kv.append((k, v))
        }
        return .object(kv)
    }

    /// The report's part for the HTML page and the CSV files.
    public var section: ReportSection {
        ReportSection(name: name, engine: engine, title: title, headline: headline, figures: figures, tables: tables, notes: notes)
    }

    public var text: String {
        var out = "== \(name): \(title)\n\n"
        if let h = headline { out += h.text + "\n\n" }
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
    /// What a reproduction runs on.
    public enum Engine: String, Sendable {
        /// The simulator alone: runs anywhere.
        case model
        /// Real VMs on /dev/kvm (`reproduce NAME --engine kvm`).
        case kvm
        /// Both engines side by side (needs /dev/kvm; runs with the KVM ones).
        case both
    }

    /// Every reproduction, in the order `memvirt reproduce` runs them: the one registry, with
    /// the engine each needs and the seed area (its folder in Sources/MemVirtExperiments).
    public static let registry: [(type: any Experiment.Type, engine: Engine, area: String)] = [
        (TLBReach.self, .model, "Translation"),
        (TwoDimensionalWalk.self, .model, "Translation"),
        (ShadowVersusNested.self, .model, "Translation"),
        (FaultCost.self, .model, "Translation"),
        (AsyncPageFaults.self, .model, "HostMemory"),
        (AsyncPageFaultSweep.self, .model, "HostMemory"),
        (KSMReproduction.self, .model, "HostMemory"),
        (LogDirty.self, .model, "Migration"),
        (PageGroups.self, .model, "Migration"),
        (MigrationReproduction.self, .model, "Migration"),
        (KVMAsyncPageFaults.self, .kvm, "HostMemory"),
        (KVMAsyncPageFaultsSweep.self, .kvm, "HostMemory"),
        (KVMKSM.self, .kvm, "HostMemory"),
        (KVMMigration.self, .kvm, "Migration"),
        (QEMUComparison.self, .kvm, "Migration"),
        (Validation.self, .both, "Validation"),
        (CrossEngineValidation.self, .both, "Validation"),
    ]

    static func on(_ engine: Engine) -> [any Experiment.Type] { registry.filter { $0.engine == engine }.map(\.type) }

    /// The model reproductions.
    public static let all: [any Experiment.Type] = on(.model)
    /// The KVM engine's reproductions.
    public static let kvm: [any Experiment.Type] = on(.kvm)
    /// The reproductions that need both engines.
    public static let crossEngine: [any Experiment.Type] = on(.both)

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
