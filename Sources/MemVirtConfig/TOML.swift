import Foundation

/// A problem in a scenario or profile file: the file, the 1-based line, what is wrong and,
/// where it helps, what is allowed there.
public struct ConfigError: Error, CustomStringConvertible, Sendable, Equatable {
    public var file: String
    public var line: Int
    public var message: String
    public init(file: String, line: Int, _ message: String) {
        self.file = file
        self.line = line
        self.message = message
    }
    public var description: String { line > 0 ? "\(file):\(line): \(message)" : "\(file): \(message)" }
}

/// A TOML value with the line it was written on.
public indirect enum TOMLNode: Sendable {
    case string(String)
    case int(Int64)
    case float(Double)
    case bool(Bool)
    case array([TOMLItem])
    case table(TOMLTableNode)

    /// The TOML type name, for "wrong type" errors.
    public var typeName: String {
        switch self {
        case .string: "a string"
        case .int: "an integer"
        case .float: "a float"
        case .bool: "a boolean"
        case .array: "an array"
        case .table: "a table"
        }
    }
}

public struct TOMLItem: Sendable {
    public var node: TOMLNode
    public var line: Int
    /// An array made by `[[header]]`s (extended by the next one).
    var isTableArray = false
}

/// A TOML table: keys in the order written, each with its line.
public final class TOMLTableNode: @unchecked Sendable {
    public private(set) var keys: [String] = []
    var items: [String: TOMLItem] = [:]
    /// The line of the header (or key) that opened it.
    public let line: Int
    /// Defined by a `[header]` (or an inline table, closed for additions).
    var defined = false
    var inline = false
    /// Created by a dotted key (`a.b = 1` creates table `a`).
    var fromDottedKey = false
    init(line: Int) { self.line = line }

    public subscript(key: String) -> TOMLItem? { items[key] }

    func set(_ key: String, _ item: TOMLItem) {
        if items[key] == nil { keys.append(key) }
        items[key] = item
    }
}

/// A strict parser of TOML 1.0 (dates and times excepted: MemVirt files use none, and a date
/// written bare is reported as such). Written for MemVirt instead of TOMLKit's bundled C++
/// parser, which aborts the process on malformed headers (`[.]`, `[=]`, `[é]`, a stray `[`)
/// and stops silently at a NUL byte: here every malformed input is a `ConfigError` naming the
/// file and line, and every value keeps its line for later errors (unknown key, wrong type).
public struct TOMLParser {
    let bytes: [UInt8]
    let file: String
    var pos = 0
    var line = 1
    let root = TOMLTableNode(line: 0)
    var current: TOMLTableNode
    /// Arrays and inline tables open around the value being read (bounded: no input may
    /// exhaust the stack).
    var depth = 0
    static let maxDepth = 64

    public static func parse(_ text: String, file: String) throws(ConfigError) -> TOMLTableNode {
        var p = TOMLParser(bytes: Array(text.utf8), file: file)
        try p.document()
        return p.root
    }

    /// Reads and parses `path`: unreadable, non-UTF-8 or NUL-carrying files are errors.
    public static func parse(contentsOf path: String) throws(ConfigError) -> TOMLTableNode {
        var isDir: ObjCBool = false
        if FileManager.default.fileExists(atPath: path, isDirectory: &isDir), isDir.boolValue {
            throw ConfigError(file: path, line: 0, "is a directory, not a TOML file")
        }
        guard let data = FileManager.default.contents(atPath: path) else {
            throw ConfigError(file: path, line: 0, "cannot read the file")
        }
        return try parse(data: data, file: path)
    }

    public static func parse(data: Data, file: String) throws(ConfigError) -> TOMLTableNode {
        let bytes = [UInt8](data)
        if let nul = bytes.firstIndex(of: 0) {
            let line = bytes[..<nul].reduce(1) { $0 + ($1 == 10 ? 1 : 0) }
            throw ConfigError(file: file, line: line, "NUL byte at offset \(nul): a TOML file is UTF-8 text")
        }
        guard let text = String(data: data, encoding: .utf8) else {
            throw ConfigError(file: file, line: 0, "not valid UTF-8 text")
        }
        return try parse(text, file: file)
    }

