import ArgumentParser
import Foundation
import MemVirtCore
import MemVirtExperiments
import MemVirtReport

/// `memvirt report PATH... [--out DIR]`: the HTML page and CSV files rebuilt from saved
/// report.json files (or folders holding one), merging repeated runs of a reproduction.
struct ReportCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "report",
        abstract: "Rebuild the HTML report and CSV files from saved report.json files, merging repeated runs.",
        discussion: """
            Each PATH is a report.json written by `memvirt reproduce` (or printed by `memvirt \
            reproduce NAME --json`), or a folder holding one. Runs of the same reproduction \
            (and engine) merge into one section: table rows keyed by their non-numeric cells get \
            mean, min and max columns and a runs column; chart points get the mean and a \
            min-max whisker. An unreadable or malformed input is named on stderr and the rest \
            is still reported; the exit status is then 1.
            """)

    @Argument(help: "report.json files, folders holding one, or a sweep's result folder (memvirt sweep --out DIR).")
    var paths: [String]

    @Option(name: .long, help: "Folder for report.html and <reproduction>/<table>.csv.")
    var out: String = "reports/merged"

    func run() throws {
        // Sweep results (a folder of one JSON per point, `memvirt sweep`) are read by the sweep's merge.
        let loader = ReportLoader(directoryReaders: [SweepMerge.reportReader], derive: ReproductionFigures.derive)
        let r = loader.load(paths)
        for w in r.warnings { printError("report: warning: \(w)") }
        for e in r.errors { printError("report: error: \(e)") }
        if r.sections.isEmpty {
            throw CLIError("no report could be read from \(paths.joined(separator: ", "))")
        }
        // Saved before reports named every engine: validate and the QEMU comparison had none.
        let sections = r.sections.map { s in
            var s = s
            if s.engine == "model" { s.engine = ExperimentReport.implicitEngine(s.name) }
            return s
        }
        let merged = ReportMerge.merge(sections)
        var skipped: [String] = []
        for s in r.skipped where !skipped.contains(s) { skipped.append(s) }
        let inputs = paths.count - r.errors.filter { e in paths.contains { e.hasPrefix($0 + ":") } }.count
        let footer = "Rebuilt by `memvirt report` from \(inputs) input(s): \(paths.joined(separator: ", "))."
        var files = try ReportFiles.write(merged, skipped: skipped, to: out, footer: footer)
        // A sweep's one CSV: a row per point, a column per axis and per counter.
        for s in merged where s.name.hasPrefix("sweep-") {
            for dir in s.sources {
                guard let m = try? SweepMerge(directory: dir) else { continue }
                let path = "\(out)/\(s.id)/points.csv"
                try FileManager.default.createDirectory(atPath: "\(out)/\(s.id)", withIntermediateDirectories: true)
                try m.csv.write(toFile: path, atomically: true, encoding: .utf8)
                files.append(path)
            }
        }
        printError("report: \(out)/report.html and \(files.count - 1) CSV files (\(merged.count) reproductions from \(r.sections.count) runs)")
        if !r.errors.isEmpty { throw ExitCode(1) }
    }
}
