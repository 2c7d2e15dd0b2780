import ArgumentParser
import Foundation
import MemVirtConfig
import MemVirtCore
import MemVirtReport

/// `memvirt profile ...`: machine profiles (CPU, TLBs, costs with their sources).
struct ProfileCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "profile", abstract: "Machine profiles: list the built-in ones, print one as TOML, compare two.",
        subcommands: [ProfileListCommand.self, ProfileShowCommand.self, ProfileDiffCommand.self])
}

struct ProfileListCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "list", abstract: "The built-in profiles.")

    @Flag(name: .long, help: "Print one JSON object on stdout.")
    var json = false

    func run() throws {
        try reportingErrors(json: json) {
            let all = try MachineProfile.builtIn()
            if json {
                print(JSONValue.object([("profiles", .array(all.map { p in
                    .object([("name", .string(p.name)), ("origin", .string(p.origin.rawValue)), ("date", .string(p.date)),
                             ("cpu", .string(p.cpuModel)), ("clock_ghz", .double(p.clockGHz)), ("description", .string(p.description))])
                }))]).rendered())
                return
            }
            var t = TextTable(header: ["name", "cpu", "GHz", "date"])
            for p in all { t.add([p.name, p.cpuModel, formatFixed(p.clockGHz, digits: 1), p.date]) }
            print(t.rendered)
            for p in all { print("\(p.name): \(p.description)") }
            print("`memvirt profile show NAME` prints one with every source; `--profile NAME|FILE` on run and reproduce uses it.")
        }
    }
}

struct ProfileShowCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "show", abstract: "Print a profile (a built-in name or a file) as TOML.")

    @Argument(help: "A built-in profile's name or a profile file.")
    var profile: String

    func run() throws {
        try reportingErrors(json: false) {
            if let text = MachineProfile.builtInText(profile) {
                print(text, terminator: "")
            } else {
                print(try MachineProfile.load(profile).toTOML(), terminator: "")
            }
        }
    }
}

