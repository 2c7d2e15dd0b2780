import ArgumentParser
import MemVirtCore
import MemVirtKVM
import MemVirtConfig
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

    /// The built-in profile whose unmeasured parameters a calibration inherits: the one that
    /// describes this kind of host.
    static func defaultBase(_ platform: KVMPlatform) -> String {
        switch platform {
        case .pvm: "pvm-shadow"
        case .svm: "zen4"
        default: "vmx-ept"
        }
    }

    func run() throws {
        func fail(_ message: String) throws -> Never {
            if json { print(JSONValue.object([("error", .string(message))]).rendered(pretty: true)) } else { printError("memvirt kvm calibrate: \(message)") }
            throw ExitCode.failure
        }
        // The base profile is loaded before the minutes of measuring, so a bad name fails at once.
        let baseProfile: MachineProfile?
        do { baseProfile = out == nil && base == nil ? nil : try MachineProfile.load(base ?? Self.defaultBase(KVMPlatform.detect())) } catch { try fail("\(error)") }
        let report: CalibrationReport
        do { report = try KVMCalibration.run(KVMCalibrationOptions(quick: quick)) } catch { try fail("\(error)") }
        if let baseProfile, let out {
            do {
                let host = ProcessInfo.processInfo.hostName
                let calibrated = try baseProfile.applying(calibration: report.costs, date: String(report.date.prefix(10)), host: host)
                try calibrated.write(to: out)
                printError("memvirt kvm calibrate: wrote \(out) (\(report.costs.count) parameters measured, the rest inherited from \(baseProfile.name))")
            } catch { try fail("\(error)") }
        }
        print(json ? report.json.rendered(pretty: true) : report.text)
    }
}
