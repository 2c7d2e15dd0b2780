import Foundation

/// A TOML table being decoded strictly: an unknown key, a wrong type or a value out of range is
/// a `ConfigError` naming the file, the line, the table and what is allowed.
public struct ConfigTable {
    public let node: TOMLTableNode
    /// Dotted path for messages: "" for the root, "workload", "costs.cost_model", "cpu.l1d[0]".
    public let path: String
    public let file: String
    /// The line to blame for a missing key (the table's header or key).
    public let line: Int

    public init(root: TOMLTableNode, file: String) {
        node = root
        path = ""
        self.file = file
        line = 0
    }

    init(node: TOMLTableNode, path: String, file: String, line: Int) {
        self.node = node
        self.path = path
        self.file = file
        self.line = line
    }

    var where_: String { path.isEmpty ? "" : "[\(path)] " }

    public func error(_ key: String, _ message: String) -> ConfigError {
        ConfigError(file: file, line: node[key]?.line ?? line, where_ + message)
    }

    /// Every key must be in `allowed`; the root's keys are called sections.
    public func check(allowed: [String]) throws(ConfigError) {
        for k in node.keys where !allowed.contains(k) {
            let it = node[k]!
            if path.isEmpty, case .table = it.node {
                throw ConfigError(file: file, line: it.line, "unknown section [\(k)] (allowed sections: \(allowed.map { "[\($0)]" }.joined(separator: ", ")))")
            }
            throw ConfigError(file: file, line: it.line, where_ + "unknown key '\(k)' (allowed keys: \(allowed.joined(separator: ", ")))")
        }
    }

    public func has(_ key: String) -> Bool { node[key] != nil }

    func wrongType(_ key: String, _ expected: String) -> ConfigError {
        error(key, "\(key) must be \(expected), not \(node[key]!.node.typeName)")
    }

    public func string(_ key: String) throws(ConfigError) -> String? {
        guard let it = node[key] else { return nil }
        guard case .string(let s) = it.node else { throw wrongType(key, "a string") }
        return s
    }

    public func bool(_ key: String) throws(ConfigError) -> Bool? {
        guard let it = node[key] else { return nil }
        guard case .bool(let b) = it.node else { throw wrongType(key, "true or false") }
        return b
    }

    public func int(_ key: String, range: ClosedRange<Int64>? = nil) throws(ConfigError) -> Int64? {
        guard let it = node[key] else { return nil }
        guard case .int(let v) = it.node else { throw wrongType(key, "an integer") }
        if let r = range, !r.contains(v) { throw error(key, "\(key) = \(v) is out of range (allowed: \(r.lowerBound)...\(r.upperBound))") }
        return v
    }

    /// A number: integers are accepted where a float is asked. Non-finite values are refused.
    public func double(_ key: String, range: ClosedRange<Double>? = nil) throws(ConfigError) -> Double? {
        guard let it = node[key] else { return nil }
        let v: Double
        switch it.node {
        case .int(let i): v = Double(i)
        case .float(let d): v = d
        default: throw wrongType(key, "a number")
        }
        guard v.isFinite else { throw error(key, "\(key) must be a finite number") }
        if let r = range, !r.contains(v) { throw error(key, "\(key) = \(v) is out of range (allowed: \(r.lowerBound)...\(r.upperBound))") }
        return v
    }

    /// A string, or a number written bare (`accesses = 2000000` as well as `accesses = "2M"`).
    public func text(_ key: String) throws(ConfigError) -> String? {
        guard let it = node[key] else { return nil }
        switch it.node {
        case .string(let s): return s
        case .int(let i): return String(i)
        case .float(let d): return String(d)
        default: throw wrongType(key, "a string or a number")
        }
    }

    /// One of `allowed` (a string).
    public func choice(_ key: String, _ allowed: [String]) throws(ConfigError) -> String? {
        guard let s = try string(key) else { return nil }
        guard allowed.contains(s) else { throw error(key, "\(key) = \"\(s)\" is not allowed (allowed: \(allowed.joined(separator: ", ")))") }
        return s
    }

    public func table(_ key: String) throws(ConfigError) -> ConfigTable? {
        guard let it = node[key] else { return nil }
        guard case .table(let t) = it.node else { throw wrongType(key, "a table") }
        return ConfigTable(node: t, path: path.isEmpty ? key : path + "." + key, file: file, line: it.line)
    }

    /// Each element of an array of tables (inline `[{...}, {...}]` or `[[header]]`s).
    public func tables(_ key: String) throws(ConfigError) -> [ConfigTable]? {
        guard let it = node[key] else { return nil }
        guard case .array(let elems) = it.node else { throw wrongType(key, "an array of tables") }
        var out: [ConfigTable] = []
        for (i, e) in elems.enumerated() {
            guard case .table(let t) = e.node else {
                throw ConfigError(file: file, line: e.line, where_ + "\(key)[\(i)] must be a table, not \(e.node.typeName)")
            }
            out.append(ConfigTable(node: t, path: (path.isEmpty ? key : path + "." + key) + "[\(i)]", file: file, line: e.line))
        }
        return out
    }

    public func strings(_ key: String) throws(ConfigError) -> [String]? {
        guard let it = node[key] else { return nil }
        guard case .array(let elems) = it.node else { throw wrongType(key, "an array of strings") }
        var out: [String] = []
        for e in elems {
            guard case .string(let s) = e.node else { throw ConfigError(file: file, line: e.line, where_ + "\(key) must hold strings, not \(e.node.typeName)") }
            out.append(s)
        }
        return out
    }

    /// `value`, or an error naming the missing key and the table's line.
    public func required<T>(_ value: T?, _ key: String) throws(ConfigError) -> T {
        guard let v = value else { throw ConfigError(file: file, line: line, where_ + "missing key '\(key)'") }
        return v
    }
}

/// TOML text helpers for writing files.
public enum TOMLText {
    /// A basic string with the escapes TOML requires.
    public static func quote(_ s: String) -> String {
        var out = "\""
        for u in s.unicodeScalars {
            switch u {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\t": out += "\\t"
            case "\r": out += "\\r"
            default:
                if u.value < 0x20 || u.value == 0x7f {
                    out += String(format: "\\u%04X", u.value)
                } else {
                    out.unicodeScalars.append(u)
                }
            }
        }
        return out + "\""
    }

    /// A number that reads back to the same Double: integers bare, others in Swift's shortest
    /// round-trip form (valid TOML floats).
    static func number(_ v: Double) -> String {
        if v == v.rounded() && abs(v) < 1e15 { return String(Int64(v)) }
        var s = "\(v)"
        if !s.contains(".") && !s.contains("e") { s += ".0" }
        return s
    }
}