    init(bytes: [UInt8], file: String) {
        self.bytes = bytes
        self.file = file
        current = root
    }

    func fail(_ message: String, line: Int? = nil) -> ConfigError { ConfigError(file: file, line: line ?? self.line, message) }

    var atEnd: Bool { pos >= bytes.count }
    var peek: UInt8? { pos < bytes.count ? bytes[pos] : nil }
    func peek(_ offset: Int) -> UInt8? { pos + offset < bytes.count ? bytes[pos + offset] : nil }

    mutating func skipSpaces() {
        while let c = peek, c == 0x20 || c == 0x09 { pos += 1 }
    }

    /// A comment to the end of the line (not consuming the newline).
    mutating func skipComment() throws(ConfigError) {
        guard peek == UInt8(ascii: "#") else { return }
        while let c = peek, c != 10 {
            if c == 13 && peek(1) == 10 { break }
            if c < 0x20 && c != 0x09 || c == 0x7f { throw fail("control character 0x\(String(c, radix: 16)) in a comment") }
            pos += 1
        }
    }

    /// Expects the end of a line (after spaces and a comment) and consumes the newline.
    mutating func endOfLine() throws(ConfigError) {
        skipSpaces()
        try skipComment()
        if atEnd { return }
        if peek == 10 { pos += 1; line += 1; return }
        if peek == 13 && peek(1) == 10 { pos += 2; line += 1; return }
        throw fail("unexpected '\(describe(peek!))' after the value (one key = value or [table] per line)")
    }

    func describe(_ c: UInt8) -> String {
        if c >= 0x20 && c < 0x7f { return String(UnicodeScalar(c)) }
        return "byte 0x" + String(c, radix: 16)
    }

    mutating func document() throws(ConfigError) {
        if bytes.starts(with: [0xEF, 0xBB, 0xBF]) { pos = 3 }
        while !atEnd {
            skipSpaces()
            guard let c = peek else { break }
            if c == 10 || c == 13 || c == UInt8(ascii: "#") {
                try endOfLine()
                continue
            }
            if c == UInt8(ascii: "[") {
                try header()
            } else {
                try keyValue(into: current)
            }
            try endOfLine()
        }
    }

    // MARK: keys

    static func isBare(_ c: UInt8) -> Bool {
        (c >= 0x41 && c <= 0x5a) || (c >= 0x61 && c <= 0x7a) || (c >= 0x30 && c <= 0x39) || c == 0x5f || c == 0x2d
    }

    mutating func simpleKey() throws(ConfigError) -> String {
        guard let c = peek else { throw fail("expected a key, found the end of the file") }
        if c == UInt8(ascii: "\"") {
            if peek(1) == c && peek(2) == c { throw fail("a key cannot be a multi-line string") }
            return try basicString()
        }
        if c == UInt8(ascii: "'") {
            if peek(1) == c && peek(2) == c { throw fail("a key cannot be a multi-line string") }
            return try literalString()
        }
        let start = pos
        while let b = peek, Self.isBare(b) { pos += 1 }
        if pos == start {
            if c == 10 || c == 13 { throw fail("expected a key before the end of the line") }
            throw fail("'\(describe(c))' cannot start a key (bare keys use A-Z a-z 0-9 _ -; quote others)")
        }
        return String(decoding: bytes[start..<pos], as: UTF8.self)
    }

    mutating func dottedKey() throws(ConfigError) -> [String] {
        var parts = [try simpleKey()]
        while true {
            skipSpaces()
            guard peek == UInt8(ascii: ".") else { return parts }
            pos += 1
            skipSpaces()
            parts.append(try simpleKey())
        }
    }

    // MARK: tables

