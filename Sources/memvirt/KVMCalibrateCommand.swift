import ArgumentParser
import MemVirtCore
import MemVirtKVM
import MemVirtExperiments
import Foundation

/// `memvirt kvm calibrate`: the model's costs measured on this host's /dev/kvm.
struct KVMCalibrateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "calibrate",
        abstract: "Measure the model's cost parameters on /dev/kvm (micro-benchmarks, median/p10/p90, KVM counters per event).")

    @Flag(name: .long, help: "Fewer samples (30 per benchmark instead of 240): for tests.")
    var quick = false

    @Flag(name: .long, help: "Print JSON (schema memvirt.kvm-calibrate/1); on failure an object with `error`.")
    var json = false

    @Option(name: .long, help: "Write a machine profile: the base profile with every measured parameter replaced.")
    var out: String?

    @Option(name: .long, help: "The profile (name or TOML file) whose other parameters --out inherits.")
    var base: String?

    func run() throws {
        func fail(_ message: String) throws -> Never {
            if json { print(JSONValue.object([("error", .string(message))]).rendered(pretty: true)) } else { printError("memvirt kvm calibrate: \(message)") }
            throw ExitCode.failure
        }
        let report: CalibrationReport
        if let out {
            do {
                let (profile, r) = try HostCalibration.calibrate(quick: quick, base: base)
                try profile.write(to: out)
                printError("memvirt kvm calibrate: wrote \(out) (\(r.costs.count) parameters measured, \(r.bounds.count) bounded below the resolution, the rest inherited from \(base ?? HostCalibration.defaultBase()))")
                report = r
            } catch { try fail("\(error)") }
        } else {
            if base != nil { try fail("--base names the profile that --out inherits from: give --out FILE too") }
            do { report = try KVMCalibration.run(KVMCalibrationOptions(quick: quick)) } catch { try fail("\(error)") }
        }
        print(json ? report.json.rendered(pretty: true) : report.text)
    }
}
