import Foundation
import MemVirtCore

/// Reads JSON text into a `JSONValue`, keeping the order of keys and integers as integers (so
/// a saved report.json rebuilds into the same tables and figures). Errors name the line and
/// column.
public enum JSONReader {
    public struct ParseError: Error, CustomStringConvertible {
        public var line: Int
        public var column: Int
        public var message: String
        public var description: String { "line \(line), column \(column): \(message)" }
    }

    public static func parse(_ text: String) throws(ParseError) -> JSONValue {
        var p = Parser(bytes: Array(text.utf8))
        p.skipSpace()
        let v = try p.value(depth: 0)
        p.skipSpace()
        if p.i < p.bytes.count { throw p.error("unexpected text after the JSON value") }
        return v
    }

    private struct Parser {
        let bytes: [UInt8]
        var i = 0

        func error(_ m: String) -> ParseError {
            var line = 1, col = 1
            for b in bytes[0..<min(i, bytes.count)] {
                if b == 0x0A { line += 1; col = 1 } else { col += 1 }
            }
            return ParseError(line: line, column: col, message: m)
        }

        mutating func skipSpace() {
            while i < bytes.count, [0x20, 0x0A, 0x0D, 0x09].contains(bytes[i]) { i += 1 }
        }

        mutating func literal(_ s: String, _ v: JSONValue) throws(ParseError) -> JSONValue {
            let u = Array(s.utf8)
            guard i + u.count <= bytes.count, Array(bytes[i..<i + u.count]) == u else { throw error("expected \(s)") }
            i += u.count
            return v
        }

        mutating func value(depth: Int) throws(ParseError) -> JSONValue {
            guard depth < 512 else { throw error("nested too deeply") }
            guard i < bytes.count else { throw error("unexpected end of input") }
            switch bytes[i] {
            case UInt8(ascii: "{"):
                i += 1
                var kv: [(String, JSONValue)] = []
                skipSpace()
                if i < bytes.count, bytes[i] == UInt8(ascii: "}") { i += 1; return .object(kv) }
                while true {
                    skipSpace()
                    guard i < bytes.count, bytes[i] == UInt8(ascii: "\"") else { throw error("expected a string key") }
                    let k = try string()
                    skipSpace()
                    guard i < bytes.count, bytes[i] == UInt8(ascii: ":") else { throw error("expected ':' after key \"\(k)\"") }
                    i += 1
                    skipSpace()
                    kv.append((k, try value(depth: depth + 1)))
                    skipSpace()
                    guard i < bytes.count else { throw error("unexpected end of input in an object") }
                    if bytes[i] == UInt8(ascii: ",") { i += 1; continue }
                    if bytes[i] == UInt8(ascii: "}") { i += 1; return .object(kv) }
                    throw error("expected ',' or '}' in an object")
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
                    guard i < bytes.count else { throw error("unexpected end of input in an array") }
                    if bytes[i] == UInt8(ascii: ",") { i += 1; continue }
                    if bytes[i] == UInt8(ascii: "]") { i += 1; return .array(a) }
                    throw error("expected ',' or ']' in an array")
                }
            case UInt8(ascii: "\""): return .string(try string())
            case UInt8(ascii: "t"): return try literal("true", .bool(true))
            case UInt8(ascii: "f"): return try literal("false", .bool(false))
            case UInt8(ascii: "n"): return try literal("null", .null)
            default: return try number()
            }
        }

