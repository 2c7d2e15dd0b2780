/// Quantities as people write them: byte counts ("512MiB", "1GB"), counts ("10M"),
/// durations ("300ms"). Every parse error says what was wrong with which text.

/// A malformed value from outside (a flag, a scenario file, a trace): what and where.
public struct InputError: Error, CustomStringConvertible, Sendable, Equatable {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// A number of bytes.
public struct ByteCount: RawRepresentable, Hashable, Comparable, Sendable, CustomStringConvertible, Codable {
    public var rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public init(_ bytes: UInt64) { rawValue = bytes }
    public static func kib(_ n: UInt64) -> Self { Self(n << 10) }
    public static func mib(_ n: UInt64) -> Self { Self(n << 20) }
    public static func gib(_ n: UInt64) -> Self { Self(n << 30) }
    public static func < (a: Self, b: Self) -> Bool { a.rawValue < b.rawValue }

    /// Parses "4096", "4096B", "64KiB", "512MiB", "2GiB", "1TiB" (binary) and "64KB", "1MB",
    /// "1GB", "1TB" (decimal), case-insensitively, with an optional fraction ("1.5GiB").
    /// A bare "K"/"M"/"G" suffix is refused: for bytes it is ambiguous.
    public init(parsing text: String) throws(InputError) {
        let t = text.trimmingSpaces()
        let (number, unitText) = splitNumber(t)
        guard let value = Double(number), value >= 0, !number.isEmpty else {
            throw InputError("'\(text)' is not a byte count (examples: 4096, 64KiB, 512MiB, 1GB)")
        }
        let unit: UInt64
        switch unitText.lowercased() {
        case "", "b": unit = 1
        case "kib": unit = 1 << 10
        case "mib": unit = 1 << 20
        case "gib": unit = 1 << 30
        case "tib": unit = 1 << 40
        case "kb": unit = 1_000
        case "mb": unit = 1_000_000
        case "gb": unit = 1_000_000_000
        case "tb": unit = 1_000_000_000_000
        case "k", "m", "g", "t":
            throw InputError("'\(text)': say \(number)\(unitText.uppercased())iB (binary) or \(number)\(unitText.uppercased())B (decimal) for a byte count")
        default:
            throw InputError("'\(text)': unknown byte unit '\(unitText)' (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)")
        }
        // Plain digits: exact integer arithmetic (a Double loses integers above 2^53).
        if let whole = UInt64(number) {
            let (bytes, overflow) = whole.multipliedReportingOverflow(by: unit)
            guard !overflow else { throw InputError("'\(text)' is not a whole number of bytes below 2^64") }
            rawValue = bytes
            return
        }
        // "whole.fraction": exact integer arithmetic too, so every description parses back
        // ("10673149362141900.25KiB" is beyond a Double's 53 bits; found by the fuzz target).
        if let exact = try Self.exactDecimal(number, unit: unit, text: text) {
            rawValue = exact
            return
        }
        let bytes = value * Double(unit)
        guard bytes < 18_446_744_073_709_551_616.0, bytes == bytes.rounded() else {
            throw InputError("'\(text)' is not a whole number of bytes below 2^64")
        }
        rawValue = UInt64(bytes)
    }

    /// `whole.fraction` (ASCII digits, at most 19 after the point) times `unit`, exactly; nil
    /// for any other spelling (an exponent), which the Double path parses.
    static func exactDecimal(_ number: String, unit: UInt64, text: String) throws(InputError) -> UInt64? {
        let parts = number.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 2, parts[1].count <= 19, !(parts[0].isEmpty && parts[1].isEmpty),
              parts.allSatisfy({ $0.utf8.allSatisfy { $0 >= 0x30 && $0 <= 0x39 } }) else { return nil }
        let notWhole = InputError("'\(text)' is not a whole number of bytes below 2^64")
        guard let whole = parts[0].isEmpty ? 0 : UInt64(parts[0]) else { throw notWhole }
        var fraction: UInt64 = 0, scale: UInt64 = 1
        for d in parts[1].utf8 { fraction = fraction * 10 + UInt64(d - 0x30); scale *= 10 }  // < 10^19 < 2^64
        let product = fraction.multipliedFullWidth(by: unit)
        guard product.high < scale else { throw notWhole }
        let (part, remainder) = scale.dividingFullWidth(product)
        guard remainder == 0 else { throw notWhole }
        let (w, o1) = whole.multipliedReportingOverflow(by: unit)
        let (bytes, o2) = w.addingReportingOverflow(part)
        guard !o1, !o2 else { throw notWhole }
        return bytes
    }

