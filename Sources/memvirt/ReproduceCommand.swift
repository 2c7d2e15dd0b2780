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

    @Option(name: .long, help: "model (default) or kvm: which engine runs the reproduction.")
    var engine: String = "model"

    @Flag(name: .long, help: "Smaller runs (for a quick look).")
    var quick = false

    @Flag(name: .long, help: "No progress on stderr.")
    var quiet = false

    func run() throws {
        let pool: [any Experiment.Type]
        switch engine {
        case "model": pool = Reproductions.all
        case "kvm": pool = Reproductions.kvm
        default: throw ValidationError("engine '\(engine)': use model or kvm")
        }
        let chosen: [any Experiment.Type]
        if let n = name {
            guard let e = pool.first(where: { $0.name == n }) else {
                let names = pool.map { $0.name }
                throw ValidationError("no \(engine) reproduction named '\(n)'; there are: \(names.isEmpty ? "none yet" : names.joined(separator: ", "))")
            }
            chosen = [e]
        } else {
            chosen = pool
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
