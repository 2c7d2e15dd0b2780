import MemVirtCore

extension JSONValue {
    /// Parses JSON text keeping object keys in order and integers exact (what a sweep's
    /// result files and `memvirt run --json` hold). Errors name the byte offset.
    public static func parse(_ text: String) throws -> JSONValue {
        var p = JSONReader(bytes: Array(text.utf8))
        p.skipSpace()
        let v = try p.value(depth: 0)
        p.skipSpace()
        guard p.i == p.bytes.count else { throw p.error("text after the JSON value") }
        return v
    }

    /// The elements of an array, nil otherwise.
    public var arrayValue: [JSONValue]? { if case .array(let a) = self { return a }; return nil }
    /// The key-value pairs of an object, in order; nil otherwise.
    public var objectPairs: [(String, JSONValue)]? { if case .object(let kv) = self { return kv }; return nil }
    public var stringValue: String? { if case .string(let s) = self { return s }; return nil }
    /// A number as Double (nil for other kinds).
    public var doubleValue: Double? {
        switch self {
        case .int(let i): return Double(i)
        case .uint(let u): return Double(u)
        case .double(let d): return d
        default: return nil
        }
    }
}

private struct JSONReader {
    let bytes: [UInt8]
    var i = 0

    func error(_ what: String) -> InputError { InputError("JSON at byte \(i): \(what)") }

    mutating func skipSpace() {
        while i < bytes.count, [0x20, 0x0A, 0x0D, 0x09].contains(bytes[i]) { i += 1 }
    }

    mutating func expect(_ word: String) throws {
        let w = Array(word.utf8)
        guard i + w.count <= bytes.count, Array(bytes[i..<i + w.count]) == w else { throw error("expected '\(word)'") }
        i += w.count
    }

    mutating func value(depth: Int) throws -> JSONValue {
        guard depth < 256 else { throw error("nested too deeply") }
        guard i < bytes.count else { throw error("unexpected end") }
        switch bytes[i] {
        case UInt8(ascii: "{"):
            i += 1
            var kv: [(String, JSONValue)] = []
            skipSpace()
            if i < bytes.count, bytes[i] == UInt8(ascii: "}") { i += 1; return .object(kv) }
            while true {
                skipSpace()
                guard i < bytes.count, bytes[i] == UInt8(ascii: "\"") else { throw error("expected a key") }
                let k = try string()
                skipSpace()
                try expect(":")
                skipSpace()
                kv.append((k, try value(depth: depth + 1)))
                skipSpace()
                guard i < bytes.count else { throw error("unexpected end in an object") }
                if bytes[i] == UInt8(ascii: ",") { i += 1; continue }
                if bytes[i] == UInt8(ascii: "}") { i += 1; return .object(kv) }
                throw error("expected ',' or '}'")
            }
        case UInt8(ascii: "["):
            i += 1
            var a: [JSONValue] = []
            skipSpace()
            if i < bytes.count, bytes[i] == UInt8(ascii: "]") { i += 1; return .array(a) }
            while true {
                skipSpace()
                a.append(try value(depth: depth + 1))
                skipSpace()
                guard i < bytes.count else { throw error("unexpected end in an array") }
                if bytes[i] == UInt8(ascii: ",") { i += 1; continue }
                if bytes[i] == UInt8(ascii: "]") { i += 1; return .array(a) }
                throw error("expected ',' or ']'")
            }
        case UInt8(ascii: "\""): return .string(try string())
        case UInt8(ascii: "t"): try expect("true"); return .bool(true)
        case UInt8(ascii: "f"): try expect("false"); return .bool(false)
        case UInt8(ascii: "n"): try expect("null"); return .null
        default: return try number()
        }
    }

    mutating func string() throws -> String {
        i += 1
        var out: [UInt8] = []
        while i < bytes.count {
            let c = bytes[i]
            i += 1
            if c == UInt8(ascii: "\"") { return String(decoding: out, as: UTF8.self) }
            if c != UInt8(ascii: "\\") { out.append(c); continue }
            guard i < bytes.count else { break }
            let e = bytes[i]
            i += 1
            switch e {
            case UInt8(ascii: "n"): out.append(0x0A)
            case UInt8(ascii: "t"): out.append(0x09)
            case UInt8(ascii: "r"): out.append(0x0D)
            case UInt8(ascii: "b"): out.append(0x08)
            case UInt8(ascii: "f"): out.append(0x0C)
            case UInt8(ascii: "u"):
                guard i + 4 <= bytes.count, let u = UInt32(String(decoding: bytes[i..<i + 4], as: UTF8.self), radix: 16) else {
                    throw error("bad \\u escape")
                }
                i += 4
                var scalar = u
                if (0xD800..<0xDC00).contains(u), i + 6 <= bytes.count, bytes[i] == UInt8(ascii: "\\"), bytes[i + 1] == UInt8(ascii: "u"),
                   let lo = UInt32(String(decoding: bytes[i + 2..<i + 6], as: UTF8.self), radix: 16), (0xDC00..<0xE000).contains(lo) {
                    scalar = 0x10000 + ((u - 0xD800) << 10) + (lo - 0xDC00)
                    i += 6
                }
                out += Array(String(Unicode.Scalar(scalar).map(Character.init) ?? "\u{FFFD}").utf8)
            default: out.append(e)
            }
        }
        throw error("unterminated string")
    }

    mutating func number() throws -> JSONValue {
        let start = i
        while i < bytes.count, "+-0123456789.eE".utf8.contains(bytes[i]) { i += 1 }
        let s = String(decoding: bytes[start..<i], as: UTF8.self)
        guard !s.isEmpty else { throw error("unexpected character") }
        if !s.contains(where: { ".eE".contains($0) }) {
            if let u = UInt64(s) { return .uint(u) }
            if let v = Int64(s) { return .int(v) }
        }
        guard let d = Double(s) else { throw error("bad number '\(s)'") }
        return .double(d)
    }
}
