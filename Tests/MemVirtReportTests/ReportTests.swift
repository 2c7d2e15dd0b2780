import Foundation
import MemVirtCore
import Testing
@testable import MemVirtReport

/// An RFC 4180 reader written for the tests (the oracle for the CSV writer).
func parseCSV(_ s: String) -> [[String]] {
    var rows: [[String]] = [], row: [String] = [], field = ""
    var quoted = false
    var it = Array(s.unicodeScalars)[...]
    while let c = it.popFirst() {
        if quoted {
            if c == "\"" {
                if it.first == "\"" { field += "\""; it.removeFirst() } else { quoted = false }
            } else { field.unicodeScalars.append(c) }
        } else if c == "\"" { quoted = true } else if c == "," { row.append(field); field = "" } else if c == "\r" && it.first == "\n" {
            it.removeFirst()
            row.append(field); rows.append(row); row = []; field = ""
        } else { field.unicodeScalars.append(c) }
    }
    if !field.isEmpty || !row.isEmpty { row.append(field); rows.append(row) }
    return rows
}

func tempDir(_ name: String) throws -> String {
    let d = NSTemporaryDirectory() + "memvirt-report-tests-\(name)-\(getpid())"
    try? FileManager.default.removeItem(atPath: d)
    try FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true)
    return d
}

@Suite("CSV and JSON")
struct CSVJSONTests {
    @Test func csvQuoting() {
        #expect(CSV.field("plain") == "plain")
        #expect(CSV.field("a,b") == "\"a,b\"")
        #expect(CSV.field("say \"hi\"") == "\"say \"\"hi\"\"\"")
        #expect(CSV.field("two\nlines") == "\"two\nlines\"")
        var t = TextTable(title: "x", header: ["name", "value, with comma"])
        t.add(["a \"quoted\" one", "1,234,567"])
        t.add(["multi\r\nline", "12.5%"])
        let csv = CSV.table(t)
        #expect(csv.hasSuffix("\r\n"))
        #expect(parseCSV(csv) == [["name", "value, with comma"], ["a \"quoted\" one", "1234567"], ["multi\r\nline", "12.5%"]])
    }

    @Test func jsonRoundTrip() throws {
        let v: JSONValue = .object([("b", 1), ("a", .array([.double(2.5), .string("x\"\\\n\u{1}é😀"), .null, .bool(true), .int(-7)])), ("u", .uint(UInt64.max))])
        let back = try JSONReader.parse(v.rendered(pretty: true))
        #expect(back.rendered() == v.rendered())
        #expect(back.asObject?.map(\.0) == ["b", "a", "u"])
        #expect(try JSONReader.parse("\"\\ud83d\\ude00\"").asString == "😀")
    }

    @Test func jsonErrorsNameLineAndColumn() {
        do {
            _ = try JSONReader.parse("{\n  \"a\": [1, 2,\n  }")
            Issue.record("parsed malformed JSON")
        } catch {
            #expect(error.line == 3)
            #expect(error.column == 3)
        }
        #expect(throws: JSONReader.ParseError.self) { try JSONReader.parse("{\"a\": 1} x") }
        #expect(throws: JSONReader.ParseError.self) { try JSONReader.parse("") }
    }
}

@Suite("memvirt report: loading and merging saved runs")
struct MergeTests {
    /// A saved run of a reproduction "demo" whose measured column and figure depend on `k`.
    static func run(_ k: Double, name: String = "demo") -> JSONValue {
        var t = TextTable(title: "Demo table", header: ["case", "size", "cycles", "share"])
        t.add(["a", "4K", formatGrouped(UInt64(1000 * k)), formatFixed(10 * k, digits: 1) + "%"])
        t.add(["b", "2M", formatGrouped(UInt64(2000 * k)), formatFixed(20 * k, digits: 1) + "%"])
        let fig = Figure(id: "f", title: "F", kind: .line, x: Axis("x"), y: Axis("y"), series: [Series(name: "s", points: [DataPoint(x: 1, y: k)])])
        let head = Headline(text: "value \(k)", metric: "m", value: k, target: 2, targetSource: "t", met: k >= 2)
        let rep: JSONValue = .object([("schema", "memvirt.reproduce/1"), ("name", .string(name)), ("k", .double(k))]
                                     + ReportSection.savedKeys(title: "Demo", tables: [t], notes: ["n1"], headline: head, figures: [fig]))
        return .object([("schema", "memvirt.reproduce/1"), ("reproductions", .array([rep])), ("skipped", [])])
    }