struct ProfileDiffCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "diff",
        abstract: "Compare two profiles: per measured parameter both medians and the relative change (all differing parameters when neither was measured).")

    @Argument(help: "The first profile (name or file).")
    var a: String

    @Argument(help: "The second profile (name or file).")
    var b: String

    @Option(name: .long, help: "Largest relative change counted as agreement, e.g. 0.15 for 15%.")
    var threshold: Double = 0.15

    @Flag(name: .long, help: "Print one JSON object on stdout.")
    var json = false

    func run() throws {
        var agree = true
        try reportingErrors(json: json) {
            guard threshold.isFinite, threshold >= 0 else { throw CLIError("--threshold \(threshold): use a fraction >= 0, e.g. 0.15") }
            let pa = try MachineProfile.load(a), pb = try MachineProfile.load(b)
            let all = MachineProfile.diff(pa, pb)
            let anyMeasured = all.contains { $0.measuredInEither }
            let rows = anyMeasured ? all.filter(\.measuredInEither) : all.filter { $0.a != $0.b }
            agree = rows.allSatisfy { $0.agrees(threshold: threshold) }
            let measuredRows = rows.filter { !$0.boundInEither }, boundRows = rows.filter(\.boundInEither)
            // The hosts' speeds while each calibration ran (their reference figures).
            let speed: Double? = {
                guard let ca = pa.conditions, let cb = pb.conditions else { return nil }
                return CalibrationConditions.speedRatio(ca, cb)
            }()
            let speedNote: String? = speed.map { r in
                let ca = pa.conditions!, cb = pb.conditions!
                let same = abs(r - 1) <= threshold / 2
                return "host reference (\(ca.reference)): a \(formatFixed(ca.referenceNanos, digits: 1)) ns (rounds \(formatFixed(ca.referenceRoundMinNanos, digits: 1))-\(formatFixed(ca.referenceRoundMaxNanos, digits: 1)), steal \(formatFixed(ca.stealPercent, digits: 2))%, load \(formatFixed(ca.loadAverage, digits: 2))), b \(formatFixed(cb.referenceNanos, digits: 1)) ns (rounds \(formatFixed(cb.referenceRoundMinNanos, digits: 1))-\(formatFixed(cb.referenceRoundMaxNanos, digits: 1)), steal \(formatFixed(cb.stealPercent, digits: 2))%, load \(formatFixed(cb.loadAverage, digits: 2))): b/a \(formatFixed(r, digits: 3))"
                    + (same ? ", the same host speed" : ": THE TWO RUNS WERE TAKEN AT DIFFERENT HOST SPEEDS (medians are not normalized)")
                    + (CalibrationConditions.hostLoopRatio(ca, cb).map { l in
                        "\nhost CPU loop (native, ALU only): a \(formatFixed(ca.hostLoopNanos / 1e3, digits: 1)) us, b \(formatFixed(cb.hostLoopNanos / 1e3, digits: 1)) us: b/a \(formatFixed(l, digits: 3))"
                            + (abs(l - 1) <= 0.02 && !same ? ": the host's CPU clock did not change; its virtualization and memory path did" : "")
                    } ?? "")
            }
            if json {
                print(JSONValue.object([
                    ("a", pa.summaryJSON), ("b", pb.summaryJSON), ("threshold", .double(threshold)),
                    ("compared", .string(anyMeasured ? "measured" : "differing")),
                    ("parameters", .array(rows.map { r in
                        .object([("parameter", .string(r.parameter)), ("unit", .string(r.unit)), ("a", .double(r.a)), ("b", .double(r.b)),
                                 ("relative_change", r.relativeChange.isFinite ? .double(r.relativeChange) : .null),
                                 ("measured_in_both", .bool(r.measuredInBoth)),
                                 ("compared_by", .string(r.boundInEither ? "bound" : "relative_change")),
                                 ("a_upper_ns", r.aUpper.map { .double($0) } ?? .null), ("b_upper_ns", r.bUpper.map { .double($0) } ?? .null),
                                 ("within_threshold", r.boundInEither ? .null : .bool(abs(r.relativeChange) <= threshold)),
                                 ("bounds_consistent", r.boundInEither ? .bool(r.boundsConsistent) : .null),
                                 ("agrees", .bool(r.agrees(threshold: threshold)))])
                    })),
                    ("measured_compared", .int(Int64(measuredRows.count))),
                    ("measured_within_threshold", .int(Int64(measuredRows.filter { $0.agrees(threshold: threshold) }.count))),
                    ("bounded_compared", .int(Int64(boundRows.count))),
                    ("bounded_consistent", .int(Int64(boundRows.filter(\.boundsConsistent).count))),
                    ("a_conditions", pa.conditions?.json ?? .null), ("b_conditions", pb.conditions?.json ?? .null),
                    ("host_speed_ratio", speed.map { .double($0) } ?? .null),
                    ("host_loop_ratio", { () -> JSONValue in
                        guard let ca = pa.conditions, let cb = pb.conditions, let l = CalibrationConditions.hostLoopRatio(ca, cb) else { return .null }
                        return .double(l)
                    }()),
                    ("same_host_speed", speed.map { .bool(abs($0 - 1) <= threshold / 2) } ?? .null),
                    ("all_within_threshold", .bool(agree)),
                ]).rendered())
                return
            }
            print("a: \(pa.name) (\(pa.origin.rawValue), \(pa.date))  b: \(pb.name) (\(pb.origin.rawValue), \(pb.date))")
            print(anyMeasured ? "measured parameters (medians in ns where both measured):" : "parameters that differ:")
            var t = TextTable(header: ["parameter", "unit", "a", "b", "change"])
            for r in measuredRows {
                let change = r.relativeChange.isFinite ? (r.relativeChange >= 0 ? "+" : "") + formatFixed(100 * r.relativeChange, digits: 1) + "%" : "new"
                t.add([r.parameter, r.unit, formatFixed(r.a, digits: 1), formatFixed(r.b, digits: 1), change + (r.agrees(threshold: threshold) ? "" : " *")])
            }
            print(t.rendered)
            let pct = formatFixed(100 * threshold, digits: 0)
            print(measuredRows.allSatisfy { $0.agrees(threshold: threshold) } ? "all \(measuredRows.count) within \(pct)%"
                : "\(measuredRows.filter { !$0.agrees(threshold: threshold) }.count) of \(measuredRows.count) differ by more than \(pct)% (marked *)")
            if !boundRows.isEmpty {
                print("bounded (below the resolution of the measurements they are derived from; estimate, at most; checked: each side within the other's bound):")
                var bt = TextTable(header: ["parameter", "a (ns)", "b (ns)", "bounds"])
                func side(_ v: Double, _ u: Double?) -> String { formatFixed(v, digits: 1) + (u.map { " <= " + formatFixed($0, digits: 1) } ?? " (measured)") }
                for r in boundRows {
                    bt.add([r.parameter, side(r.a, r.aUpper), side(r.b, r.bUpper), r.boundsConsistent ? "consistent" : "INCONSISTENT *"])
                }
                print(bt.rendered)
                print("\(boundRows.filter(\.boundsConsistent).count) of \(boundRows.count) bounds consistent")
            }
            if let n = speedNote { print(n) }
        }
        if !agree { throw ExitCode(2) }
    }
}
