import ArgumentParser
import Foundation
import MemVirtConfig
import MemVirtCore
import MemVirtExperiments
import MemVirtKVM

/// `memvirt validate`: the model's counters and predicted time beside real KVM's, case by case
/// (the `Validation` experiment; `reproduce validate --engine kvm` prints the same report).
struct ValidateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "validate",
        abstract: "Run each validation case on /dev/kvm and in the model: every shared counter and the predicted time beside KVM's.",
        discussion: """
            Deterministic counters (pf_fixed, pf_guest, pf_emulate, mmu_pte_write, invlpg, dirty pages) must be within 2% \
            of KVM's, the predicted time of the measured phase within 20%. Needs a usable /dev/kvm.
            """)

    @Flag(name: .long, help: "Smaller cases (4 MiB, 100,000 accesses; under a minute).")
    var quick = false

    @Option(name: .long, help: "Runs of each case's KVM side, round-robin over the cases; the measured time is their median (default: \(Validation.fullRepeats), 1 with --quick).")
    var repeats: Int?

    @Option(name: .customLong("case"), help: "Run only this case (repeatable; default: all). An unknown name lists the cases.")
    var cases: [String] = []

    @Option(name: .long, help: "Machine profile (name or file) whose costs and clock the model uses (default: this host calibrated now by `kvm calibrate`, quick with --quick; see `memvirt profile list`).")
    var profile: String?

    @Flag(name: .long, help: "Print one JSON object on stdout.")
    var json = false

    @Flag(name: .long, help: "No progress on stderr.")
    var quiet = false

    func run() throws {
        try reportingErrors(json: json) {
            let k = repeats ?? Validation.repeats(quick: quick)
            guard k >= 1 && k <= 50 else { throw CLIError("--repeats: \(k) is out of range (allowed: 1...50)") }
            if let why = KVM.unavailableReason { throw CLIError("validate needs a usable /dev/kvm: \(why)") }
            let showProgress = !quiet
            let progress: @Sendable (String) -> Void = { msg in
                if showProgress { FileHandle.standardError.write(Data("  \(msg)\n".utf8)) }
            }
            let machine: MachineProfile
            let results: [Validation.CaseResult]
            var calibrations: [MachineProfile] = []
            var states: [HostCalibration.States] = []
            if let profile {
                machine = try MachineProfile.load(profile)
                results = try Validation(quick: quick, only: cases).runCases(machine: machine.reproductionMachine, repeats: k, progress: progress)
            } else {
                // The model's costs measured on this host in this run (a calibration before
                // each round of the repeats, their per-parameter median), never fitted to the cases.
                let run = try Validation(quick: quick, only: cases).runCalibrated(quick: quick, repeats: k, progress: progress)
                results = run.results
                machine = run.profile
                calibrations = run.calibrations
                states = run.states
            }
            // The profile's summary and every cost the model used (cycles, nanoseconds or counts as
            // the profile's units), so a run's prediction can be traced to its calibration.
            var profileJSON = machine.summaryJSON
            if case .object(var kv) = profileJSON {
                kv.append(("clock_ghz", .double(machine.clockGHz)))
                kv.append(("costs", .object(ProfileParameter.all.map { ($0.section + "." + $0.key, .double(machine.value($0))) })))
                if calibrations.count > 1 {
                    // Each calibration's value of every parameter, in round order (the costs above are their medians).
                    kv.append(("calibrations", .object(ProfileParameter.all.map { p in (p.section + "." + p.key, .array(calibrations.map { .double($0.value(p)) })) })))
                }
                if !states.isEmpty {
                    // Each calibration at the host's base speed and in its slow state (null: no
                    // slow round), with the CPL0 reference of each: what the workload cases mix.
                    kv.append(("calibration_states", .array(states.map { st in
                        .object([
                            ("cpl0_reference_base_ns", st.fastReferenceNanos.map { .double($0) } ?? .null),
                            ("cpl0_reference_slow_ns", st.slowReferenceNanos.map { .double($0) } ?? .null),
                            ("base", .object(ProfileParameter.all.map { p in (p.section + "." + p.key, .double(st.profile.value(p))) })),
                            ("slow", st.slow.map { s in .object(ProfileParameter.all.map { p in (p.section + "." + p.key, .double(s.value(p))) }) } ?? .null),
                        ])
                    })))
                }
                profileJSON = .object(kv)
            }
            let report = Validation.report(results, profile: profileJSON)
            print(json ? report.json.rendered() : report.text)
        }
    }
}
