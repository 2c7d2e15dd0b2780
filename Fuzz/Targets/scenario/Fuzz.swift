// Fuzz target: scenario and profile TOML files through our decoding (issue 17 defect 3: TOMLKit's
// bundled C++ parser aborted on `[.]`, `[=]`, `[é]`, `[$x]`, a stray `[`; a NUL truncated).
//
// Each input is decoded as a scenario (`memvirt run --config`) and as a machine profile
// (`--profile FILE`): both go through MemVirtConfig's strict TOML parser.
//
// Properties: no crash, no abort (SIGABRT from the C++ parser counts as a crash), no hang
// (libFuzzer -timeout); a refusal names the file (and, per the profiles issue, the line).
import MemVirtCore
import MemVirtConfig

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
    func check(_ error: any Error) {
        guard "\(error)".contains("fuzz.toml") else {
            sayError("fuzz-scenario: an error that does not name the file: \(error)\n")
            abort()
        }
    }
    do { _ = try Scenario.decode(text, file: "fuzz.toml") } catch { check(error) }
    do { _ = try MachineProfile.decode(text, file: "fuzz.toml") } catch { check(error) }
    return 0
}
