import Foundation
import MemVirtCore
import MemVirtExperiments
import Testing
@testable import MemVirtReport

enum Browser {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path

    static func which(_ name: String) -> String? {
        for dir in (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin").split(separator: ":") {
            let p = "\(dir)/\(name)"
            if FileManager.default.isExecutableFile(atPath: p) { return p }
        }
        return nil
    }

    static var unavailableReason: String? {
        if which("python3") == nil { return "python3 is not on PATH (it drives Chromium over the DevTools pipe)" }
        if ["chromium", "chromium-browser", "google-chrome"].allSatisfy({ which($0) == nil }) {
            return "chromium is not installed (scripts/install-deps installs Debian's chromium where root and apt allow)"
        }
        return nil
    }
    static var reason: String { unavailableReason ?? "" }

    /// Quick runs of every model reproduction (several minutes in a debug build), run once
    /// for both suites below: the second waits on the lock while the first runs them.
    nonisolated(unsafe) static var cached: [ExperimentReport]?
    static let lock = NSLock()
    static func quickReports() throws -> [ExperimentReport] {
        lock.lock()
        defer { lock.unlock() }
        if let c = cached { return c }
        var out: [ExperimentReport] = []
        for e in Reproductions.all {
            out.append(try Reproductions.run(e, quick: true, progress: { _ in }))
        }
        cached = out
        return out
    }
}

@Suite("The HTML report in headless Chromium", .serialized, .enabled(if: Browser.unavailableReason == nil, Comment(rawValue: Browser.reason)))
struct BrowserTests {
    @Test func reportLoadsWithoutErrorsAndEveryChartDraws() throws {
        let sections = try Browser.quickReports().map(\.section)
        let dir = Browser.root + "/.build/browser-report"
        try? FileManager.default.removeItem(atPath: dir)
        try ReportFiles.write(sections, skipped: ["a skipped <reproduction> & its reason"], to: dir)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: Browser.which("python3")!)
        p.arguments = [Browser.root + "/scripts/browser-check.py", dir + "/report.html", Browser.root + "/.build"]
        let pipe = Pipe()
        p.standardOutput = pipe
        try p.run()
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        let out = String(decoding: data, as: UTF8.self)
        let j = try JSONReader.parse(out)
        #expect(p.terminationStatus == 0, "browser-check: \(out)")
        #expect(j["error"] == nil, "browser-check: \(out)")
        #expect(j["console_errors"]?.asArray?.isEmpty == true, "console errors: \(out)")
        #expect(j["sections"]?.asDouble == Double(sections.count))
        let charts = j["charts"]?.asArray ?? []
        #expect(charts.count == sections.map(\.figures.count).reduce(0, +))
        for c in charts {
            let id = c["id"]?.asString ?? "?"
            #expect((c["width"]?.asDouble ?? 0) > 100, "\(id): chart width")
            #expect((c["plot_width"]?.asDouble ?? 0) > 0 && (c["plot_height"]?.asDouble ?? 0) > 0, "\(id): empty drawn area: \(c.rendered())")
            #expect((c["marks"]?.asDouble ?? 0) > 0, "\(id): no marks")
        }
        #expect(FileManager.default.fileExists(atPath: Browser.root + "/.build/report-full.png"))
    }
}

@Suite("Every model reproduction has a chart and a headline", .serialized)
struct ReproductionFigureTests {
    @Test func quickRunsCarryFiguresHeadlinesAndRebuildFromJSON() throws {
        let dir = try tempDir("quick")
        var saved: [JSONValue] = []
        for r in try Browser.quickReports() {
            #expect(!r.figures.isEmpty, "\(r.name): no figure")
            #expect(r.headline != nil, "\(r.name): no headline")
            for f in r.figures {
                #expect(!f.series.isEmpty && f.series.allSatisfy { !$0.points.isEmpty } , "\(r.name)/\(f.id): an empty series")
                #expect(f.series.allSatisfy { $0.points.allSatisfy { $0.y.isFinite && $0.x.isFinite } }, "\(r.name)/\(f.id): a non-finite point")
                #expect(XMLCheck.check(SVGChart.render(f)).error == nil, "\(r.name)/\(f.id): SVG not well-formed")
            }
            saved.append(r.savedJSON)
        }
        // report.json rebuilds the same sections (figures, headline, tables) through `memvirt report`'s loader.
        try JSONValue.object([("schema", "memvirt.reproduce/1"), ("reproductions", .array(saved))]).rendered(pretty: true)
            .write(toFile: dir + "/report.json", atomically: true, encoding: .utf8)
        let r = ReportLoader().load([dir])
        #expect(r.errors.isEmpty && r.warnings.isEmpty, "\(r.errors) \(r.warnings)")
        #expect(r.sections.count == Reproductions.all.count)
        for (s, e) in zip(r.sections, Reproductions.all) {
            #expect(s.name == e.name)
            #expect(!s.figures.isEmpty && s.headline != nil && !s.tables.isEmpty, "\(s.name) did not rebuild")
        }
    }
}