    @Test func numbersAsTablesPrintThem() {
        #expect(MergeTests.parse("1,234")?.value == 1234)
        #expect(MergeTests.parse("12.50%")?.value == 12.5)
        #expect(MergeTests.parse("3.2 ms")?.value == 3.2)
        #expect(MergeTests.parse("-4")?.value == -4)
        // Configuration names stay keys.
        #expect(MergeTests.parse("4K") == nil)
        #expect(MergeTests.parse("1 MiB") == nil)
        #expect(MergeTests.parse("(a) fork") == nil)
    }
    static func parse(_ s: String) -> (value: Double, suffix: String, decimals: Int, grouped: Bool)? { ReportMerge.parseNumber(s) }

    @Test func twoRunsMergeIntoOneSectionWithMeanMinMax() throws {
        let dir = try tempDir("merge")
        try Self.run(1).rendered(pretty: true).write(toFile: dir + "/one.json", atomically: true, encoding: .utf8)
        try FileManager.default.createDirectory(atPath: dir + "/run2", withIntermediateDirectories: true)
        try Self.run(3).rendered().write(toFile: dir + "/run2/report.json", atomically: true, encoding: .utf8)
        let r = ReportLoader().load([dir + "/one.json", dir + "/run2"])
        #expect(r.errors.isEmpty)
        #expect(r.sections.count == 2)
        let merged = ReportMerge.merge(r.sections)
        #expect(merged.count == 1)
        let s = merged[0]
        #expect(s.runs == 2)
        let t = s.tables[0]
        #expect(t.header == ["case", "size", "cycles mean", "cycles min", "cycles max", "share mean", "share min", "share max", "runs"])
        #expect(t.rows == [["a", "4K", "2,000", "1,000", "3,000", "20.0%", "10.0%", "30.0%", "2"],
                           ["b", "2M", "4,000", "2,000", "6,000", "40.0%", "20.0%", "60.0%", "2"]])
        let p = s.figures[0].series[0].points[0]
        #expect(p.y == 2 && p.low == 1 && p.high == 3)
        #expect(s.headline?.value == 2)
        #expect(s.headline?.met == false)  // one run of the two missed the target
        #expect(s.notes == ["n1"])
        // Written out: the page has one section and the merged CSV.
        let out = dir + "/out"
        try ReportFiles.write(merged, skipped: r.skipped, to: out)
        let html = try String(contentsOfFile: out + "/report.html", encoding: .utf8)
        #expect(html.components(separatedBy: "<section id=\"demo\">").count == 2)
        #expect(html.contains("cycles min"))
        let csv = parseCSV(try String(contentsOfFile: out + "/demo/demo-table.csv", encoding: .utf8))
        #expect(csv[0] == t.header)
        #expect(csv[1][2] == "2000")
    }

    @Test func numericConfigurationColumnsJoinTheKeyWhenNeeded() {
        func run(_ k: Int) -> TextTable {
            var t = TextTable(header: ["pattern", "n", "faults"])
            for p in ["seq", "rand"] { for n in [1, 8] { t.add([p, "\(n)", "\(100 / n * k)"]) } }
            return t
        }
        var other = run(3)
        other.rows[0][2] = "n/a"  // a text cell in a numeric column: that column is text
        #expect(ReportMerge.mergeTables([run(1), other]).rows[0] == ["seq", "1", "100 | n/a", "2"])
        let m = ReportMerge.mergeTables([run(1), run(3)])
        #expect(m.header == ["pattern", "n", "faults mean", "faults min", "faults max", "runs"])
        #expect(m.rows == [["seq", "1", "200.0", "100", "300", "2"], ["seq", "8", "24.0", "12", "36", "2"],
                           ["rand", "1", "200.0", "100", "300", "2"], ["rand", "8", "24.0", "12", "36", "2"]])
    }

    @Test func aMalformedFileIsNamedAndTheRestGoesOn() throws {
        let dir = try tempDir("bad")
        try Self.run(1).rendered().write(toFile: dir + "/good.json", atomically: true, encoding: .utf8)
        try "{\"reproductions\": [ {\"name\": \"x\"".write(toFile: dir + "/bad.json", atomically: true, encoding: .utf8)
        try "{\"something\": 1}".write(toFile: dir + "/other.json", atomically: true, encoding: .utf8)
        let r = ReportLoader().load([dir + "/good.json", dir + "/bad.json", dir + "/missing.json", dir + "/other.json"])
        #expect(r.sections.map(\.name) == ["demo"])
        #expect(r.errors.count == 3)
        #expect(r.errors[0].hasPrefix(dir + "/bad.json: not valid JSON: line 1"))
        #expect(r.errors[1].hasPrefix(dir + "/missing.json: no such file"))
        #expect(r.errors[2].hasPrefix(dir + "/other.json: not a memvirt report"))
    }

    @Test func sweepFoldersPlugInThroughADirectoryReader() throws {
        let dir = try tempDir("sweep")
        try "{}".write(toFile: dir + "/point-1.json", atomically: true, encoding: .utf8)
        let reader: ReportLoader.DirectoryReader = { path in
            let n = try FileManager.default.contentsOfDirectory(atPath: path).filter { $0.hasSuffix(".json") }.count
            return [ReportSection(name: "sweep", title: "\(n) points")]
        }
        let r = ReportLoader(directoryReaders: [reader]).load([dir])
        #expect(r.errors.isEmpty)
        #expect(r.sections.map(\.title) == ["1 points"])
        #expect(ReportLoader().load([dir]).errors.count == 1)
    }

    @Test func oldReportsGetFiguresFromTheDeriver() throws {
        let old: JSONValue = .object([("schema", "memvirt.reproduce/1"), ("reproductions", .array([.object([("name", "demo"), ("k", 5)])]))])
        let dir = try tempDir("old")
        try old.rendered().write(toFile: dir + "/report.json", atomically: true, encoding: .utf8)
        let r = ReportLoader(derive: { name, j in
            ([Figure(id: "d", title: name, kind: .line, x: Axis("x"), y: Axis("y"), series: [Series(name: "k", points: [DataPoint(x: 0, y: j["k"]?.asDouble ?? 0)])])], nil)
        }).load([dir])
        #expect(r.sections.first?.figures.first?.series.first?.points.first?.y == 5)
    }
}

