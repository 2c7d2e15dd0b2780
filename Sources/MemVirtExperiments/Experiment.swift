import MemVirtCore
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
