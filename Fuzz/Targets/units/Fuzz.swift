// Fuzz target: byte counts, counts and durations as people write them (MemVirtCore/Units.swift).
// Besides "no crash", each parsed value is checked against properties that must hold for any
// input: a byte count's description parses back to the same value; a duration's description
// parses back to within 0.05%; counts and descriptions never trap.
import MemVirtCore

#if canImport(Glibc)
import Glibc
#endif

/// Writes to standard error (Swift 6 refuses the C `stderr` global).
func sayError(_ text: String) {
    var t = text
    t.withUTF8 { b in _ = write(2, b.baseAddress, b.count) }
}

@inline(never) func fail(_ what: String) -> Never {
    sayError("fuzz-units: property violated: \(what)\n")
    abort()
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzUnits(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    guard size <= 256 else { return -1 }  // flags and scenario values are short
    let text = String(decoding: UnsafeBufferPointer(start: data, count: size), as: UTF8.self)
    if let b = try? ByteCount(parsing: text) {
        let d = b.description
        guard let back = try? ByteCount(parsing: d) else { fail("ByteCount '\(text)' -> \(b.rawValue) printed as '\(d)', which does not parse") }
        guard back == b else { fail("ByteCount '\(text)' -> \(b.rawValue) printed as '\(d)' -> \(back.rawValue)") }
    }
    if let n = try? parseCount(text) {
        _ = formatGrouped(n)
    }
    if let t = try? Duration64(parsing: text) {
        let d = t.description
        guard let back = try? Duration64(parsing: d) else { fail("Duration '\(text)' -> \(t.rawValue)ns printed as '\(d)', which does not parse") }
        let err = abs(Double(back.rawValue) - Double(t.rawValue)) / max(1, Double(t.rawValue))
        guard err <= 0.0005 else { fail("Duration '\(text)' -> \(t.rawValue)ns printed as '\(d)' -> \(back.rawValue)ns") }
        _ = formatFixed(t.seconds, digits: 3)
    }
    return 0
}
