import Foundation
import MemVirtConfig
import MemVirtCore
import MemVirtKVM

/// This host's machine profile, measured: `kvm calibrate`'s micro-benchmarks applied to the
/// built-in profile that describes this kind of host. Used by `kvm calibrate --out`, and by
/// `reproduce` and `validate` when no `--profile` is given, so the model rows that describe
/// this host use costs measured on it in the same run.
public enum HostCalibration {
    /// The built-in profile whose unmeasured parameters a calibration inherits.
    public static func defaultBase(_ platform: KVMPlatform = .detect()) -> String {
        switch platform {
        case .pvm: "pvm-shadow"
        case .svm: "zen4"
        default: "vmx-ept"
        }
    }

    /// Runs the calibration (`quick`: 30 samples per benchmark) and applies it to `base`
    /// (default: `defaultBase()`). Throws where /dev/kvm is unusable or the base is unknown.
    public static func calibrate(quick: Bool, base: String? = nil) throws -> (profile: MachineProfile, report: CalibrationReport) {
        // The base is loaded first, so a bad name fails before the measuring.
        let baseProfile = try MachineProfile.load(base ?? defaultBase())
        let report = try KVMCalibration.run(KVMCalibrationOptions(quick: quick))
        let bounds = report.bounds.map {
            CalibratedBound(parameter: $0.parameter, estimateNanos: $0.estimateNanos, upperNanos: $0.upperNanos,
                            resolutionNanos: $0.resolutionNanos, samples: $0.samples, method: $0.method)
        }
        let conditions = report.conditions.map { c in
            var k = CalibrationConditions(reference: c.reference, referenceNanos: c.referenceNanos, referenceRoundMinNanos: c.roundMinNanos,
                                          referenceRoundMaxNanos: c.roundMaxNanos, stealPercent: c.stealPercent, loadAverage: c.loadAverage,
                                          runSeconds: c.runSeconds)
            k.hostLoopNanos = c.hostLoopNanos
            k.hostLoopRoundMinNanos = c.hostLoopRoundMinNanos
            k.hostLoopRoundMaxNanos = c.hostLoopRoundMaxNanos
            return k
        }
        let profile = try baseProfile.applying(calibration: report.costs, bounds: bounds, conditions: conditions, date: String(report.date.prefix(10)),
                                               host: ProcessInfo.processInfo.hostName)
        return (profile, report)
    }
}
