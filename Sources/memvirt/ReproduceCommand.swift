import ArgumentParser
import Foundation
import MemVirtConfig
import MemVirtCore
import MemVirtExperiments
import MemVirtKVM
import MemVirtModel
import MemVirtReport

/// `memvirt reproduce [NAME]`: the seed reproductions, a table each (or one JSON object).
struct ReproduceCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "reproduce",
        abstract: "Run the seed reproductions (all, or one by name) and print a table each.",
        discussion: "Reproductions: " + Reproductions.all.map { "\($0.name) (\($0.summary))" }.joined(separator: "; "))

    @Argument(help: "A reproduction's name; all of them when omitted.")
    var name: String?

    @Flag(name: .long, help: "Print one JSON object on stdout.")
    var json = false

    @Option(name: .long, help: "model or kvm: which engine runs the reproduction (default: model for a named one; both for all, kvm where /dev/kvm is usable).")
    var engine: String?

    @Option(name: .long, help: "Folder for the report files (report.json, report.html) when running them all; '-' for none.")
    var out: String = "reports"

    @Flag(name: .long, help: "Run the reproduction's sweep (NAME-sweep), where it has one.")
    var sweep = false

    @Option(name: .long, help: "vCPUs for `apf --engine kvm` (default: one per host core).")
    var vcpus: Int?

    @Flag(name: .long, help: "Smaller runs (for a quick look).")
    var quick = false

    @Flag(name: .long, help: "No progress on stderr.")
    var quiet = false

    @Option(name: .long, help: "Machine profile (name or file) for the model rows that describe this host (default: this host calibrated now where /dev/kvm is usable, else pvm-shadow; see `memvirt profile list`).")
    var profile: String?

    @Flag(name: .customLong("vs-qemu"), help: "With `migration --engine kvm`: the same multiboot guest under MemVirt and qemu-system-x86_64, side by side.")
    var vsQemu = false

    func run() throws {
        try reportingErrors(json: json) {
            if let m = try thisHostProfile() {
                try Reproductions.$thisHost.withValue(m.reproductionMachine) { try runAll(profile: m) }
            } else {
                try runAll(profile: nil)
            }
        }
    }

    /// The profile of the model rows that describe this host: `--profile`; else, where /dev/kvm
    /// is usable, this host calibrated now (`kvm calibrate --quick`); else the built-in default
    /// (nil).
    func thisHostProfile() throws -> MachineProfile? {
        if let profile { return try MachineProfile.load(profile) }
        guard KVM.unavailableReason == nil else { return nil }
        if !quiet { printError("reproduce: calibrating this host (kvm calibrate --quick) for the model rows that describe it") }
        return try HostCalibration.calibrate(quick: true).profile
    }

    func runAll(profile machine: MachineProfile?) throws {
        if vsQemu { return try runVersusQEMU() }
        let pool: [any Experiment.Type]
        var skipped: [String] = []
        switch engine {
        case "model": pool = Reproductions.all
        case "kvm": pool = Reproductions.kvm + Reproductions.crossEngine
        case nil:
            if name != nil {
                pool = Reproductions.all
            } else if let why = KVM.unavailableReason {
                pool = Reproductions.all
                skipped = (Reproductions.kvm + Reproductions.crossEngine).map { "\($0.name) --engine kvm: skipped (\(why))" }
            } else {
                pool = Reproductions.all + Reproductions.kvm.filter { !$0.name.hasSuffix("-sweep") } + Reproductions.crossEngine
            }
        default: throw CLIError("engine '\(engine!)': use model or kvm")
        }
        let engine = self.engine ?? "model"
        let chosen: [any Experiment.Type]
        if let n0 = name {
            let n = sweep ? n0 + "-sweep" : n0
            if sweep && !pool.contains(where: { $0.name == n }) {
                throw CLIError("'\(n0)' has no sweep on the \(engine) engine")
            }
            guard let e = pool.first(where: { $0.name == n }) else {
                let names = pool.map { $0.name }
                throw CLIError("no \(engine) reproduction named '\(n)'; there are: \(names.isEmpty ? "none yet" : names.joined(separator: ", "))")
            }
            chosen = [e]
        } else {
            chosen = pool
        }
        let showProgress = !quiet
        var reports: [ExperimentReport] = []
        if let v = vcpus {
            guard engine == "kvm", chosen.allSatisfy({ $0 == KVMAsyncPageFaults.self || $0 == KVMAsyncPageFaultsSweep.self }) else {
                throw CLIError("--vcpus applies to `apf --engine kvm` only (the model engine and the other reproductions ignore it)")
            }
            guard (1...GuestLayout.maxVCPUs).contains(v) else { throw CLIError("--vcpus \(v): the KVM engine runs 1...\(GuestLayout.maxVCPUs) vCPUs") }
        }
        // Progress on stderr only: one line updated in place on a terminal, plain lines
        // otherwise; stdout is flushed after each table so the two never interleave in a file.
        let line = ProgressLine(total: chosen.count)
        for (i, e) in chosen.enumerated() {
            if showProgress { line.begin(i + 1, e.name + (engine == "kvm" ? " (kvm)" : "")) }
            let progress: @Sendable (String) -> Void = { msg in
                if showProgress { line.update(msg) }
            }
            let report: ExperimentReport
            if let v = vcpus, engine == "kvm", e == KVMAsyncPageFaults.self || e == KVMAsyncPageFaultsSweep.self {
                report = try KVMAsyncPageFaults(quick: quick, sweep: e == KVMAsyncPageFaultsSweep.self, vcpus: v).run(progress: progress)
            } else {
                report = try Reproductions.run(e, quick: quick, progress: progress)
            }
            if showProgress { line.end(); line.clear() }
            reports.append(report)
            if !json {
                print(report.text)
                fflush(nil)  // stdout: tables reach a shared file before the next progress line
            }
        }
        for s in skipped { printError(s) }
        let thisHost: JSONValue = machine?.summaryJSON
            ?? .object([("name", .string(Reproductions.thisHost.name)), ("origin", "built-in"), ("date", "2026-11-22")])
        // Each reproduction's JSON plus what rebuilds the page ("title", "tables", "notes",
        // "headline", "figures"): report.json, and `--json`, so `memvirt report` can merge
        // saved runs of one reproduction too.
        let saved: JSONValue = .object([("schema", "memvirt.reproduce/1"), ("profile", thisHost), ("reproductions", .array(reports.map(\.savedJSON))),
                                        ("skipped", .array(skipped.map { .string($0) }))])
        if json {
            if chosen.count == 1, case .object(let kv) = reports[0].savedJSON {
                print(JSONValue.object(kv + [("profile", thisHost)]).rendered())
            } else {
                print(saved.rendered())
            }
        }
        if name == nil && out != "-" {
            try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
            try saved.rendered(pretty: true).write(toFile: out + "/report.json", atomically: true, encoding: .utf8)
            let profileLine = machine.map { "Model rows that describe this host use profile \($0.name) (\($0.origin.rawValue), \($0.date)): \(out)/profile.toml." }
                ?? "Model rows that describe this host use the built-in profile \(Reproductions.thisHost.name) (no usable /dev/kvm to calibrate on)."
            let files = try ReportFiles.write(reports.map(\.section), skipped: skipped, to: out, footer: profileLine)
            // The profile the model's "this host" rows used, beside the report that names it.
            if let machine { try machine.write(to: out + "/profile.toml") }
            printError("report: \(out)/report.html, \(out)/report.json and \(files.count - 1) CSV files in \(out)/<reproduction>/")
        }
    }
}

extension MachineProfile {
    /// The profile as the machine of the reproductions' "this host" rows.
    var reproductionMachine: ReproductionMachine {
        ReproductionMachine(name: name, costs: costModel, tlb: tlb, host: costs.host, scheduling: costs.scheduling, dirty: costs.dirty)
    }
}
