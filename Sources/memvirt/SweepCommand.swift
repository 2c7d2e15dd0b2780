import ArgumentParser
import Foundation
import MemVirtCore
import MemVirtExperiments
import MemVirtReport

#if canImport(Glibc)
import Glibc
#endif

/// `memvirt sweep`: a grid of model runs from a sweep file, on this machine or as a Slurm job
/// array, merged into one CSV. The mechanisms live in MemVirtExperiments/Sweep.
struct SweepCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sweep", abstract: "Run a grid of scenarios (a sweep file) locally or as a Slurm job array.",
        discussion: "See docs/sweeps.md for the sweep file format.",
        subcommands: [SweepPlanCommand.self, SweepRunCommand.self, SweepLocalCommand.self, SweepSlurmCommand.self,
                      SweepStatusCommand.self, SweepMergeCommand.self]
    )

    /// THE call that runs one point: the same code path as `memvirt run --config FILE`, in a
    /// child process of this binary (a crash or a bad value fails that point only, and its
    /// stderr becomes `<ID>.err`). When the strict library `Scenario` type lands, this stays
    /// as is (or becomes an in-process call with the same contract: JSON on stdout).
    static func pointCommand(executable: String) -> @Sendable (String) -> [String] {
        { scenarioPath in [executable, "run", "--config", scenarioPath, "--json", "--quiet"] }
    }

    /// This binary's absolute path (what child processes and Slurm tasks run).
    static func executable() -> String {
        if let p = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe") { return p }
        return absolute(CommandLine.arguments[0])
    }

    static func absolute(_ path: String) -> String {
        if path.hasPrefix("/") { return path }
        return FileManager.default.currentDirectoryPath + "/" + path
    }

    static func plan(_ file: String) throws -> SweepPlan {
        do { return try SweepPlan(file: try SweepFile.load(path: file)) } catch let e as InputError { throw CLIError(e.message) }
    }

    static func runner(_ plan: SweepPlan, out: String) throws -> SweepRunner {
        do {
            return try SweepRunner(plan: plan, out: out, command: pointCommand(executable: executable()))
        } catch let e as InputError { throw CLIError(e.message) }
    }

    /// Runs `body`; with `json`, an error becomes `{"error": ...}` on stdout and exit status 1.
    static func reporting(json: Bool, _ body: () throws -> Void) throws {
        guard json else { return try body() }
        do {
            try body()
        } catch let e as ExitCode {
            throw e
        } catch {
            let message = (error as? CLIError)?.description ?? (error as? InputError)?.message ?? "\(error)"
            print(JSONValue.object([("error", .string(message))]).rendered())
            throw ExitCode(1)
        }
    }

    static func describe(_ o: SweepRunner.Outcome) -> String {
        switch o {
        case .ran: return "done"
        case .present: return "present (skipped)"
        case .busy: return "running elsewhere (skipped)"
        case .failed(let why): return "FAILED: \(why)"
        }
    }
}

struct SweepPlanCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "plan", abstract: "List a sweep's points with their stable IDs.")
    @Argument(help: "The sweep file (TOML).") var file: String
    @Flag(name: .long, help: "Print one JSON object on stdout.") var json = false
    @Flag(name: .long, help: "Also print each point's scenario TOML.") var scenarios = false

    func run() throws {
        try SweepCommand.reporting(json: json) {
            let plan = try SweepCommand.plan(file)
            if json {
                print(plan.json.rendered())
                return
            }
            var t = TextTable(title: "\(plan.points.count) points (\(plan.excludedCount) excluded)", header: ["index", "id"] + plan.axes.map(\.key))
            for p in plan.points { t.add([String(p.index), p.id] + p.values.map(\.description)) }
            print(t.rendered, terminator: "")
            if scenarios {
                for p in plan.points { print("\n# \(p.index) \(p.id)\n\(p.scenario)", terminator: "") }
            }
        }
    }
}

struct SweepRunCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run", abstract: "Run one point (--point ID) or a range (--points A-B) into DIR, skipping points already done.")
    @Argument(help: "The sweep file (TOML).") var file: String
    @Option(name: .long, help: "A point's ID (from `sweep plan`).") var point: String?
    @Option(name: .long, help: "Point indices A-B (0-based, inclusive), run in order.") var points: String?
    @Option(name: .long, help: "The result directory.") var out: String
    @Option(name: .customLong("plan-digest"), help: "Refuse to run unless the plan's digest (sweep plan --json) is this one (sbatch scripts pass it).")
    var planDigest: String?
    @Flag(name: .long, help: "No line per point on stderr.") var quiet = false

    func validate() throws {
        guard (point == nil) != (points == nil) else { throw ValidationError("give --point ID or --points A-B") }
    }

    func run() throws {
        let plan = try SweepCommand.plan(file)
        let selected: [SweepPoint]
        do {
            if let d = planDigest { try plan.check(digest: d) }
            if let id = point { selected = [try plan.point(id: id)] } else { selected = Array(try plan.points(range: points!)) }
        } catch let e as InputError { throw CLIError(e.message) }
        let runner = try SweepCommand.runner(plan, out: out)
        let outcomes: [SweepRunner.Outcome]
        do {
            outcomes = try runner.runSequentially(selected) { p, o in
                if !quiet { printError("sweep: \(p.index) \(p.id): \(SweepCommand.describe(o))") }
            }
        } catch let e as InputError { throw CLIError(e.message) }
        let failed = outcomes.filter { if case .failed = $0 { return true }; return false }.count
        if failed > 0 {
            printError("sweep run: \(failed) of \(outcomes.count) points failed (their stderr is in \(out)/<ID>.err)")
            throw ExitCode(1)
        }
    }
}

