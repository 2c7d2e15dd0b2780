import Foundation
import MemVirtCore
import TOMLKit

/// The scenario keys a sweep may set in `[base]` and vary in `[axes]`: the keys `memvirt run
/// --config` reads (Sources/memvirt/WorkloadOptions.swift and RunCommand.swift). When the
/// strict library `Scenario` type lands, this list is replaced by its list of keys.
public enum ScenarioKeys {
    /// Section -> keys, in the order a scenario file is written.
    public static let sections: [(String, [String])] = [
        ("workload", ["pattern", "footprint", "accesses", "write_ratio", "seed", "threads", "compute_per_access"]),
        ("platform", ["paging", "page_size", "host_page_size", "costs", "host_limit", "swap_device"]),
    ]
    /// Every key as `section.key`.
    public static var dotted: [String] { sections.flatMap { s, keys in keys.map { "\(s).\($0)" } } }
    public static func allowed(_ section: String) -> [String]? { sections.first { $0.0 == section }?.1 }
}

/// A scalar a scenario key takes: what TOML writes as a string, integer, float or boolean.
public enum ScenarioValue: Sendable, Hashable, CustomStringConvertible {
    case string(String)
    case int(Int)
    case double(Double)
    case bool(Bool)

    /// As TOML writes it (strings quoted and escaped).
    public var toml: String {
        switch self {
        case .string(let s):
            var out = "\""
            for u in s.unicodeScalars {
                switch u {
                case "\"": out += "\\\""
                case "\\": out += "\\\\"
                case "\n": out += "\\n"
                case "\t": out += "\\t"
                case "\r": out += "\\r"
                default:
                    if u.value < 0x20 || u.value == 0x7F {
                        let h = String(u.value, radix: 16, uppercase: true)
                        out += "\\u" + String(repeating: "0", count: 4 - h.count) + h
                    } else { out.unicodeScalars.append(u) }
                }
            }
            return out + "\""
        case .int(let i): return String(i)
        case .double(let d): return d.isFinite ? "\(d)" : (d.isNaN ? "nan" : (d > 0 ? "inf" : "-inf"))
        case .bool(let b): return b ? "true" : "false"
        }
    }

    /// As people read it (CSV cells, table cells, legend entries): strings without quotes.
    public var description: String {
        if case .string(let s) = self { return s }
        return toml
    }

    public var json: JSONValue {
        switch self {
        case .string(let s): return .string(s)
        case .int(let i): return .int(Int64(i))
        case .double(let d): return .double(d)
        case .bool(let b): return .bool(b)
        }
    }

    /// A number to put on a chart's x axis: numbers, and sizes written with units ("64MiB",
    /// "2M" page sizes as bytes). Nil for words ("nested").
    public var numeric: Double? {
        switch self {
        case .int(let i): return Double(i)
        case .double(let d): return d
        case .bool: return nil
        case .string(let s):
            if let p = PageSize(parsing: s) { return Double(p.bytes) }
            if let b = try? ByteCount(parsing: s) { return Double(b.rawValue) }
            return nil
        }
    }
}

/// One varied key and its values, in the order the file lists them.
public struct SweepAxis: Sendable, Hashable {
    /// `section.key`, e.g. `workload.footprint`.
    public var key: String
    public var values: [ScenarioValue]
}

/// A parsed, checked sweep file:
///
///     [base]                       # a scenario, the same schema as `memvirt run --config`
///     workload.pattern = "uniform"
///     workload.accesses = "200K"
///     [axes]                       # any scenario key, a list of values
///     workload.footprint = ["1MiB", "16MiB"]
///     platform.paging = ["native", "shadow", "nested"]
///     [[exclude]]                  # optional: combinations to leave out (a list matches any of its values)
///     platform.paging = "native"
///     workload.footprint = "16MiB"
///
/// `[base]` may also be written as `[base.workload]` / `[base.platform]` tables.
public struct SweepFile: Sendable {
    public var path: String
    /// The base scenario: `section.key` -> value.
    public var base: [String: ScenarioValue]
    /// Sorted by key: the canonical order of the plan (see `plan()`).
    public var axes: [SweepAxis]
    /// Each exclusion: axis key -> the values it matches.
    public var excludes: [[String: [ScenarioValue]]]

    public static let topLevelKeys = ["base", "axes", "exclude"]

    /// Reads and checks `path`.
    public static func load(path: String) throws -> SweepFile {
        guard let data = FileManager.default.contents(atPath: path), let text = String(data: data, encoding: .utf8) else {
            throw InputError("cannot read sweep file '\(path)'")
        }
        return try SweepFile(text: text, path: path)
    }