    mutating func header() throws(ConfigError) {
        let headerLine = line
        pos += 1
        let arrayOfTables = peek == UInt8(ascii: "[")
        if arrayOfTables { pos += 1 }
        skipSpaces()
        let path = try dottedKey()
        skipSpaces()
        guard peek == UInt8(ascii: "]") else {
            throw fail("table header: expected ']' after [\(path.joined(separator: "."))" + (peek.map { ", found '\(describe($0))'" } ?? ""))
        }
        pos += 1
        if arrayOfTables {
            guard peek == UInt8(ascii: "]") else { throw fail("array-of-tables header: expected ']]'") }
            pos += 1
        }
        var t = root
        for (i, k) in path.enumerated() {
            let last = i == path.count - 1
            if let existing = t[k] {
                switch existing.node {
                case .table(let sub):
                    if last && !arrayOfTables {
                        if sub.defined || sub.fromDottedKey || sub.inline {
                            throw fail("table [\(path.joined(separator: "."))] is defined twice (first at line \(sub.line))")
                        }
                        sub.defined = true
                    }
                    if last && arrayOfTables { throw fail("[[\(path.joined(separator: "."))]]: already a table (line \(existing.line))") }
                    if sub.inline { throw fail("cannot extend the inline table '\(k)' (line \(existing.line))") }
                    t = sub
                case .array(var elems):
                    guard existing.isTableArray else { throw fail("'\(k)' is an array (line \(existing.line)), not a table") }
                    if last {
                        guard arrayOfTables else { throw fail("[\(path.joined(separator: "."))] is an array of tables (line \(existing.line))") }
                        let n = TOMLTableNode(line: headerLine)
                        n.defined = true
                        elems.append(TOMLItem(node: .table(n), line: headerLine))
                        t.set(k, TOMLItem(node: .array(elems), line: existing.line, tableArray: true))
                        t = n
                    } else if case .table(let lastTable)? = elems.last?.node {
                        t = lastTable
                    }
                default:
                    throw fail("'\(k)' is already \(existing.node.typeName) (line \(existing.line)), not a table")
                }
            } else {
                let n = TOMLTableNode(line: headerLine)
                if last && arrayOfTables {
                    n.defined = true
                    t.set(k, TOMLItem(node: .array([TOMLItem(node: .table(n), line: headerLine)]), line: headerLine, tableArray: true))
                } else {
                    n.defined = last
                    t.set(k, TOMLItem(node: .table(n), line: headerLine))
                }
                t = n
            }
        }
        current = t
    }

    /// `key = value` into `table` (dotted keys create sub-tables).
    mutating func keyValue(into table: TOMLTableNode) throws(ConfigError) {
        let keyLine = line
        let path = try dottedKey()
        skipSpaces()
        guard peek == UInt8(ascii: "=") else {
            throw fail("expected '=' after the key '\(path.joined(separator: "."))'" + (peek.map { $0 == 10 || $0 == 13 ? "" : ", found '\(describe($0))'" } ?? ""))
        }
        pos += 1
        skipSpaces()
        var t = table
        for k in path.dropLast() {
            if let existing = t[k] {
                guard case .table(let sub) = existing.node, sub.fromDottedKey, !sub.inline else {
                    throw fail("'\(k)' is already defined at line \(existing.line)")
                }
                t = sub
            } else {
                let n = TOMLTableNode(line: keyLine)
                n.fromDottedKey = true
                t.set(k, TOMLItem(node: .table(n), line: keyLine))
                t = n
            }
        }
        let k = path.last!
        if let existing = t[k] { throw fail("key '\(path.joined(separator: "."))' is defined twice (first at line \(existing.line))") }
        let v = try value()
        t.set(k, TOMLItem(node: v, line: keyLine))
    }

    // MARK: values

