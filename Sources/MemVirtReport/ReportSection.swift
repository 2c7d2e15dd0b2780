import Foundation
import MemVirtCore

/// One reproduction's part of a report: what the HTML page, the CSV files and `memvirt
/// report` work from. Built from an `ExperimentReport` or read back from a saved report.json
/// (whose reproduction objects carry "title", "tables", "notes", "headline" and "figures"
/// beside the reproduction's own keys).
public struct ReportSection: Sendable {
    public var name: String
    /// "model" or "kvm" (the same name can run on both engines).
    public var engine: String
    public var title: String
    public var headline: Headline?
    public var figures: [Figure]
    public var tables: [TextTable]
    public var notes: [String]
    /// How many runs were merged into this section.
    public var runs: Int
    /// Where the section came from (files), for the page's footer.
    public var sources: [String]

    public init(name: String, engine: String = "model", title: String, headline: Headline? = nil, figures: [Figure] = [],
                tables: [TextTable] = [], notes: [String] = [], runs: Int = 1, sources: [String] = []) {
        self.name = name
        self.engine = engine
        self.title = title
        self.headline = headline
        self.figures = figures
        self.tables = tables
        self.notes = notes
        self.runs = runs
        self.sources = sources
    }

    /// Anchor and CSV folder name: the reproduction's name, "-kvm" for the KVM engine's.
    public var id: String { engine == "model" ? slug(name) : slug(name + "-" + engine) }

    /// The keys a saved reproduction object gains so that a report can be rebuilt from it.
    public static func savedKeys(title: String, tables: [TextTable], notes: [String], headline: Headline?, figures: [Figure]) -> [(String, JSONValue)] {
        [
            ("title", .string(title)),
            ("tables", .array(tables.map { t in
                .object([("title", t.title.map { .string($0) } ?? .null), ("header", .array(t.header.map { .string($0) })),
                         ("rows", .array(t.rows.map { .array($0.map { .string($0) }) }))])
            })),
            ("notes", .array(notes.map { .string($0) })),
            ("headline", headline.map { JSONValue.encoding($0) } ?? .null),
            ("figures", .array(figures.map { JSONValue.encoding($0) })),
        ]
    }

    /// Reads one saved reproduction object. `derive` supplies figures and a headline for
    /// objects saved before reports carried them (from the reproduction's own keys).
    /// Problems that leave the rest usable (a figure that does not decode) go to `warnings`.
    public static func read(_ json: JSONValue, source: String, warnings: inout [String],
                            derive: ((String, JSONValue) -> ([Figure], Headline?))? = nil) throws -> ReportSection {
        guard json.asObject != nil else { throw ReportInputError("not a JSON object") }
        guard let name = json["name"]?.asString, !name.isEmpty else {
            throw ReportInputError("no \"name\" (is this a memvirt reproduce report.json?)")
        }
        var s = ReportSection(name: name, engine: json["engine"]?.asString ?? "model", title: json["title"]?.asString ?? name, sources: [source])
        for (i, t) in (json["tables"]?.asArray ?? []).enumerated() {
            guard let header = t["header"]?.asArray?.compactMap(\.asString), let rows = t["rows"]?.asArray else {
                warnings.append("\(source): \(name): table \(i + 1) has no header or rows; left out")
                continue
            }
            var table = TextTable(title: t["title"]?.asString, header: header)
            for r in rows { table.add((r.asArray ?? []).map { $0.asString ?? $0.rendered() }) }
            s.tables.append(table)
        }
        s.notes = (json["notes"]?.asArray ?? []).compactMap(\.asString)
        if let h = json["headline"], h != .null {
            do { s.headline = try h.decoded(as: Headline.self) } catch { warnings.append("\(source): \(name): headline unreadable (\(error)); left out") }
        }
        for (i, f) in (json["figures"]?.asArray ?? []).enumerated() {
            do { s.figures.append(try f.decoded(as: Figure.self)) } catch {
                warnings.append("\(source): \(name): figure \(i + 1) unreadable (\(error)); left out")
            }
        }
        if json["figures"] == nil, let derive {
            let (figs, h) = derive(name, json)
            s.figures = figs
            if s.headline == nil { s.headline = h }
        }
        return s
    }
}

/// A bad input file or object, named with where it is.
public struct ReportInputError: Error, CustomStringConvertible {
    public var description: String
    public init(_ d: String) { description = d }
}

/// Lowercase letters, digits and '-' (file names and anchors).
public func slug(_ s: String) -> String {
    var out = ""
    for c in s.lowercased().unicodeScalars {
        if (c >= "a" && c <= "z") || (c >= "0" && c <= "9") { out.unicodeScalars.append(c) } else if !out.hasSuffix("-") && !out.isEmpty { out += "-" }
    }
    while out.hasSuffix("-") { out.removeLast() }
    return out.isEmpty ? "x" : out
}