@Suite("Progress on stderr")
struct ProgressTests {
    final class Sink: @unchecked Sendable {
        var out = ""
        var now = 0.0
    }

    @Test func plainLinesWhenNotATerminal() {
        let sink = Sink()
        let p = ProgressLine(total: 3, terminal: false, write: { sink.out += $0 }, clock: { sink.now })
        p.begin(1, "tlb-reach")
        sink.now = 30
        p.update("tlb-reach: 1 MiB")
        p.end()
        p.begin(2, "rvi")
        sink.now = 45
        p.update("rvi: case a")
        let lines = sink.out.split(separator: "\n", omittingEmptySubsequences: false)
        #expect(lines == ["[1/3] tlb-reach | 0:00 elapsed", "[1/3] tlb-reach: 1 MiB | 0:30 elapsed",
                          "[2/3] rvi | 0:30 elapsed | ~1:00 left", "[2/3] rvi: case a | 0:45 elapsed | ~0:45 left", ""])
        #expect(!sink.out.contains("\r"))
    }

    @Test func oneLineInPlaceOnATerminal() {
        let sink = Sink()
        let p = ProgressLine(total: 2, terminal: true, write: { sink.out += $0 }, clock: { sink.now })
        p.begin(1, "a")
        p.update("a: step")
        p.clear()
        #expect(sink.out == "\r\u{1B}[2K[1/2] a | 0:00 elapsed\r\u{1B}[2K[1/2] a: step | 0:00 elapsed\r\u{1B}[2K")
        #expect(!sink.out.contains("\n"))
        #expect(ProgressLine.duration(3725) == "1:02:05")
    }
}