    mutating func value() throws(ConfigError) -> TOMLNode {
        guard let c = peek else { throw fail("expected a value, found the end of the file") }
        if c == UInt8(ascii: "[") || c == UInt8(ascii: "{") {
            guard depth < Self.maxDepth else { throw fail("arrays and inline tables nested more than \(Self.maxDepth) deep") }
            depth += 1
        }
        defer { if c == UInt8(ascii: "[") || c == UInt8(ascii: "{") { depth -= 1 } }
        switch c {
        case UInt8(ascii: "\""):
            if peek(1) == c && peek(2) == c { return .string(try multilineBasicString()) }
            return .string(try basicString())
        case UInt8(ascii: "'"):
            if peek(1) == c && peek(2) == c { return .string(try multilineLiteralString()) }
            return .string(try literalString())
        case UInt8(ascii: "["): return try array()
        case UInt8(ascii: "{"): return try inlineTable()
        case 10, 13: throw fail("expected a value after '='")
        default: return try scalar()
        }
    }

    mutating func array() throws(ConfigError) -> TOMLNode {
        let open = line
        pos += 1
        var items: [TOMLItem] = []
        while true {
            try skipArraySpace(open: open)
            if peek == UInt8(ascii: "]") { pos += 1; return .array(items) }
            let l = line
            items.append(TOMLItem(node: try value(), line: l))
            try skipArraySpace(open: open)
            if peek == UInt8(ascii: ",") { pos += 1; continue }
            if peek == UInt8(ascii: "]") { pos += 1; return .array(items) }
            throw fail("array opened at line \(open): expected ',' or ']'" + (peek.map { ", found '\(describe($0))'" } ?? ", found the end of the file"))
        }
    }

    mutating func skipArraySpace(open: Int) throws(ConfigError) {
        while true {
            skipSpaces()
            try skipComment()
            guard let c = peek else { throw fail("array opened at line \(open) is not closed") }
            if c == 10 { pos += 1; line += 1 } else if c == 13 && peek(1) == 10 { pos += 2; line += 1 } else { return }
        }
    }

    mutating func inlineTable() throws(ConfigError) -> TOMLNode {
        let t = TOMLTableNode(line: line)
        t.inline = true
        pos += 1
        skipSpaces()
        if peek == UInt8(ascii: "}") { pos += 1; return .table(t) }
        while true {
            skipSpaces()
            if atEnd || peek == 10 || peek == 13 { throw fail("inline table: its keys and '}' must be on one line") }
            try keyValue(into: t)
            skipSpaces()
            if peek == UInt8(ascii: ",") { pos += 1; continue }
            if peek == UInt8(ascii: "}") { pos += 1; return .table(t) }
            throw fail("inline table: expected ',' or '}' on the same line" + (peek.map { $0 == 10 || $0 == 13 ? "" : ", found '\(describe($0))'" } ?? ""))
        }
    }

    mutating func basicString() throws(ConfigError) -> String {
        pos += 1
        var out: [UInt8] = []
        while true {
            guard let c = peek else { throw fail("string not closed") }
            if c == UInt8(ascii: "\"") { pos += 1; break }
            if c == 10 || c == 13 { throw fail("string not closed on its line (use \"\"\" for multi-line strings)") }
            if c == UInt8(ascii: "\\") {
                try escape(into: &out)
                continue
            }
            if c < 0x20 && c != 0x09 || c == 0x7f { throw fail("control character 0x\(String(c, radix: 16)) in a string (escape it)") }
            out.append(c)
            pos += 1
        }
        return String(decoding: out, as: UTF8.self)
    }

