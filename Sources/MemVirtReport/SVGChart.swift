import Foundation

/// Escapes text for XML and HTML content and attribute values.
public func xmlEscape(_ s: String) -> String {
    var out = ""
    out.reserveCapacity(s.count)
    for c in s.unicodeScalars {
        switch c {
        case "&": out += "&amp;"
        case "<": out += "&lt;"
        case ">": out += "&gt;"
        case "\"": out += "&quot;"
        case "'": out += "&#39;"
        default:
            // XML 1.0 forbids most control characters even as references: drop them.
            if c.value < 0x20 && c != "\n" && c != "\t" && c != "\r" { continue }
            out.unicodeScalars.append(c)
        }
    }
    return out
}

/// Axis ticks: "nice" values (1, 2, 5 times a power of ten) covering a data range.
public enum Ticks {
    /// The smallest of 1, 2, 5, 10 times a power of ten that is at least `raw`.
    public static func niceStep(_ raw: Double) -> Double {
        guard raw > 0, raw.isFinite else { return 1 }
        let p = pow(10, floor(log10(raw)))
        for m in [1.0, 2, 5, 10] where m * p >= raw * (1 - 1e-9) { return m * p }
        return 10 * p
    }

    /// Rounds away binary noise (0.30000000000000004 -> 0.3).
    static func clean(_ v: Double) -> Double {
        guard v != 0, v.isFinite else { return v }
        let digits = 12 - Int(floor(log10(abs(v))))
        let f = pow(10, Double(max(min(digits, 300), -300)))
        return (v * f).rounded() / f
    }

    /// Linear ticks: a step of 1, 2 or 5 x 10^k giving at most `target` intervals, from the
    /// largest multiple of the step at or below `lo` to the smallest at or above `hi`.
    public static func linear(_ lo: Double, _ hi: Double, target: Int = 5) -> [Double] {
        var lo = lo, hi = hi
        if !(lo.isFinite && hi.isFinite) { return [0, 1] }
        if lo > hi { swap(&lo, &hi) }
        if lo == hi {
            let pad = lo == 0 ? 1 : abs(lo) / 2
            lo -= pad
            hi += pad
            if lo < 0 && hi > 0 && lo > -1e-300 { lo = 0 }
        }
        let step = niceStep((hi - lo) / Double(max(target, 1)))
        let first = floor(lo / step * (1 + 1e-12) + 1e-9)
        let last = ceil(hi / step - 1e-9)
        var out: [Double] = []
        var k = first
        while k <= last + 1e-9 && out.count < 100 {
            out.append(clean(k * step))
            k += 1
        }
        if out.count < 2 { out.append(clean((last + 1) * step)) }
        return out
    }

    /// Log ticks: every power of ten from the one at or below `lo` to the one at or above
    /// `hi`; within less than two decades, also 2x and 5x. Non-positive values are ignored.
    public static func log(_ lo: Double, _ hi: Double) -> [Double] {
        var lo = lo, hi = hi
        if lo > hi { swap(&lo, &hi) }
        if !(lo > 0) { lo = hi > 0 ? hi / 10 : 1 }
        if !(hi > 0) { hi = 10 }
        let a = Int(floor(log10(lo) + 1e-9)), b = Int(ceil(log10(hi) - 1e-9))
        let b2 = max(b, a + 1)
        var out: [Double] = []
        for e in a...b2 {
            let p = clean(pow(10, Double(e)))
            out.append(p)
            if b2 - a < 2 && e < b2 {
                out.append(clean(2 * p))
                out.append(clean(5 * p))
            }
        }
        return out
    }

    /// A tick's label: up to 4 significant digits, k/M/G/T from 10,000 up, no trailing zeros.
    public static func label(_ v: Double) -> String {
        if v == 0 { return "0" }
        let a = abs(v)
        let sign = v < 0 ? "-" : ""
        for (f, s) in [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e4, "k")] where a >= f {
            let m = f == 1e4 ? 1e3 : f
            return sign + trim(a / m) + (f == 1e4 ? "k" : s)
        }
        if a < 1e-3 { return String(format: "%.0e", v) }
        return sign + trim(a)
    }

    static func trim(_ a: Double) -> String {
        let digits = max(0, 3 - Int(floor(log10(a))))
        var s = String(format: "%.\(digits)f", a)
        if s.contains(".") {
            while s.hasSuffix("0") { s.removeLast() }
            if s.hasSuffix(".") { s.removeLast() }
        }
        return s
    }
}