struct SweepLocalCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "local", abstract: "Run every missing point on this machine, N processes at once.")
    @Argument(help: "The sweep file (TOML).") var file: String
    @Option(name: .long, help: "The result directory.") var out: String
    @Option(name: .long, help: "Processes at once (default: the number of cores).") var jobs: Int?
    @Flag(name: .long, help: "No line per point on stderr.") var quiet = false

    func run() throws {
        let n = jobs ?? ProcessInfo.processInfo.activeProcessorCount
        guard n >= 1 else { throw CLIError("jobs \(n): at least 1") }
        let plan = try SweepCommand.plan(file)
        let runner = try SweepCommand.runner(plan, out: out)
        let start = Date()
        var done = 0
        let outcomes: [SweepRunner.Outcome]
        do {
            outcomes = try runner.runLocal(jobs: n) { p, o in
                done += 1
                if !quiet { printError("sweep: [\(done)/\(plan.points.count)] \(p.index) \(p.id): \(SweepCommand.describe(o))") }
            }
        } catch let e as InputError { throw CLIError(e.message) }
        let count = { (f: (SweepRunner.Outcome) -> Bool) in outcomes.filter(f).count }
        let ran = count { $0 == .ran }, present = count { $0 == .present }, busy = count { $0 == .busy }
        let failed = count { if case .failed = $0 { return true }; return false }
        print("sweep local: \(plan.points.count) points: \(ran) ran, \(present) already present, \(busy) running elsewhere, \(failed) failed; \(formatFixed(Date().timeIntervalSince(start), digits: 2)) s with \(n) jobs")
        if failed > 0 { throw ExitCode(1) }
    }
}

struct SweepSlurmCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "slurm", abstract: "Write an sbatch script for a job array over the sweep (and submit it with --submit).")
    @Argument(help: "The sweep file (TOML); must be readable at the same path on the compute nodes.") var file: String
    @Option(name: .long, help: "The result directory (shared with the compute nodes).") var out: String
    @Option(name: .long, help: "Slurm partition.") var partition: String?
    @Option(name: .long, help: "Points per array task.") var chunk: Int = 1
    @Option(name: .long, help: "Time limit per task, as sbatch --time takes it.") var time: String?
    @Option(name: .long, help: "At most this many tasks at once (--array=...%N).") var throttle: Int?
    @Flag(name: .long, help: "Run sbatch and print the job id.") var submit = false

    func run() throws {
        let plan = try SweepCommand.plan(file)
        do {
            let array = try SlurmArray(
                executable: SweepCommand.executable(), sweepFile: SweepCommand.absolute(file), out: SweepCommand.absolute(out),
                count: plan.points.count, planDigest: plan.digest, chunk: chunk, partition: partition, time: time, throttle: throttle)
            let path = try array.write()
            guard submit else {
                print("sweep slurm: wrote \(path) (\(plan.points.count) points, \(array.tasks) array tasks); submit with: sbatch \(path)")
                return
            }
            print(try SlurmArray.submit(script: path))
        } catch let e as InputError { throw CLIError(e.message) }
    }
}

struct SweepStatusCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "status", abstract: "Count done, failed and missing points.")
    @Argument(help: "The sweep file (TOML).") var file: String
    @Option(name: .long, help: "The result directory.") var out: String
    @Flag(name: .long, help: "Print one JSON object on stdout.") var json = false

    func run() throws {
        try SweepCommand.reporting(json: json) {
            let plan = try SweepCommand.plan(file)
            let s = SweepStatus(plan: plan, out: out)
            if json {
                print(s.json.rendered())
                return
            }
            print("\(plan.points.count) points: \(s.done.count) done, \(s.failed.count) failed, \(s.missing.count) missing (\(s.running.count) running now)")
            for p in s.failed { print("failed  \(p.index) \(p.id)  (\(out)/\(p.id).err)") }
            if !s.stray.isEmpty { print("\(s.stray.count) result files are not points of this plan: \(s.stray.prefix(5).joined(separator: ", "))") }
        }
    }
}

struct SweepMergeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "merge", abstract: "Merge a sweep's results into one CSV (a row per point) and text tables.")
    @Argument(help: "The result directory.") var dir: String
    @Option(name: .long, help: "Write sweep.csv and sweep.txt here (default: print the CSV).") var out: String?

    func run() throws {
        let merged: (csv: String, tables: [TextTable], figures: [Figure])
        do { merged = try SweepMerge.load(directory: dir) } catch let e as InputError { throw CLIError(e.message) }
        guard let out else {
            print(merged.csv, terminator: "")
            return
        }
        do {
            try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
            try merged.csv.write(toFile: "\(out)/sweep.csv", atomically: true, encoding: .utf8)
            let text = merged.tables.map(\.rendered).joined(separator: "\n")
            try text.write(toFile: "\(out)/sweep.txt", atomically: true, encoding: .utf8)
        } catch {
            throw CLIError("cannot write to '\(out)': \(error.localizedDescription)")
        }
        print("sweep merge: \(out)/sweep.csv (\(merged.csv.split(separator: "\n").count - 1) rows), \(out)/sweep.txt (\(merged.tables.count) tables); \(merged.figures.count) figures for `memvirt report`")
    }
}
