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
            agree = rows.allSatisfy { abs($0.relativeChange) <= threshold }
            if json {
                print(JSONValue.object([
                    ("a", pa.summaryJSON), ("b", pb.summaryJSON), ("threshold", .double(threshold)),
                    ("compared", .string(anyMeasured ? "measured" : "differing")),
                    ("parameters", .array(rows.map { r in
                        .object([("parameter", .string(r.parameter)), ("unit", .string(r.unit)), ("a", .double(r.a)), ("b", .double(r.b)),
                                 ("relative_change", r.relativeChange.isFinite ? .double(r.relativeChange) : .null),
                                 ("measured_in_both", .bool(r.measuredInBoth)), ("within_threshold", .bool(abs(r.relativeChange) <= threshold))])
                    })),
                    ("all_within_threshold", .bool(agree)),
                ]).rendered())
                return
            }
            print("a: \(pa.name) (\(pa.origin.rawValue), \(pa.date))  b: \(pb.name) (\(pb.origin.rawValue), \(pb.date))")
            print(anyMeasured ? "measured parameters (medians in ns where both measured):" : "parameters that differ:")
            var t = TextTable(header: ["parameter", "unit", "a", "b", "change"])
            for r in rows {
                let change = r.relativeChange.isFinite ? (r.relativeChange >= 0 ? "+" : "") + formatFixed(100 * r.relativeChange, digits: 1) + "%" : "new"
                t.add([r.parameter, r.unit, formatFixed(r.a, digits: 1), formatFixed(r.b, digits: 1), change + (abs(r.relativeChange) <= threshold ? "" : " *")])
            }
            print(t.rendered)
            print(agree ? "all \(rows.count) within \(formatFixed(100 * threshold, digits: 0))%"
                : "\(rows.filter { abs($0.relativeChange) > threshold }.count) of \(rows.count) differ by more than \(formatFixed(100 * threshold, digits: 0))% (marked *)")
        }
        if !agree { throw ExitCode(2) }
    }
}