    mutating func escape(into out: inout [UInt8]) throws(ConfigError) {
        pos += 1
        guard let e = peek else { throw fail("string not closed") }
        pos += 1
        switch e {
        case UInt8(ascii: "b"): out.append(8)
        case UInt8(ascii: "t"): out.append(9)
        case UInt8(ascii: "n"): out.append(10)
        case UInt8(ascii: "f"): out.append(12)
        case UInt8(ascii: "r"): out.append(13)
        case UInt8(ascii: "\""): out.append(0x22)
        case UInt8(ascii: "\\"): out.append(0x5c)
        case UInt8(ascii: "u"), UInt8(ascii: "U"):
            let n = e == UInt8(ascii: "u") ? 4 : 8
            guard pos + n <= bytes.count, bytes[pos..<pos + n].allSatisfy({ Character(UnicodeScalar($0)).isHexDigit }),
                let v = UInt32(String(decoding: bytes[pos..<pos + n], as: UTF8.self), radix: 16),
                let s = UnicodeScalar(v)
            else { throw fail("bad \\\(describe(e)) escape: \(n) hex digits of a Unicode scalar value") }
            pos += n
            out.append(contentsOf: Array(String(Character(s)).utf8))
        default: throw fail("unknown escape '\\\(describe(e))' (allowed: \\b \\t \\n \\f \\r \\\" \\\\ \\uXXXX \\UXXXXXXXX)")
        }
    }

    mutating func literalString() throws(ConfigError) -> String {
        pos += 1
        let start = pos
        while true {
            guard let c = peek else { throw fail("string not closed") }
            if c == UInt8(ascii: "'") { break }
            if c == 10 || c == 13 { throw fail("string not closed on its line") }
            if c < 0x20 && c != 0x09 || c == 0x7f { throw fail("control character 0x\(String(c, radix: 16)) in a string") }
            pos += 1
        }
        let s = String(decoding: bytes[start..<pos], as: UTF8.self)
        pos += 1
        return s
    }

    mutating func multilineNewline() {
        if peek == 10 { pos += 1; line += 1 } else if peek == 13 && peek(1) == 10 { pos += 2; line += 1 }
    }

    mutating func multilineBasicString() throws(ConfigError) -> String {
        let open = line
        pos += 3
        multilineNewline()
        var out: [UInt8] = []
        while true {
            guard let c = peek else { throw fail("multi-line string opened at line \(open) is not closed") }
            if c == 0x22 && peek(1) == 0x22 && peek(2) == 0x22 {
                // Up to two quotes may sit before the closing delimiter.
                var n = 3
                while peek(n) == 0x22 && n < 5 { n += 1 }
                out.append(contentsOf: repeatElement(0x22, count: n - 3))
                pos += n
                break
            }
            if c == UInt8(ascii: "\\") {
                // A line-ending backslash trims the newline and the whitespace after it.
                var q = pos + 1
                while q < bytes.count && (bytes[q] == 0x20 || bytes[q] == 0x09) { q += 1 }
                if q < bytes.count && (bytes[q] == 10 || bytes[q] == 13) {
                    pos = q
                    while let w = peek, w == 0x20 || w == 0x09 || w == 10 || w == 13 {
                        if w == 10 { line += 1 }
                        pos += 1
                    }
                    continue
                }
                try escape(into: &out)
                continue
            }
            if c == 10 { line += 1 }
            if c < 0x20 && c != 0x09 && c != 10 && c != 13 || c == 0x7f { throw fail("control character 0x\(String(c, radix: 16)) in a string") }
            out.append(c)
            pos += 1
        }
        return String(decoding: out, as: UTF8.self)
    }

