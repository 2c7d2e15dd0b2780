// Fuzz target: scenario and profile TOML files through our decoding (issue 17 defect 3: TOMLKit's
// bundled C++ parser aborted on `[.]`, `[=]`, `[é]`, `[$x]`, a stray `[`; a NUL truncated).
//
// NOT YET BUILT: the strict `Scenario` type is being written on branch `profiles`. To wire it
// (integrator): make the one call below match that type's decode entry point (text + file name
// in, a value or a thrown error out), and add ("fuzz-scenario", ["MemVirtCore", "<its module>"])
// to the fuzzTargets list in Package.swift and `scenario` to `all` in scripts/fuzz.
//
// Properties: no crash, no abort (SIGABRT from the C++ parser counts as a crash), no hang
// (libFuzzer -timeout); a refusal names the file (and, per the profiles issue, the line).
import MemVirtCore
import MemVirtConfig  // the module that holds `Scenario` (adjust when wiring)

#if canImport(Glibc)
import Glibc
#endif

/// Writes to standard error (Swift 6 refuses the C `stderr` global).
func sayError(_ text: String) {
    var t = text
    t.withUTF8 { b in _ = write(2, b.baseAddress, b.count) }
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzScenario(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    guard size <= 64 << 10 else { return -1 }  // scenario files are small
    // Bytes as the CLI reads them (invalid UTF-8 included: the decoder must refuse it, not trap).
    let text = String(decoding: UnsafeBufferPointer(start: data, count: size), as: UTF8.self)
    do {
        _ = try Scenario.decode(toml: text, file: "fuzz.toml")  // <- the one call to wire
    } catch {
        guard "\(error)".contains("fuzz.toml") else {
            sayError("fuzz-scenario: an error that does not name the file: \(error)\n")
            abort()
        }
    }
    return 0
}