    /// "64MiB", "1.50GiB", "1025KiB", "4096B": the largest binary unit that shows the value
    /// exactly with at most two decimals; a value no unit shows exactly is written in bytes
    /// ("4095B", "1234567B"), never rounded: a rounded "4.00KiB" for 4095 bytes would claim a
    /// size the run did not have. So every description parses back to the same value.
    public var description: String {
        let units: [(UInt64, String)] = [(1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")]
        for (size, name) in units where rawValue >= size {
            let r = rawValue % size
            if r == 0 { return "\(rawValue / size)\(name)" }
            if r * 100 % size == 0 {  // r < 2^40: no overflow
                let hundredths = r * 100 / size
                return "\(rawValue / size)." + (hundredths < 10 ? "0" : "") + "\(hundredths)" + name
            }
        }
        return "\(rawValue)B"
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.singleValueContainer(); try c.encode(rawValue)
    }
    public init(from decoder: any Decoder) throws {
        rawValue = try decoder.singleValueContainer().decode(UInt64.self)
    }
}

/// Parses a count: "2000000", "2M", "10M", "1.5G", "500K" (decimal: K = 10^3, M = 10^6,
/// G = 10^9); also "1e6" and underscores or commas as digit separators ("2_000_000").
public func parseCount(_ text: String) throws(InputError) -> UInt64 {
    let t = text.trimmingSpaces().filter { $0 != "_" && $0 != "," }
    let (number, unitText) = splitNumber(t)
    let unit: UInt64
    switch unitText {
    case "": unit = 1
    case "K", "k": unit = 1_000
    case "M", "m": unit = 1_000_000
    case "G", "g": unit = 1_000_000_000
    case "T", "t": unit = 1_000_000_000_000
    default: throw InputError("'\(text)' is not a count (examples: 2000000, 2M, 500K, 1.5G)")
    }
    // Plain digits: exact integer arithmetic (a Double loses integers above 2^53).
    if let whole = UInt64(number) {
        let (n, overflow) = whole.multipliedReportingOverflow(by: unit)
        guard !overflow else { throw InputError("'\(text)' is more than 2^64 - 1") }
        return n
    }
    let scale = Double(unit)
    guard !number.isEmpty, let v = Double(number), v >= 0, v * scale < 18_446_744_073_709_551_616.0, (v * scale) == (v * scale).rounded() else {
        throw InputError("'\(text)' is not a whole, non-negative count (examples: 2000000, 2M, 500K)")
    }
    return UInt64(v * scale)
}

/// A length of simulated or measured time, in nanoseconds.
public struct Duration64: RawRepresentable, Hashable, Comparable, Sendable, CustomStringConvertible, Codable {
    /// Nanoseconds.
    public var rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public static func nanoseconds(_ n: UInt64) -> Self { Self(rawValue: n) }
    public static func microseconds(_ n: UInt64) -> Self { Self(rawValue: n * 1_000) }
    public static func milliseconds(_ n: UInt64) -> Self { Self(rawValue: n * 1_000_000) }
    public static func seconds(_ n: UInt64) -> Self { Self(rawValue: n * 1_000_000_000) }
    public var seconds: Double { Double(rawValue) / 1e9 }
    public var milliseconds: Double { Double(rawValue) / 1e6 }
    public static func < (a: Self, b: Self) -> Bool { a.rawValue < b.rawValue }

    /// Parses "300ms", "60s", "1.5s", "10us", "10µs", "100ns", "2min", "1h".
    public init(parsing text: String) throws(InputError) {
        let (number, unitText) = splitNumber(text.trimmingSpaces())
        guard !number.isEmpty, let v = Double(number), v >= 0 else {
            throw InputError("'\(text)' is not a duration (examples: 300ms, 60s, 10us)")
        }
        let unit: Double
        switch unitText.lowercased() {
        case "ns": unit = 1
        case "us", "µs": unit = 1e3
        case "ms": unit = 1e6
        case "s", "": unit = 1e9
        case "min", "m": unit = 60e9
        case "h": unit = 3600e9
        default: throw InputError("'\(text)': unknown time unit '\(unitText)' (use ns, us, ms, s, min, h)")
        }
        guard v * unit < 18_446_744_073_709_551_616.0 else { throw InputError("'\(text)' is too long a duration") }
        rawValue = UInt64((v * unit).rounded())
    }

    public var description: String {
        let ns = Double(rawValue)
        if rawValue == 0 { return "0s" }
        if ns >= 1e9 { return formatFixed(ns / 1e9, digits: ns.truncatingRemainder(dividingBy: 1e9) == 0 ? 0 : 3) + "s" }
        if ns >= 1e6 { return formatFixed(ns / 1e6, digits: ns.truncatingRemainder(dividingBy: 1e6) == 0 ? 0 : 3) + "ms" }
        if ns >= 1e3 { return formatFixed(ns / 1e3, digits: ns.truncatingRemainder(dividingBy: 1e3) == 0 ? 0 : 3) + "us" }
        return "\(rawValue)ns"
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.singleValueContainer(); try c.encode(rawValue)
    }
    public init(from decoder: any Decoder) throws {
        rawValue = try decoder.singleValueContainer().decode(UInt64.self)
    }
}

// MARK: - helpers

@usableFromInline func splitNumber(_ t: String) -> (String, String) {
    var idx = t.startIndex
    while idx < t.endIndex, t[idx].isNumber || t[idx] == "." || t[idx] == "e" && t.index(after: idx) < t.endIndex
        && (t[t.index(after: idx)].isNumber || t[t.index(after: idx)] == "-" || t[t.index(after: idx)] == "+")
        || (idx > t.startIndex && (t[idx] == "-" || t[idx] == "+") && t[t.index(before: idx)] == "e")
    {
        idx = t.index(after: idx)
    }
    return (String(t[..<idx]), String(t[idx...]).trimmingSpaces())
}

extension String {
    func trimmingSpaces() -> String {
        var s = Substring(self)
        while let f = s.first, f == " " || f == "\t" { s = s.dropFirst() }
        while let l = s.last, l == " " || l == "\t" { s = s.dropLast() }
        return String(s)
    }
}

/// `value` with `digits` digits after the point, no Foundation.
public func formatFixed(_ value: Double, digits: Int) -> String {
    guard value.isFinite else { return value.isNaN ? "nan" : (value > 0 ? "inf" : "-inf") }
    var scale = 1.0
    for _ in 0..<digits { scale *= 10 }
    let negative = value < 0
    let scaled = (abs(value) * scale).rounded()
    guard scaled < 9.2e18 else { return String(value) }
    let n = UInt64(scaled)
    let whole = n / UInt64(scale)
    var s = (negative && n != 0 ? "-" : "") + String(whole)
    if digits > 0 {
        var frac = String(n % UInt64(scale))
        while frac.count < digits { frac = "0" + frac }
        s += "." + frac
    }
    return s
}

/// 1234567 -> "1,234,567".
public func formatGrouped(_ value: UInt64) -> String {
    let s = String(value)
    var out = ""
    for (i, c) in s.enumerated() {
        if i > 0 && (s.count - i) % 3 == 0 { out.append(",") }
        out.append(c)
    }
    return out
}
