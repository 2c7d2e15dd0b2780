import Foundation
#if canImport(FoundationXML)
import FoundationXML
#endif
import MemVirtCore
import Testing
@testable import MemVirtReport

/// A well-formedness check: FoundationXML's parser over the SVG, counting elements by name.
final class XMLCheck: NSObject, XMLParserDelegate {
    var counts: [String: Int] = [:]
    var error: String?
    var texts: [String] = []
    func parser(_ parser: XMLParser, didStartElement name: String, namespaceURI: String?, qualifiedName: String?, attributes: [String: String] = [:]) {
        counts[name, default: 0] += 1
    }
    func parser(_ parser: XMLParser, foundCharacters string: String) { texts.append(string) }
    func parser(_ parser: XMLParser, parseErrorOccurred e: Error) { error = "\(e) at line \(parser.lineNumber), column \(parser.columnNumber)" }

    static func check(_ xml: String) -> XMLCheck {
        let c = XMLCheck()
        let p = XMLParser(data: Data(xml.utf8))
        p.delegate = c
        if !p.parse() && c.error == nil { c.error = "\(p.parserError.map { "\($0)" } ?? "parse failed")" }
        return c
    }
}

@Suite("Chart axes: nice ticks, pixels, labels")
struct TickTests {
    @Test func niceSteps() {
        #expect(Ticks.niceStep(19.4) == 20)
        #expect(Ticks.niceStep(1) == 1)
        #expect(Ticks.niceStep(3) == 5)
        #expect(Ticks.niceStep(0.048) == 0.05)
        #expect(Ticks.niceStep(6000) == 10_000)
    }

    @Test func linearTicks() {
        #expect(Ticks.linear(0, 97) == [0, 20, 40, 60, 80, 100])
        #expect(Ticks.linear(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1])
        #expect(Ticks.linear(0.3, 2.7) == [0, 0.5, 1, 1.5, 2, 2.5, 3])
        #expect(Ticks.linear(-3, 7) == [-4, -2, 0, 2, 4, 6, 8])
        // One value: widened by half of it each side.
        #expect(Ticks.linear(5, 5) == [2, 3, 4, 5, 6, 7, 8])
        #expect(Ticks.linear(0, 0) == [-1, -0.5, 0, 0.5, 1])
        #expect(Ticks.linear(1_000_000, 4_200_000) == [1_000_000, 2_000_000, 3_000_000, 4_000_000, 5_000_000])
    }

    @Test func logTicks() {
        #expect(Ticks.log(3, 4500) == [1, 10, 100, 1000, 10_000])
        #expect(Ticks.log(20, 150) == [10, 100, 1000])
        // Under two decades: 2x and 5x too.
        #expect(Ticks.log(2, 9) == [1, 2, 5, 10])
        #expect(Ticks.log(0.3, 0.9) == [0.1, 0.2, 0.5, 1])
        // Two decades or more: powers of ten only.
        #expect(Ticks.log(0.02, 0.3) == [0.01, 0.1, 1])
        // A non-positive low end: a decade below the high end.
        #expect(Ticks.log(0, 50) == [1, 10, 100])
    }

    @Test func labels() {
        #expect(Ticks.label(0) == "0")
        #expect(Ticks.label(1500) == "1500")
        #expect(Ticks.label(25_000) == "25k")
        #expect(Ticks.label(2_000_000) == "2M")
        #expect(Ticks.label(1.5e9) == "1.5G")
        #expect(Ticks.label(0.25) == "0.25")
        #expect(Ticks.label(-3.5) == "-3.5")
        #expect(Ticks.label(1.0 / 3) == "0.3333")
    }

    @Test func pixels() {
        let lin = PixelScale(lo: 0, hi: 100, from: 78, to: 520, log: false)
        #expect(lin.pixel(50) == 299)
        #expect(lin.pixel(0) == 78)
        #expect(lin.pixel(100) == 520)
        let log = PixelScale(lo: 1, hi: 1000, from: 318, to: 40, log: true)
        #expect(abs(log.pixel(10) - (318 - 278.0 / 3)) < 1e-9)
        #expect(log.pixel(1000) == 40)
    }