/// A mapping from data values to pixels along one axis.
public struct PixelScale: Sendable {
    public var lo: Double
    public var hi: Double
    public var from: Double
    public var to: Double
    public var log: Bool
    public init(lo: Double, hi: Double, from: Double, to: Double, log: Bool) {
        self.lo = lo
        self.hi = hi
        self.from = from
        self.to = to
        self.log = log
    }
    /// The pixel of `v` (clamped to the axis for values a log axis cannot show).
    public func pixel(_ v: Double) -> Double {
        let t: Double
        if log {
            let l = Foundation.log10(max(v, lo)), a = Foundation.log10(lo), b = Foundation.log10(hi)
            t = b == a ? 0.5 : (l - a) / (b - a)
        } else {
            t = hi == lo ? 0.5 : (v - lo) / (hi - lo)
        }
        return from + t * (to - from)
    }
}

/// Renders a `Figure` as one inline SVG element: no script, no external resources.
public enum SVGChart {
    public static let width = 760.0
    public static let height = 380.0
    /// The plot area: left, top, right, bottom.
    public static let plotLeft = 78.0, plotTop = 40.0, plotRight = 520.0, plotBottom = 318.0
    /// Series colours (Okabe-Ito, readable by colour-blind readers); references are black.
    public static let palette = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]

    static func f(_ v: Double) -> String {
        let r = (v * 10).rounded() / 10
        return r == r.rounded() ? String(Int(r)) : String(r)
    }

    static func axisTitle(_ a: Axis) -> String { a.unit.isEmpty ? a.label : "\(a.label) (\(a.unit))" }

    /// The y axis's scale for a figure (its data, bars from zero, stacks summed).
    public static func yScale(_ fig: Figure) -> (PixelScale, [Double]) {
        var ys: [Double] = []
        switch fig.kind {
        case .stackedBar:
            var sums: [Double: Double] = [:]
            for s in fig.series { for p in s.points where p.y.isFinite { sums[p.x, default: 0] += max(p.y, 0) } }
            ys = Array(sums.values) + [0]
        case .scatter:
            // Same range as x: the y = x line runs corner to corner.
            for s in fig.series { for p in s.points { ys += [p.x, p.y] } }
            ys += fig.references.flatMap { [$0.x, $0.y] }
        default:
            for s in fig.series { for p in s.points { ys += [p.y] + [p.low, p.high].compactMap { $0 } } }
            ys += fig.references.map(\.y)
        }
        return scale(values: ys, axis: fig.y, from: plotBottom, to: plotTop, includeZero: fig.kind == .groupedBar || fig.kind == .stackedBar)
    }

    public static func xScale(_ fig: Figure) -> (PixelScale, [Double]) {
        var xs = fig.series.flatMap { $0.points.map(\.x) } + fig.references.map(\.x)
        if fig.kind == .scatter { xs += fig.series.flatMap { $0.points.map(\.y) } + fig.references.map(\.y) }
        return scale(values: xs, axis: fig.x, from: plotLeft, to: plotRight, includeZero: false)
    }

    static func scale(values: [Double], axis: Axis, from: Double, to: Double, includeZero: Bool) -> (PixelScale, [Double]) {
        let v = values.filter { $0.isFinite && (axis.scale == .linear || $0 > 0) }
        var lo = v.min() ?? 0, hi = v.max() ?? 1
        if axis.scale == .log {
            // Bars on a log axis: a value on a power of ten must not sit on the axis (no bar).
            let t = Ticks.log(includeZero ? lo * 0.9 : lo, hi)
            return (PixelScale(lo: t.first!, hi: t.last!, from: from, to: to, log: true), t)
        }
        if includeZero { lo = min(lo, 0); hi = max(hi, 0) }
        // Lines of positive values: start at zero when that costs less than half the axis.
        else if lo > 0 && lo < hi / 2 { lo = 0 }
        let t = Ticks.linear(lo, hi)
        return (PixelScale(lo: t.first!, hi: t.last!, from: from, to: to, log: false), t)
    }

    /// The whole `<svg>` element.
    public static func render(_ fig: Figure) -> String {
        let label = xmlEscape(fig.title)
        let h = height + extraBottom(fig)
        var o = "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"chart\" viewBox=\"0 0 \(f(width)) \(f(h))\" width=\"\(f(width))\" height=\"\(f(h))\" role=\"img\" aria-label=\"\(label)\" font-family=\"system-ui, sans-serif\" font-size=\"12\">"
        o += "<title>\(label)</title>"
        o += "<text x=\"\(f(width / 2))\" y=\"20\" text-anchor=\"middle\" font-size=\"14\" font-weight=\"bold\">\(label)</text>"
        if fig.kind == .heatmap {
            o += heatmap(fig)
        } else {
            o += plot(fig)
        }
        return o + "</svg>"
    }

    static func color(_ i: Int) -> String { palette[i % palette.count] }

    /// Category labels longer than this are cut (the full label stays in the marks' tooltips).
    static let maxCategoryLabel = 32

    static func categoryLabel(_ c: String) -> String {
        c.count > maxCategoryLabel ? String(c.prefix(maxCategoryLabel - 1)) + "…" : c
    }

    /// Whether bar categories are drawn slanted (when one does not fit its band).
    static func slanted(_ fig: Figure) -> Bool {
        guard fig.kind == .groupedBar || fig.kind == .stackedBar else { return false }
        let band = (plotRight - plotLeft) / Double(max(fig.categories.count, 1))
        return fig.categories.contains { Double(categoryLabel($0).count) * 6.5 > band }
    }

    /// Room added below the plot for slanted category labels (20 degrees: sin = 0.34).
    static func extraBottom(_ fig: Figure) -> Double {
        guard slanted(fig) else { return 0 }
        let longest = fig.categories.map { categoryLabel($0).count }.max() ?? 0
        return (Double(longest) * 6 * 0.34).rounded()
    }

    static func plot(_ fig: Figure) -> String {
        let (ys, yTicks) = yScale(fig)
        let categorical = fig.kind == .groupedBar || fig.kind == .stackedBar
        var o = ""
        // Grid and y axis.
        for t in yTicks {
            let y = f(ys.pixel(t))
            o += "<line class=\"grid\" x1=\"\(f(plotLeft))\" x2=\"\(f(plotRight))\" y1=\"\(y)\" y2=\"\(y)\" stroke=\"#ddd\"/>"
            o += "<text x=\"\(f(plotLeft - 6))\" y=\"\(y)\" dy=\"4\" text-anchor=\"end\">\(xmlEscape(Ticks.label(t)))</text>"
        }
        o += "<text transform=\"translate(16 \(f((plotTop + plotBottom) / 2))) rotate(-90)\" text-anchor=\"middle\">\(xmlEscape(axisTitle(fig.y) + (fig.y.scale == .log ? ", log scale" : "")))</text>"
        // X axis.
        var xs = PixelScale(lo: -0.5, hi: Double(max(fig.categories.count, 1)) - 0.5, from: plotLeft, to: plotRight, log: false)
        if categorical {
            let n = max(fig.categories.count, 1)
            let band = (plotRight - plotLeft) / Double(n)
            _ = band
            let rotate = slanted(fig)
            for (i, c0) in fig.categories.enumerated() {
                let x = f(xs.pixel(Double(i)))
                let c = categoryLabel(c0)
                if rotate {
                    o += "<text transform=\"translate(\(f(xs.pixel(Double(i)) - 6)) \(f(plotBottom + 12))) rotate(20)\" text-anchor=\"start\" font-size=\"10\">\(xmlEscape(c))</text>"
                } else {
                    o += "<text x=\"\(x)\" y=\"\(f(plotBottom + 16))\" text-anchor=\"middle\">\(xmlEscape(c))</text>"
                }
            }
        } else {
            let (sx, xTicks) = xScale(fig)
            xs = sx
            for t in xTicks {
                let x = f(xs.pixel(t))
                o += "<line class=\"grid\" x1=\"\(x)\" x2=\"\(x)\" y1=\"\(f(plotTop))\" y2=\"\(f(plotBottom))\" stroke=\"#eee\"/>"
                o += "<text x=\"\(x)\" y=\"\(f(plotBottom + 16))\" text-anchor=\"middle\">\(xmlEscape(Ticks.label(t)))</text>"
            }
        }
        o += "<text x=\"\(f((plotLeft + plotRight) / 2))\" y=\"\(f(height + extraBottom(fig) - 14))\" text-anchor=\"middle\">\(xmlEscape(axisTitle(fig.x) + (fig.x.scale == .log && !categorical ? ", log scale" : "")))</text>"
        o += "<rect x=\"\(f(plotLeft))\" y=\"\(f(plotTop))\" width=\"\(f(plotRight - plotLeft))\" height=\"\(f(plotBottom - plotTop))\" fill=\"none\" stroke=\"#888\"/>"

        // Marks.
        o += "<g class=\"plot\">"
        switch fig.kind {
        case .line, .scatter:
            if fig.kind == .scatter {
                // y = x over the shared range.
                let a = max(xs.lo, ys.lo), b = min(xs.hi, ys.hi)
                if b > a {
                    o += "<line class=\"identity\" x1=\"\(f(xs.pixel(a)))\" y1=\"\(f(ys.pixel(a)))\" x2=\"\(f(xs.pixel(b)))\" y2=\"\(f(ys.pixel(b)))\" stroke=\"#999\" stroke-dasharray=\"4 3\"/>"
                }
            }
            for (i, s) in fig.series.enumerated() {
                let pts = s.points.filter { $0.x.isFinite && $0.y.isFinite }.sorted { $0.x < $1.x }
                if fig.kind == .line && pts.count > 1 {
                    let d = pts.map { "\(f(xs.pixel($0.x))),\(f(ys.pixel($0.y)))" }.joined(separator: " ")
                    o += "<polyline class=\"mark\" points=\"\(d)\" fill=\"none\" stroke=\"\(color(i))\" stroke-width=\"2\"/>"
                }
                for p in pts {
                    o += whisker(p, x: xs.pixel(p.x), ys: ys, color: color(i))
                    o += "<circle class=\"mark\" cx=\"\(f(xs.pixel(p.x)))\" cy=\"\(f(ys.pixel(p.y)))\" r=\"3.5\" fill=\"\(color(i))\"><title>\(xmlEscape("\(s.name): \(Ticks.label(p.x)), \(Ticks.label(p.y))"))</title></circle>"
                }
            }
            for r in fig.references where r.x.isFinite && r.y.isFinite {
                o += reference(r, x: xs.pixel(r.x), y: ys.pixel(r.y))
            }
        case .groupedBar:
            let n = max(fig.categories.count, 1)
            let band = (plotRight - plotLeft) / Double(n)
            let k = max(fig.series.count, 1)
            let w = band * 0.8 / Double(k)
            for (i, s) in fig.series.enumerated() {
                for p in s.points where p.y.isFinite {
                    let x0 = xs.pixel(p.x) - band * 0.4 + Double(i) * w
                    let y0 = ys.pixel(max(min(p.y, ys.hi), ys.lo)), yz = ys.pixel(max(0, ys.lo))
                    o += "<rect class=\"mark\" x=\"\(f(x0))\" y=\"\(f(min(y0, yz)))\" width=\"\(f(max(w - 1, 1)))\" height=\"\(f(max(abs(yz - y0), 0.5)))\" fill=\"\(color(i))\"><title>\(xmlEscape("\(s.name), \(category(fig, p.x)): \(Ticks.label(p.y))"))</title></rect>"
                    o += whisker(p, x: x0 + w / 2, ys: ys, color: "#000")
                }
            }
            for r in fig.references where r.x.isFinite && r.y.isFinite {
                o += reference(r, x: xs.pixel(r.x), y: ys.pixel(r.y), width: band * 0.8)
            }
        case .stackedBar:
            let n = max(fig.categories.count, 1)
            let band = (plotRight - plotLeft) / Double(n)
            var base: [Double: Double] = [:]
            for (i, s) in fig.series.enumerated() {
                for p in s.points where p.y.isFinite && p.y > 0 {
                    let b = base[p.x, default: 0]
                    let y0 = ys.pixel(b), y1 = ys.pixel(b + p.y)
                    base[p.x] = b + p.y
                    o += "<rect class=\"mark\" x=\"\(f(xs.pixel(p.x) - band * 0.3))\" y=\"\(f(y1))\" width=\"\(f(band * 0.6))\" height=\"\(f(max(y0 - y1, 0.5)))\" fill=\"\(color(i))\"><title>\(xmlEscape("\(s.name), \(category(fig, p.x)): \(Ticks.label(p.y))"))</title></rect>"
                }
            }
            for r in fig.references where r.x.isFinite && r.y.isFinite {
                o += reference(r, x: xs.pixel(r.x), y: ys.pixel(r.y), width: band * 0.7)
            }
        case .heatmap: break
        }
        o += "</g>"
        o += legend(fig)
        return o
    }

    static func category(_ fig: Figure, _ x: Double) -> String {
        let i = Int(x.rounded())
        return fig.categories.indices.contains(i) ? fig.categories[i] : Ticks.label(x)
    }

    static func whisker(_ p: DataPoint, x: Double, ys: PixelScale, color: String) -> String {
        guard let lo = p.low, let hi = p.high, lo.isFinite, hi.isFinite, hi > lo else { return "" }
        let a = f(ys.pixel(lo)), b = f(ys.pixel(hi)), xs = f(x)
        return "<path class=\"range\" d=\"M\(xs),\(a)V\(b)M\(f(x - 3)),\(a)H\(f(x + 3))M\(f(x - 3)),\(b)H\(f(x + 3))\" stroke=\"\(color)\" fill=\"none\"/>"
    }

    /// A reference point: a hollow black diamond (with a dashed bar across a bar's band).
    static func reference(_ r: ReferencePoint, x: Double, y: Double, width: Double = 0) -> String {
        var o = "<g class=\"reference\">"
        if width > 0 {
            o += "<line x1=\"\(f(x - width / 2))\" x2=\"\(f(x + width / 2))\" y1=\"\(f(y))\" y2=\"\(f(y))\" stroke=\"#000\" stroke-width=\"2\" stroke-dasharray=\"5 3\"/>"
        }
        o += "<path class=\"mark\" d=\"M\(f(x)),\(f(y - 6))L\(f(x + 6)),\(f(y))L\(f(x)),\(f(y + 6))L\(f(x - 6)),\(f(y))Z\" fill=\"#fff\" stroke=\"#000\" stroke-width=\"2\"><title>\(xmlEscape("\(r.label): \(Ticks.label(r.y)) (\(r.source))"))</title></path>"
        return o + "</g>"
    }

    static func legend(_ fig: Figure) -> String {
        var o = "<g class=\"legend\">"
        var y = plotTop + 6
        let x = plotRight + 14
        func wrap(_ s: String, _ n: Int) -> [String] {
            var lines: [String] = [], cur = ""
            for w in s.split(separator: " ") {
                if !cur.isEmpty && cur.count + w.count + 1 > n { lines.append(cur); cur = "" }
                cur += (cur.isEmpty ? "" : " ") + w
            }
            if !cur.isEmpty { lines.append(cur) }
            return lines
        }
        for (i, s) in fig.series.enumerated() {
            o += "<rect x=\"\(f(x))\" y=\"\(f(y - 9))\" width=\"12\" height=\"12\" fill=\"\(color(i))\"/>"
            for (j, l) in wrap(s.name, 26).enumerated() {
                o += "<text x=\"\(f(x + 18))\" y=\"\(f(y + 1 + Double(j) * 14))\">\(xmlEscape(l))</text>"
                if j > 0 { y += 14 }
            }
            y += 20
        }
        var seen: Set<String> = []
        for r in fig.references where !seen.contains(r.label) {
            seen.insert(r.label)
            o += "<path d=\"M\(f(x + 6)),\(f(y - 9))L\(f(x + 12)),\(f(y - 3))L\(f(x + 6)),\(f(y + 3))L\(f(x)),\(f(y - 3))Z\" fill=\"#fff\" stroke=\"#000\" stroke-width=\"2\"/>"
            for (j, l) in wrap(r.label, 26).enumerated() {
                o += "<text x=\"\(f(x + 18))\" y=\"\(f(y + 1 + Double(j) * 14))\">\(xmlEscape(l))</text>"
                if j > 0 { y += 14 }
            }
            y += 20
        }
        if fig.kind == .scatter {
            o += "<line x1=\"\(f(x))\" x2=\"\(f(x + 12))\" y1=\"\(f(y - 3))\" y2=\"\(f(y - 3))\" stroke=\"#999\" stroke-dasharray=\"4 3\"/>"
            o += "<text x=\"\(f(x + 18))\" y=\"\(f(y + 1))\">y = x</text>"
        }
        return o + "</g>"
    }

    /// Heatmap: columns are `categories` (x indexes them), rows are series; colour is y.
    static func heatmap(_ fig: Figure) -> String {
        let cols = max(fig.categories.count, (fig.series.flatMap { $0.points.map { Int($0.x) } }.max() ?? 0) + 1)
        let rows = max(fig.series.count, 1)
        let cw = (plotRight - plotLeft) / Double(cols), rh = (plotBottom - plotTop) / Double(rows)
        let vals = fig.series.flatMap { $0.points.map(\.y) }.filter(\.isFinite)
        let lo = vals.min() ?? 0, hi = vals.max() ?? 1
        func shade(_ v: Double) -> (String, Bool) {
            let t = hi == lo ? 0.5 : (v - lo) / (hi - lo)
            // From light yellow (#ffffcc) to dark blue (#0c2c84).
            let a = (255.0, 255.0, 204.0), b = (12.0, 44.0, 132.0)
            let c = (a.0 + t * (b.0 - a.0), a.1 + t * (b.1 - a.1), a.2 + t * (b.2 - a.2))
            return (String(format: "#%02x%02x%02x", Int(c.0), Int(c.1), Int(c.2)), t > 0.5)
        }
        var o = "<g class=\"plot\">"
        for (r, s) in fig.series.enumerated() {
            let y = plotTop + Double(r) * rh
            for p in s.points where p.y.isFinite {
                let x = plotLeft + p.x * cw
                let (c, dark) = shade(p.y)
                o += "<rect class=\"mark\" x=\"\(f(x))\" y=\"\(f(y))\" width=\"\(f(cw - 1))\" height=\"\(f(rh - 1))\" fill=\"\(c)\"><title>\(xmlEscape("\(s.name), \(category(fig, p.x)): \(Ticks.label(p.y))"))</title></rect>"
                o += "<text x=\"\(f(x + cw / 2))\" y=\"\(f(y + rh / 2 + 4))\" text-anchor=\"middle\" fill=\"\(dark ? "#fff" : "#000")\">\(xmlEscape(Ticks.label(p.y)))</text>"
            }
        }
        o += "</g>"
        for (r, s) in fig.series.enumerated() {
            o += "<text x=\"\(f(plotLeft - 6))\" y=\"\(f(plotTop + (Double(r) + 0.5) * rh + 4))\" text-anchor=\"end\">\(xmlEscape(s.name))</text>"
        }
        for (i, c) in fig.categories.enumerated() {
            o += "<text x=\"\(f(plotLeft + (Double(i) + 0.5) * cw))\" y=\"\(f(plotBottom + 16))\" text-anchor=\"middle\">\(xmlEscape(c))</text>"
        }
        o += "<text x=\"\(f((plotLeft + plotRight) / 2))\" y=\"\(f(height - 14))\" text-anchor=\"middle\">\(xmlEscape(axisTitle(fig.x)))</text>"
        o += "<text transform=\"translate(16 \(f((plotTop + plotBottom) / 2))) rotate(-90)\" text-anchor=\"middle\">\(xmlEscape(axisTitle(fig.y)))</text>"
        // Colour key.
        let x = plotRight + 14
        for (j, v) in [lo, (lo + hi) / 2, hi].enumerated() {
            let y = plotTop + 6 + Double(j) * 22
            o += "<rect x=\"\(f(x))\" y=\"\(f(y - 9))\" width=\"14\" height=\"14\" fill=\"\(shade(v).0)\" stroke=\"#888\"/>"
            o += "<text x=\"\(f(x + 20))\" y=\"\(f(y + 2))\">\(xmlEscape(Ticks.label(v)))</text>"
        }
        return o
    }
}
