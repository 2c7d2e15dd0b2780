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
        let (profile, report, _) = try calibrateWithExpected(quick: quick, base: base)
        return (profile, report)
    }

    /// As `calibrate`, and beside the profile (each measured parameter at the host's base
    /// speed) the profile a long run on this host is expected to pay: where the host ran at
    /// two speeds during the calibration, each parameter the mix of its base-speed and
    /// slow-round medians in the calibration's share of slow rounds
    /// (`CalibratedCost.expectedNanos`). `validate` predicts with this one: its cases run for
    /// seconds, across the host's changes of speed.
    public static func calibrateWithExpected(quick: Bool, base: String? = nil) throws -> (profile: MachineProfile, report: CalibrationReport, expected: MachineProfile) {
        let r = try calibrateStates(quick: quick, base: base)
        return (r.profile, r.report, r.expected)
    }

    /// One calibration priced at each of the host's speeds: `profile` at the base speed,
    /// `expected` at the calibration's mix, `slow` with every parameter that moved between the
    /// states at its slow-round median (nil when the calibration saw no slow round), and the
    /// CPL0 reference (cpl0_instruction) in each state (`HostSpeedBracket` classifies a run's
    /// ends by it).
    public struct States {
        public var profile: MachineProfile
        public var report: CalibrationReport
        public var expected: MachineProfile
        public var slow: MachineProfile?
        public var fastReferenceNanos: Double?
        public var slowReferenceNanos: Double?
    }

    public static func calibrateStates(quick: Bool, base: String? = nil) throws -> States {
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
        // Each parameter that moved between the states at `value(c)`, the rest as measured.
        func priced(_ value: (CalibratedCost) -> Double, _ how: (CalibratedCost) -> String) -> [CalibratedCost] {
            report.costs.map { c in
                var e = c
                if c.slowStateNanos != nil {
                    e.medianNanos = value(c)
                    e.p10Nanos = min(e.p10Nanos, e.medianNanos)
                    e.p90Nanos = max(e.p90Nanos, e.medianNanos)
                    e.method += how(c)
                }
                return e
            }
        }
        let mixed = priced(\.expectedNanos) { c in
            "; expected over the host's two speeds: \(formatFixed((c.slowRoundFraction ?? 0) * 100, digits: 0))% slow rounds at \(formatFixed(c.slowStateNanos! / 1e3, digits: 3)) us"
        }
        var expected = try baseProfile.applying(calibration: mixed, bounds: bounds, conditions: conditions, date: String(report.date.prefix(10)),
                                                host: ProcessInfo.processInfo.hostName)
        if mixed != report.costs { expected.description += "; each measured parameter the mix of the host's two speeds seen in the calibration" }
        let reference = report.costs.first { $0.parameter == "CostModel.instructionEmulation" }
        var slow: MachineProfile? = nil
        if reference?.slowStateNanos != nil {
            let slowCosts = priced({ $0.slowStateNanos! }) { _ in "; the host's slow state (its slow-round median)" }
            slow = try baseProfile.applying(calibration: slowCosts, bounds: bounds, conditions: conditions, date: String(report.date.prefix(10)),
                                            host: ProcessInfo.processInfo.hostName)
            slow!.description += "; each parameter that moved between the host's two speeds at its slow-round median"
        }
        return States(profile: profile, report: report, expected: expected, slow: slow,
                      fastReferenceNanos: reference?.medianNanos, slowReferenceNanos: reference?.slowStateNanos)
    }

    /// Several calibrations of this host as one profile: each parameter the median of the
    /// profiles' values (a calibration that landed in one of the host's slow stretches moves
    /// no parameter); name, provenance texts and conditions those of the first.
    public static func median(_ profiles: [MachineProfile]) -> MachineProfile {
        precondition(!profiles.isEmpty, "median of no profiles")
        guard profiles.count > 1 else { return profiles[0] }
        var p = profiles[0]
        for param in ProfileParameter.all { param.set(&p.costs, Validation.median(profiles.map { $0.value(param) })) }
        p.description += "; each parameter the median of \(profiles.count) calibrations taken in one run"
        return p
    }
}