    mutating func multilineLiteralString() throws(ConfigError) -> String {
        let open = line
        pos += 3
        multilineNewline()
        var out: [UInt8] = []
        while true {
            guard let c = peek else { throw fail("multi-line string opened at line \(open) is not closed") }
            if c == 0x27 && peek(1) == 0x27 && peek(2) == 0x27 {
                var n = 3
                while peek(n) == 0x27 && n < 5 { n += 1 }
                out.append(contentsOf: repeatElement(0x27, count: n - 3))
                pos += n
                break
            }
            if c == 10 { line += 1 }
            if c < 0x20 && c != 0x09 && c != 10 && c != 13 || c == 0x7f { throw fail("control character 0x\(String(c, radix: 16)) in a string") }
            out.append(c)
            pos += 1
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// Booleans, integers and floats; dates are refused by name.
    mutating func scalar() throws(ConfigError) -> TOMLNode {
        let start = pos
        while let c = peek, Self.isBare(c) || c == UInt8(ascii: "+") || c == UInt8(ascii: ".") || c == UInt8(ascii: ":") { pos += 1 }
        let tok = String(decoding: bytes[start..<pos], as: UTF8.self)
        if tok.isEmpty { throw fail("'\(describe(peek!))' cannot start a value (strings are quoted)") }
        switch tok {
        case "true": return .bool(true)
        case "false": return .bool(false)
        case "inf", "+inf": return .float(.infinity)
        case "-inf": return .float(-.infinity)
        case "nan", "+nan", "-nan": return .float(.nan)
        default: break
        }
        let isDate = tok.contains(":") || tok.count >= 10 && tok.dropFirst(4).first == "-" && tok.prefix(4).allSatisfy(\.isNumber)
        if isDate { throw fail("'\(tok)' looks like a date or time: MemVirt files take dates as strings (\"2026-12-04\")") }
        if let v = Self.integer(tok) { return .int(v) }
        if let v = Self.float(tok) { return .float(v) }
        throw fail("'\(tok)' is not a value (strings are quoted; numbers like 42, 0.5, 1e6; true or false)")
    }

    /// Digits with single underscores between them.
    static func digits(_ s: Substring, allowed: (Character) -> Bool) -> String? {
        guard let f = s.first, let l = s.last, f != "_", l != "_", !s.contains("__") else { return nil }
        let d = s.filter { $0 != "_" }
        guard !d.isEmpty, d.allSatisfy(allowed) else { return nil }
        return String(d)
    }

    static func integer(_ tok: String) -> Int64? {
        var s = Substring(tok)
        for (prefix, radix) in [("0x", 16), ("0o", 8), ("0b", 2)] where s.hasPrefix(prefix) {
            s = s.dropFirst(2)
            guard let d = digits(s, allowed: { $0.isHexDigit && Int(String($0), radix: radix) != nil }) else { return nil }
            return Int64(d, radix: radix)
        }
        var sign = ""
        if s.first == "+" || s.first == "-" { sign = s.first == "-" ? "-" : ""; s = s.dropFirst() }
        guard let d = digits(s, allowed: \.isASCII), d.allSatisfy(\.isNumber) else { return nil }
        if d.count > 1 && d.hasPrefix("0") { return nil }
        return Int64(sign + d)
    }

    static func float(_ tok: String) -> Double? {
        var s = Substring(tok)
        var sign = ""
        if s.first == "+" || s.first == "-" { sign = s.first == "-" ? "-" : ""; s = s.dropFirst() }
        var mantissa = s
        var exponent: Substring?
        if let e = s.firstIndex(where: { $0 == "e" || $0 == "E" }) {
            mantissa = s[..<e]
            exponent = s[s.index(after: e)...]
        }
        var intPart = mantissa
        var frac: Substring?
        if let dot = mantissa.firstIndex(of: ".") {
            intPart = mantissa[..<dot]
            frac = mantissa[mantissa.index(after: dot)...]
        }
        guard frac != nil || exponent != nil else { return nil }
        guard let i = digits(intPart, allowed: \.isNumber), !(i.count > 1 && i.hasPrefix("0")) else { return nil }
        var text = sign + i
        if let f = frac {
            guard let fd = digits(f, allowed: \.isNumber) else { return nil }
            text += "." + fd
        }
        if var e = exponent {
            var esign = ""
            if e.first == "+" || e.first == "-" { esign = e.first == "-" ? "-" : ""; e = e.dropFirst() }
            guard let ed = digits(e, allowed: \.isNumber) else { return nil }
            text += "e" + esign + ed
        }
        guard let v = Double(text), v.isFinite else { return nil }
        return v
    }
}

extension TOMLItem {
    init(node: TOMLNode, line: Int, tableArray: Bool) {
        self.node = node
        self.line = line
        isTableArray = tableArray
    }
}