        mutating func number() throws(ParseError) -> JSONValue {
            let start = i
            var isInteger = true
            if i < bytes.count, bytes[i] == UInt8(ascii: "-") { i += 1 }
            while i < bytes.count {
                let b = bytes[i]
                if b >= 0x30 && b <= 0x39 { i += 1 } else if b == UInt8(ascii: ".") || b == UInt8(ascii: "e") || b == UInt8(ascii: "E") || b == UInt8(ascii: "+") || b == UInt8(ascii: "-") {
                    isInteger = false
                    i += 1
                } else { break }
            }
            let s = String(decoding: bytes[start..<i], as: UTF8.self)
            if s.isEmpty || s == "-" { throw error("unexpected character '\(String(decoding: bytes[start..<min(start + 1, bytes.count)], as: UTF8.self))'") }
            if isInteger {
                if let v = Int64(s) { return .int(v) }
                if let v = UInt64(s) { return .uint(v) }
            }
            guard let d = Double(s) else { i = start; throw error("bad number '\(s)'") }
            return .double(d)
        }

        mutating func hex4() throws(ParseError) -> UInt32 {
            guard i + 4 <= bytes.count, let v = UInt32(String(decoding: bytes[i..<i + 4], as: UTF8.self), radix: 16) else {
                throw error("bad \\u escape")
            }
            i += 4
            return v
        }

        mutating func string() throws(ParseError) -> String {
            i += 1  // opening quote
            var out: [UInt8] = []
            while true {
                guard i < bytes.count else { throw error("unterminated string") }
                let b = bytes[i]
                i += 1
                if b == UInt8(ascii: "\"") { break }
                if b < 0x20 { i -= 1; throw error("control character in a string") }
                if b != UInt8(ascii: "\\") { out.append(b); continue }
                guard i < bytes.count else { throw error("unterminated escape") }
                let e = bytes[i]
                i += 1
                switch e {
                case UInt8(ascii: "\""): out.append(0x22)
                case UInt8(ascii: "\\"): out.append(0x5C)
                case UInt8(ascii: "/"): out.append(0x2F)
                case UInt8(ascii: "b"): out.append(0x08)
                case UInt8(ascii: "f"): out.append(0x0C)
                case UInt8(ascii: "n"): out.append(0x0A)
                case UInt8(ascii: "r"): out.append(0x0D)
                case UInt8(ascii: "t"): out.append(0x09)
                case UInt8(ascii: "u"):
                    var c = try hex4()
                    if c >= 0xD800 && c < 0xDC00, i + 6 <= bytes.count, bytes[i] == UInt8(ascii: "\\"), bytes[i + 1] == UInt8(ascii: "u") {
                        i += 2
                        let lo = try hex4()
                        c = 0x10000 + ((c - 0xD800) << 10) + (lo &- 0xDC00)
                    }
                    out += Array(String(Unicode.Scalar(c).map(Character.init) ?? "\u{FFFD}").utf8)
                default: i -= 1; throw error("bad escape '\\\(String(UnicodeScalar(e)))'")
                }
            }
            return String(decoding: out, as: UTF8.self)
        }
    }
}

/// Typed reads of a parsed `JSONValue` (nil when the value has another type).
extension JSONValue {
    public var asDouble: Double? {
        switch self {
        case .int(let v): return Double(v)
        case .uint(let v): return Double(v)
        case .double(let v): return v
        default: return nil
        }
    }
    public var asString: String? { if case .string(let s) = self { return s } else { return nil } }
    public var asArray: [JSONValue]? { if case .array(let a) = self { return a } else { return nil } }
    public var asBool: Bool? { if case .bool(let b) = self { return b } else { return nil } }
    public var asObject: [(String, JSONValue)]? { if case .object(let kv) = self { return kv } else { return nil } }

    /// A Codable value as a `JSONValue` (through its JSON encoding).
    public static func encoding<T: Encodable>(_ value: T) -> JSONValue {
        let enc = JSONEncoder()
        guard let data = try? enc.encode(value), let v = try? JSONReader.parse(String(decoding: data, as: UTF8.self)) else { return .null }
        return v
    }

    /// Decodes a Codable value from this JSON.
    public func decoded<T: Decodable>(as type: T.Type) throws -> T {
        try JSONDecoder().decode(T.self, from: Data(rendered().utf8))
    }
}
