import ArgumentParser
import Foundation
import MemVirtCore
import MemVirtExperiments

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

    @Flag(name: .long, help: "Smaller runs (for a quick look).")
    var quick = false

    @Flag(name: .long, help: "No progress on stderr.")
    var quiet = false

    func run() throws {
        let chosen: [any Experiment.Type]
        if let n = name {
            guard let e = Reproductions.named(n) else {
                throw ValidationError("no reproduction named '\(n)'; there are: \(Reproductions.names.joined(separator: ", "))")
            }
            chosen = [e]
        } else {
            chosen = Reproductions.all
        }
        let showProgress = !quiet
        var reports: [JSONValue] = []
        for e in chosen {
            let report = try Reproductions.run(e, quick: quick) { msg in
                if showProgress { FileHandle.standardError.write(Data("  \(msg)\n".utf8)) }
            }
            if json { reports.append(report.json) } else { print(report.text) }
        }
        if json { print((chosen.count == 1 ? reports[0] : .object([("schema", "memvirt.reproduce/1"), ("reproductions", .array(reports))])).rendered()) }
    }
}
