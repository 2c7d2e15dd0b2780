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