    public init(text: String, path: String) throws {
        self.path = path
        let lines = KeyLines(text: text)
        let root: TOMLTable
        do {
            root = try TOMLTable(string: text)
        } catch let e as TOMLParseError {
            throw InputError("\(path):\(e.source.begin.line):\(e.source.begin.column): \(e.description)")
        } catch {
            throw InputError("\(path): \(error)")
        }
        func at(_ dotted: String, _ occurrence: Int = 0) -> String {
            if let l = lines.line(of: dotted, occurrence: occurrence) { return "\(path):\(l)" }
            return path
        }
        /// In the `n`-th [[exclude]] table.
        func atExclude(_ dotted: String, _ n: Int) -> String {
            let inTable = "exclude#\(n)" + dotted.dropFirst("exclude".count)
            if let l = lines.line(of: inTable) { return "\(path):\(l)" }
            return at("exclude", n)
        }
        for key in root.keys where !Self.topLevelKeys.contains(key) {
            throw InputError("\(at(key)): unknown key '\(key)' (allowed: \(Self.topLevelKeys.joined(separator: ", ")))")
        }
        // [base]
        var base: [String: ScenarioValue] = [:]
        if let b = root["base"] {
            guard let bt = b.table else { throw InputError("\(at("base")): 'base' must be a table of scenario sections") }
            for (k, v) in try Self.scenarioEntries(bt, prefix: "base", at: at) {
                base[k] = try Self.scalar(v, "base.\(k)", at: at)
            }
        }
        // [axes]
        var axes: [SweepAxis] = []
        if let a = root["axes"] {
            guard let at_ = a.table else { throw InputError("\(at("axes")): 'axes' must be a table of scenario keys") }
            for (k, v) in try Self.scenarioEntries(at_, prefix: "axes", at: at) {
                guard let arr = v.array else {
                    throw InputError("\(at("axes.\(k)")): axis '\(k)' must be a list of values, e.g. \(k) = [\(v.debugDescription), ...]")
                }
                guard !arr.isEmpty else { throw InputError("\(at("axes.\(k)")): axis '\(k)' has no values") }
                var values: [ScenarioValue] = []
                for e in arr {
                    let sv = try Self.scalar(e, "axes.\(k)", at: at)
                    guard !values.contains(sv) else {
                        throw InputError("\(at("axes.\(k)")): axis '\(k)' lists \(sv.toml) twice")
                    }
                    values.append(sv)
                }
                axes.append(SweepAxis(key: k, values: values))
            }
        }
        axes.sort { $0.key < $1.key }
        // [[exclude]]
        var excludes: [[String: [ScenarioValue]]] = []
        if let e = root["exclude"] {
            guard let arr = e.array else {
                throw InputError("\(at("exclude")): 'exclude' must be an array of tables: write [[exclude]]")
            }
            for (n, item) in arr.enumerated() {
                guard let t = item.table else { throw InputError("\(atExclude("exclude", n)): each [[exclude]] must be a table") }
                var ex: [String: [ScenarioValue]] = [:]
                for (k, v) in try Self.scenarioEntries(t, prefix: "exclude", at: { d, _ in atExclude(d, n) }) {
                    guard let axis = axes.first(where: { $0.key == k }) else {
                        throw InputError("\(atExclude("exclude.\(k)", n)): [[exclude]] key '\(k)' is not an axis (axes: \(axes.map(\.key).joined(separator: ", ")))")
                    }
                    var vals: [ScenarioValue] = []
                    if let list = v.array {
                        for x in list { vals.append(try Self.scalar(x, "exclude.\(k)", at: { d, _ in atExclude(d, n) })) }
                    } else {
                        vals.append(try Self.scalar(v, "exclude.\(k)", at: { d, _ in atExclude(d, n) }))
                    }
                    for x in vals where !axis.values.contains(x) {
                        throw InputError("\(atExclude("exclude.\(k)", n)): [[exclude]] \(k) = \(x.toml) is not one of the axis' values (\(axis.values.map(\.toml).joined(separator: ", ")))")
                    }
                    ex[k] = vals
                }
                guard !ex.isEmpty else { throw InputError("\(atExclude("exclude", n)): an empty [[exclude]] would exclude every point") }
                excludes.append(ex)
            }
        }
        self.base = base
        self.axes = axes
        self.excludes = excludes
    }