    @Test func pointPositionInARenderedChart() {
        // x data 0..100 (ticks 0..100), y data 0..100: (50, 50) lands mid-plot.
        let fig = Figure(id: "t", title: "t", kind: .line, x: Axis("x"), y: Axis("y"),
                         series: [Series(name: "s", points: [DataPoint(x: 0, y: 0), DataPoint(x: 50, y: 50), DataPoint(x: 100, y: 100)])])
        let svg = SVGChart.render(fig)
        let cx = (SVGChart.plotLeft + SVGChart.plotRight) / 2, cy = (SVGChart.plotTop + SVGChart.plotBottom) / 2
        #expect(svg.contains("cx=\"\(SVGChart.f(cx))\" cy=\"\(SVGChart.f(cy))\""))
        #expect(svg.contains("cx=\"\(SVGChart.f(SVGChart.plotLeft))\" cy=\"\(SVGChart.f(SVGChart.plotBottom))\""))
        // Log x: 10 of 1..1000 sits a third of the way across.
        let logFig = Figure(id: "l", title: "l", kind: .scatter, x: Axis("x", scale: .log), y: Axis("y", scale: .log),
                            series: [Series(name: "s", points: [DataPoint(x: 1, y: 1), DataPoint(x: 10, y: 10), DataPoint(x: 1000, y: 1000)])])
        let third = SVGChart.plotLeft + (SVGChart.plotRight - SVGChart.plotLeft) / 3
        #expect(SVGChart.render(logFig).contains("cx=\"\(SVGChart.f(third))\""))
    }
}

@Suite("SVG charts: escaping and well-formed XML")
struct SVGTests {
    static let nasty = "a<b & \"c\" 'd' >e"

    static func figures() -> [Figure] {
        let s = [Series(name: SVGTests.nasty, points: [DataPoint(x: 0, y: 3), DataPoint(x: 1, y: 30, low: 20, high: 40)]),
                 Series(name: "two", points: [DataPoint(x: 0, y: 5), DataPoint(x: 1, y: 7)])]
        let refs = [ReferencePoint(label: "seed <1>", x: 1, y: 25, source: "paper & co")]
        return Figure.Kind.allKinds.map { k in
            Figure(id: "k-\(k.rawValue)", title: "title \(SVGTests.nasty)", kind: k, x: Axis("x & y", unit: "<ms>", scale: k == .scatter ? .log : .linear),
                   y: Axis("y", unit: "%", scale: k == .line ? .log : .linear), series: s, categories: ["c<1>", "c&2"], references: refs, caption: "cap")
        }
    }

    @Test func escaping() {
        #expect(xmlEscape(Self.nasty) == "a&lt;b &amp; &quot;c&quot; &#39;d&#39; &gt;e")
        for f in Self.figures() {
            let svg = SVGChart.render(f)
            #expect(!svg.contains(Self.nasty))
            #expect(svg.contains("title a&lt;b &amp; &quot;c&quot;"))
        }
    }

    @Test func everyKindIsWellFormedXMLWithMarks() {
        for f in Self.figures() {
            let svg = SVGChart.render(f)
            let c = XMLCheck.check(svg)
            #expect(c.error == nil, "\(f.kind): \(c.error ?? "")")
            #expect(c.counts["svg"] == 1)
            let marks = (c.counts["rect"] ?? 0) + (c.counts["circle"] ?? 0) + (c.counts["polyline"] ?? 0)
            #expect(marks >= 4, "\(f.kind) draws \(marks) marks")
            // The escaped text comes back unescaped through the parser.
            #expect(c.texts.joined().contains("title " + Self.nasty))
        }
    }

    @Test func barsOnALogAxisStartBelowTheirSmallestValue() {
        let f = Figure(id: "b", title: "b", kind: .groupedBar, x: Axis("c"), y: Axis("v", scale: .log),
                       series: [Series(name: "s", points: [DataPoint(x: 0, y: 10), DataPoint(x: 1, y: 5000)])], categories: ["a", "b"])
        let (ys, ticks) = SVGChart.yScale(f)
        #expect(ticks == [1, 10, 100, 1000, 10_000])
        #expect(ys.pixel(10) < SVGChart.plotBottom)
    }

    @Test func stackedBarsSumAndScatterDrawsIdentity() {
        let stacked = Figure(id: "s", title: "s", kind: .stackedBar, x: Axis("c"), y: Axis("v"),
                             series: [Series(name: "a", points: [DataPoint(x: 0, y: 30)]), Series(name: "b", points: [DataPoint(x: 0, y: 70)])],
                             categories: ["only"])
        // y ticks 0..100: the top of the stack (100) is the top of the plot.
        let (ys, ticks) = SVGChart.yScale(stacked)
        #expect(ticks == [0, 20, 40, 60, 80, 100])
        #expect(ys.pixel(100) == SVGChart.plotTop)
        #expect(SVGChart.render(stacked).contains("y=\"\(SVGChart.f(SVGChart.plotTop))\""))
        let scatter = Figure(id: "p", title: "p", kind: .scatter, x: Axis("m"), y: Axis("p"), series: [Series(name: "a", points: [DataPoint(x: 1, y: 2)])])
        #expect(SVGChart.render(scatter).contains("class=\"identity\""))
    }

    @Test func figureRoundTripsThroughJSON() throws {
        for f in Self.figures() {
            let j = JSONValue.encoding(f)
            let back = try JSONReader.parse(j.rendered()).decoded(as: Figure.self)
            #expect(back == f)
        }
    }
}

extension Figure.Kind {
    static let allKinds: [Figure.Kind] = [.line, .groupedBar, .stackedBar, .scatter, .heatmap]
}
