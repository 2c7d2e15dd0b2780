import Foundation
import MemVirtConfig
import MemVirtCore

/// The scenario keys a sweep may set in `[base]` and vary in `[axes]`: a view of the strict
/// scenario schema (`Scenario.workloadKeys`, `Scenario.platformKeys`), the keys `memvirt run
/// --config` reads.
public enum ScenarioKeys {
    /// Section -> keys, in the order a scenario file is written.
    public static let sections: [(String, [String])] = [
        ("workload", Scenario.workloadKeys),
        ("platform", Scenario.platformKeys),
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
            return TOMLText.quote(s)
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

    /// Reads and checks `path`. A directory, an unreadable file, a NUL byte or bytes that are
    /// not UTF-8 are errors naming the file (and the line, where there is one).
    public static func load(path: String) throws -> SweepFile {
        var isDir: ObjCBool = false
        if FileManager.default.fileExists(atPath: path, isDirectory: &isDir), isDir.boolValue {
            throw InputError("\(path): is a directory, not a sweep file")
        }
        guard let data = FileManager.default.contents(atPath: path) else {
            throw InputError("cannot read sweep file '\(path)'")
        }
        return try SweepFile(data: data, path: path)
    }

    /// Checks that `data` is UTF-8 text without NUL bytes (the error names the line of the
    /// first bad byte), then parses it.
    public init(data: Data, path: String) throws {
        let bytes = [UInt8](data)
        if let nul = bytes.firstIndex(of: 0) {
            throw InputError("\(path):\(Self.line(ofOffset: nul, in: bytes)): NUL byte at offset \(nul): a sweep file is UTF-8 text")
        }
        if let bad = Self.firstInvalidUTF8(bytes) {
            let hex = String(bytes[bad], radix: 16, uppercase: true)
            throw InputError("\(path):\(Self.line(ofOffset: bad, in: bytes)): invalid UTF-8 at offset \(bad) (byte 0x\(hex)): a sweep file is UTF-8 text")
        }
        try self.init(text: String(decoding: bytes, as: UTF8.self), path: path)
    }

    /// Parses `text` with MemVirt's strict TOML parser (every malformed input is an error
    /// naming `path` and the line, never a crash) and checks it against the scenario schema.
    public init(text: String, path: String) throws {
        self.path = path
        let utf8 = Array(text.utf8)
        if let nul = utf8.firstIndex(of: 0) {
            throw InputError("\(path):\(Self.line(ofOffset: nul, in: utf8)): NUL byte at offset \(nul): a sweep file is UTF-8 text")
        }
        let root: TOMLTableNode
        do {
            root = try TOMLParser.parse(text, file: path)
        } catch {
            throw InputError("\(error)")
        }
        /// `path:line`, as every message starts.
        func at(_ line: Int) -> String { line > 0 ? "\(path):\(line)" : path }

        for key in root.keys where !Self.topLevelKeys.contains(key) {
            throw InputError("\(at(root[key]!.line)): unknown key '\(key)' (allowed: \(Self.topLevelKeys.joined(separator: ", ")))")
        }
        // [base]
        var base: [String: ScenarioValue] = [:]
        if let b = root["base"] {
            guard case .table(let bt) = b.node else {
                throw InputError("\(at(b.line)): 'base' must be a table of scenario sections, not \(b.node.typeName)")
            }
            for (k, v) in try Self.scenarioEntries(bt, prefix: "base", path: path) {
                base[k] = try Self.scalar(v, "base.\(k)", path: path)
            }
        }
        // [axes]
        var axes: [SweepAxis] = []
        if let a = root["axes"] {
            guard case .table(let axesTable) = a.node else {
                throw InputError("\(at(a.line)): 'axes' must be a table of scenario keys, not \(a.node.typeName)")
            }
            for (k, v) in try Self.scenarioEntries(axesTable, prefix: "axes", path: path) {
                guard case .array(let elems) = v.node else {
                    let example = (try? Self.scalar(v, k, path: path).toml) ?? "VALUE"
                    throw InputError("\(at(v.line)): axis '\(k)' must be a list of values, e.g. \(k) = [\(example), ...]")
                }
                guard !elems.isEmpty else { throw InputError("\(at(v.line)): axis '\(k)' has no values") }
                var values: [ScenarioValue] = []
                for e in elems {
                    let sv = try Self.scalar(e, "axes.\(k)", path: path)
                    guard !values.contains(sv) else {
                        throw InputError("\(at(e.line)): axis '\(k)' lists \(sv.toml) twice")
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
            guard case .array(let elems) = e.node else {
                throw InputError("\(at(e.line)): 'exclude' must be an array of tables: write [[exclude]]")
            }
            for item in elems {
                guard case .table(let t) = item.node else {
                    throw InputError("\(at(item.line)): each [[exclude]] must be a table, not \(item.node.typeName)")
                }
                var ex: [String: [ScenarioValue]] = [:]
                for (k, v) in try Self.scenarioEntries(t, prefix: "exclude", path: path) {
                    guard let axis = axes.first(where: { $0.key == k }) else {
                        throw InputError("\(at(v.line)): [[exclude]] key '\(k)' is not an axis (axes: \(axes.map(\.key).joined(separator: ", ")))")
                    }
                    var vals: [(ScenarioValue, Int)] = []
                    if case .array(let list) = v.node {
                        for x in list { vals.append((try Self.scalar(x, "exclude.\(k)", path: path), x.line)) }
                    } else {
                        vals.append((try Self.scalar(v, "exclude.\(k)", path: path), v.line))
                    }
                    for (x, line) in vals where !axis.values.contains(x) {
                        throw InputError("\(at(line)): [[exclude]] \(k) = \(x.toml) is not one of the axis' values (\(axis.values.map(\.toml).joined(separator: ", ")))")
                    }
                    ex[k] = vals.map(\.0)
                }
                guard !ex.isEmpty else { throw InputError("\(at(item.line)): an empty [[exclude]] would exclude every point") }
                excludes.append(ex)
            }
        }
        self.base = base
        self.axes = axes
        self.excludes = excludes
    }

    /// The `section.key` entries of a table written either as `section.key = v` or as
    /// `[prefix.section]` sub-tables, in the order written; unknown sections and keys are
    /// errors naming the line and the allowed ones.
    private static func scenarioEntries(_ t: TOMLTableNode, prefix: String, path: String) throws -> [(String, TOMLItem)] {
        var out: [(String, TOMLItem)] = []
        let sectionNames = ScenarioKeys.sections.map(\.0)
        for section in t.keys {
            let item = t[section]!
            guard let keys = ScenarioKeys.allowed(section) else {
                throw InputError("\(path):\(item.line): unknown scenario section '\(section)' in [\(prefix)] (allowed: \(sectionNames.joined(separator: ", ")); keys are written section.key, e.g. workload.footprint)")
            }
            guard case .table(let st) = item.node else {
                throw InputError("\(path):\(item.line): '\(section)' in [\(prefix)] must be written \(section).KEY (allowed keys: \(keys.joined(separator: ", ")))")
            }
            for k in st.keys {
                let v = st[k]!
                guard keys.contains(k) else {
                    throw InputError("\(path):\(v.line): unknown key '\(section).\(k)' in [\(prefix)] (allowed: \(keys.map { "\(section).\($0)" }.joined(separator: ", ")))")
                }
                out.append(("\(section).\(k)", v))
            }
        }
        return out
    }

    private static func scalar(_ v: TOMLItem, _ dotted: String, path: String) throws -> ScenarioValue {
        switch v.node {
        case .string(let s): return .string(s)
        case .int(let i): return .int(Int(i))
        case .float(let d): return .double(d)
        case .bool(let b): return .bool(b)
        case .array, .table:
            throw InputError("\(path):\(v.line): \(dotted) must be a string, number or boolean, not \(v.node.typeName)")
        }
    }

    /// 1 + the newlines before `offset`.
    static func line(ofOffset offset: Int, in bytes: [UInt8]) -> Int {
        bytes[..<offset].reduce(1) { $0 + ($1 == 0x0A ? 1 : 0) }
    }

    /// The offset of the first byte that does not start a valid UTF-8 sequence (overlong forms,
    /// surrogates and truncated sequences included), or nil when all of `bytes` is UTF-8.
    static func firstInvalidUTF8(_ bytes: [UInt8]) -> Int? {
        var parser = Unicode.UTF8.ForwardParser()
        var it = bytes.makeIterator()
        var offset = 0
        while true {
            switch parser.parseScalar(from: &it) {
            case .valid(let scalar): offset += scalar.count
            case .emptyInput: return nil
            case .error: return offset
            }
        }
    }
}