    /// The `section.key` entries of a table written either as `section.key = v` or as
    /// `[prefix.section]` sub-tables; unknown sections and keys are errors naming the allowed ones.
    private static func scenarioEntries(_ t: TOMLTable, prefix: String, at: (String, Int) -> String) throws -> [(String, TOMLValueConvertible)] {
        var out: [(String, TOMLValueConvertible)] = []
        let sectionNames = ScenarioKeys.sections.map(\.0)
        for (section, value) in t {
            guard let keys = ScenarioKeys.allowed(section) else {
                throw InputError("\(at("\(prefix).\(section)", 0)): unknown scenario section '\(section)' in [\(prefix)] (allowed: \(sectionNames.joined(separator: ", ")); keys are written section.key, e.g. workload.footprint)")
            }
            guard let st = value.table else {
                throw InputError("\(at("\(prefix).\(section)", 0)): '\(section)' in [\(prefix)] must be written \(section).KEY (allowed keys: \(keys.joined(separator: ", ")))")
            }
            for (k, v) in st {
                guard keys.contains(k) else {
                    throw InputError("\(at("\(prefix).\(section).\(k)", 0)): unknown key '\(section).\(k)' in [\(prefix)] (allowed: \(keys.map { "\(section).\($0)" }.joined(separator: ", ")))")
                }
                out.append(("\(section).\(k)", v))
            }
        }
        return out
    }

    private static func scalar(_ v: TOMLValueConvertible, _ dotted: String, at: (String, Int) -> String) throws -> ScenarioValue {
        switch v.type {
        case .string: return .string(v.string!)
        case .int: return .int(v.int!)
        case .double: return .double(v.double!)
        case .bool: return .bool(v.bool!)
        default:
            throw InputError("\(at(dotted, 0)): \(dotted) must be a string, number or boolean, not a \(v.type)")
        }
    }

    private static func scalar(_ v: TOMLValueConvertible, _ dotted: String, at: (String) -> String) throws -> ScenarioValue {
        try scalar(v, dotted, at: { d, _ in at(d) })
    }
    private static func scenarioEntries(_ t: TOMLTable, prefix: String, at: (String) -> String) throws -> [(String, TOMLValueConvertible)] {
        try scenarioEntries(t, prefix: prefix, at: { d, _ in at(d) })
    }
}

/// Where each key is written in a TOML text, so errors can name the line: `a.b.c` for a key
/// `c` under `[a.b]` or a dotted key `b.c = ` under `[a]`; array-of-tables headers count
/// occurrences. Only for messages: the parsing is TOMLKit's.
struct KeyLines {
    private var lines: [String: [Int]] = [:]

    init(text: String) {
        var header = ""
        var lineNo = 0
        var arrayCounts: [String: Int] = [:]
        for raw in text.split(separator: "\n", omittingEmptySubsequences: false) {
            lineNo += 1
            let line = raw.trimmingCharacters(in: .whitespaces)
            if line.hasPrefix("#") || line.isEmpty { continue }
            if line.hasPrefix("[") {
                let inner = line.drop { $0 == "[" }.prefix { $0 != "]" }
                header = Self.normalize(String(inner))
                lines[header, default: []].append(lineNo)
                if line.hasPrefix("[[") {
                    // The n-th table of an array of tables is also `name#n`.
                    let n = arrayCounts[header, default: 0]
                    arrayCounts[header] = n + 1
                    header += "#\(n)"
                    lines[header, default: []].append(lineNo)
                }
                continue
            }
            guard let eq = line.firstIndex(of: "=") else { continue }
            let key = Self.normalize(String(line[..<eq]))
            let full = header.isEmpty ? key : header + "." + key
            lines[full, default: []].append(lineNo)
            // Also record the prefixes of a dotted key (`workload` of `workload.footprint`).
            var parts = full.split(separator: ".").map(String.init)
            while parts.count > 1 {
                parts.removeLast()
                let p = parts.joined(separator: ".")
                if lines[p]?.contains(lineNo) != true { lines[p, default: []].append(lineNo) }
            }
        }
    }

    private static func normalize(_ key: String) -> String {
        key.split(separator: ".").map { $0.trimmingCharacters(in: .whitespaces).trimmingCharacters(in: CharacterSet(charactersIn: "\"'")) }
            .joined(separator: ".")
    }

    /// The line of the `occurrence`-th (0-based) time `dotted` is written; the first when
    /// there are fewer.
    func line(of dotted: String, occurrence: Int = 0) -> Int? {
        guard let l = lines[dotted], !l.isEmpty else { return nil }
        return occurrence < l.count ? l[occurrence] : l[0]
    }
}