extension MachineProfile {
    /// The profile as the model's machine (the costs, TLB geometry and cost tables).
    var validationMachine: ReproductionMachine {
        ReproductionMachine(name: name, costs: costModel, tlb: tlb, host: costs.host, scheduling: costs.scheduling, dirty: costs.dirty)
    }
}

extension Validation {
    /// The whole `validate` run on this host without a given profile: a calibration before
    /// each round of the repeats (calibrate, all cases, calibrate, all cases, ...), so a slow
    /// stretch of the host moves one calibration of k rather than every prediction; the
    /// prebuilt and dirty-log models use the per-parameter median of the k calibrations
    /// (`HostCalibration.median`), each host and guest-op repeat the calibration just before
    /// it. Returns the results and the median profile.
    public func runCalibrated(quick: Bool, repeats: Int? = nil, progress: @Sendable (String) -> Void) throws
        -> (results: [CaseResult], profile: MachineProfile, calibrations: [MachineProfile], states: [HostCalibration.States]) {
        var calibrations: [MachineProfile] = []
        var states: [HostCalibration.States] = []
        let k = repeats ?? self.repeats
        let results = try runRounds(repeats: k, machineForRound: { r in
            progress("calibrating this host (kvm calibrate\(quick ? " --quick" : ""))\(k > 1 ? ", before repeat \(r + 1)/\(k)" : "")")
            do {
                let st = try HostCalibration.calibrateStates(quick: quick)
                states.append(st)
                calibrations.append(st.expected)
            } catch where !calibrations.isEmpty {
                // A later round's calibration failed (e.g. a benchmark timed out on a loaded
                // host): this round models with the median of those taken so far.
                progress("calibration before repeat \(r + 1) failed (\(error)); this round uses the median of the \(calibrations.count) taken before")
                return HostCalibration.median(calibrations).validationMachine
            }
            return calibrations.last!.validationMachine
        }, modelMachine: { HostCalibration.median(calibrations).validationMachine },
        stateMachines: { HostStateMachines(states) }, progress: progress)
        return (results, HostCalibration.median(calibrations), calibrations, states)
    }
}

/// The model's machines for the host's two speeds over a run's calibrations: the base-speed
/// profiles' median, the slow profiles' median (of the calibrations that saw a slow round) and
/// the CPL0 reference in each state (medians), so a case run bracketed by `HostSpeedBracket`
/// is priced at the share of the slow state its ends show. Nil when no calibration saw the
/// slow state.
struct HostStateMachines {
    var fast: ReproductionMachine
    var slow: ReproductionMachine
    var fastReferenceNanos: Double
    var slowReferenceNanos: Double

    init?(_ states: [HostCalibration.States]) {
        let slows = states.compactMap(\.slow)
        let fastRefs = states.compactMap(\.fastReferenceNanos)
        let slowRefs = states.compactMap(\.slowReferenceNanos)
        guard !slows.isEmpty, !fastRefs.isEmpty, !slowRefs.isEmpty else { return nil }
        fast = HostCalibration.median(states.map(\.profile)).validationMachine
        slow = HostCalibration.median(slows).validationMachine
        fastReferenceNanos = Validation.median(fastRefs)
        slowReferenceNanos = Validation.median(slowRefs)
        guard slowReferenceNanos > fastReferenceNanos else { return nil }
    }

    /// A bracketed run's share of the slow state, between the two states' references.
    func slowShare(_ b: HostSpeedBracket) -> Double { b.slowShare(fastNanos: fastReferenceNanos, slowNanos: slowReferenceNanos) }

    /// `run` priced at both speeds, mixed at `share` (the ledger is linear in the costs).
    func priced(share: Double, _ run: (ReproductionMachine) throws -> ModelSide) rethrows -> ModelSide {
        try run(fast).mixed(with: try run(slow), share: share)
    }
}
