import Foundation
import MemVirtCore

/// Merging repeated runs of a reproduction into one section: table rows keyed by their
/// leading cells (see `mergeTables`), numeric columns become mean, min and max;
/// figure points with the same series and x get the mean as y and the range as a whisker;
/// headlines get the mean value and the range.
public enum ReportMerge {
    /// Sections with the same `id` merged, in order of first appearance.
    public static func merge(_ sections: [ReportSection]) -> [ReportSection] {
        var order: [String] = []
        var groups: [String: [ReportSection]] = [:]
        for s in sections {
            if groups[s.id] == nil { order.append(s.id) }
            groups[s.id, default: []].append(s)
        }
        return order.map { mergeGroup(groups[$0]!) }
    }

    static func mergeGroup(_ g: [ReportSection]) -> ReportSection {
        if g.count == 1 { return g[0] }
        var out = g[0]
        out.runs = g.map(\.runs).reduce(0, +)
        out.sources = g.flatMap(\.sources)
        var notes: [String] = []
        for n in g.flatMap(\.notes) where !notes.contains(n) { notes.append(n) }
        out.notes = notes
        // Tables: the i-th table of every run with the same header.
        out.tables = []
        let most = g.map(\.tables.count).max() ?? 0
        for i in 0..<most {
            let first = g.first { $0.tables.count > i }!.tables[i]
            let same = g.compactMap { $0.tables.count > i && $0.tables[i].header == first.header ? $0.tables[i] : nil }
            out.tables.append(mergeTables(same))
        }
        // Figures by id.
        var figOrder: [String] = []
        var figs: [String: [Figure]] = [:]
        for f in g.flatMap(\.figures) {
            if figs[f.id] == nil { figOrder.append(f.id) }
            figs[f.id, default: []].append(f)
        }
        out.figures = figOrder.map { mergeFigures(figs[$0]!) }
        let heads = g.compactMap(\.headline)
        if !heads.isEmpty { out.headline = mergeHeadlines(heads) }
        return out
    }

    /// A number as tables print them: digits with optional ',' grouping, a fraction, an
    /// exponent, then optionally '%' or a time unit or 'x'. Sizes such as "4K" or "1 MiB"
    /// are names of configurations, not measurements: they stay keys.
    public static func parseNumber(_ cell: String) -> (value: Double, suffix: String, decimals: Int, grouped: Bool)? {
        let m = cell.wholeMatch(of: /([+-]?)((?:\d{1,3}(?:,\d{3})+)|\d+)(?:\.(\d+))?([eE][+-]?\d+)?(%| ?(?:ms|us|µs|ns|s|x))?/)
        guard let m else { return nil }
        let digits = String(m.2).replacing(",", with: "")
        let frac = m.3.map(String.init) ?? ""
        let text = String(m.1) + digits + (frac.isEmpty ? "" : "." + frac) + (m.4.map(String.init) ?? "")
        guard let v = Double(text) else { return nil }
        return (v, m.5.map(String.init) ?? "", frac.count, m.2.contains(","))
    }

    static func format(_ v: Double, like: (value: Double, suffix: String, decimals: Int, grouped: Bool)) -> String {
        var s: String
        if like.decimals == 0 && like.grouped && abs(v) < 9e18 {
            s = formatGrouped(UInt64(abs(v).rounded()))
            if v < 0 { s = "-" + s }
        } else {
            s = String(format: "%.\(like.decimals)f", v)
        }
        return s + like.suffix
    }

    /// Merges runs of one table (same header). A row's key is its first cells: the fewest
    /// leading columns (at least one) that name one row in every run, such as (pattern, n) or
    /// (mode, harvest, round). Every other column whose cells are all numbers becomes mean,
    /// min and max columns; other text columns show their distinct values joined by " | ".
    /// A "runs" column counts the runs that had the row. One table is returned unchanged.
    public static func mergeTables(_ ts: [TextTable]) -> TextTable {
        guard let first = ts.first else { return TextTable(header: []) }
        if ts.count == 1 { return first }
        let width = first.header.count
        func cell(_ r: [String], _ c: Int) -> String { c < r.count ? r[c] : "" }
        func unique(_ k: Int) -> Bool {
            ts.allSatisfy { t in
                let keys = t.rows.map { r in (0..<k).map { cell(r, $0) } }
                return Set(keys).count == keys.count
            }
        }
        var keyCount = min(1, width)
        while keyCount < width && !unique(keyCount) { keyCount += 1 }
        var numeric = [Bool](repeating: false, count: width)
        for c in keyCount..<width {
            let cells = ts.flatMap { $0.rows.map { cell($0, c) } }.filter { !$0.isEmpty }
            numeric[c] = !cells.isEmpty && cells.allSatisfy { parseNumber($0) != nil }
        }
        var header: [String] = []
        for (c, h) in first.header.enumerated() {
            header += numeric[c] ? ["\(h) mean", "\(h) min", "\(h) max"] : [h]
        }
        header.append("runs")
        var out = TextTable(title: first.title, header: header)
        var order: [[String]] = []
        var rows: [[String]: [[String]]] = [:]
        for t in ts {
            for r in t.rows {
                let key = (0..<keyCount).map { cell(r, $0) }
                if rows[key] == nil { order.append(key) }
                rows[key, default: []].append(r)
            }
        }
        for key in order {
            let rs = rows[key]!
            var cells: [String] = []
            for c in 0..<width {
                if c < keyCount { cells.append(key[c]); continue }
                if !numeric[c] {
                    var seen: [String] = []
                    for v in rs.map({ cell($0, c) }) where !seen.contains(v) { seen.append(v) }
                    cells.append(seen.joined(separator: " | "))
                    continue
                }
                let parsed = rs.compactMap { parseNumber(cell($0, c)) }
                guard let like = parsed.first else { cells += ["", "", ""]; continue }
                let vs = parsed.map(\.value)
                let mean = vs.reduce(0, +) / Double(vs.count)
                // Min and max as the runs printed them; the mean of ungrouped integers gets a decimal.
                let decimals = parsed.map(\.decimals).max() ?? 0
                let plain = (like.value, like.suffix, decimals, like.grouped)
                let meanFormat = (like.value, like.suffix, decimals == 0 && !like.grouped && vs.count > 1 ? 1 : decimals, like.grouped)
                cells += [format(mean, like: meanFormat), format(vs.min()!, like: plain), format(vs.max()!, like: plain)]
            }
            cells.append("\(rs.count)")
            out.add(cells)
        }
        return out
    }

    public static func mergeFigures(_ fs: [Figure]) -> Figure {
        var out = fs[0]
        if fs.count == 1 { return out }
        var order: [String] = []
        var pts: [String: [Double: [Double]]] = [:]
        var xOrder: [String: [Double]] = [:]
        for f in fs {
            for s in f.series {
                if pts[s.name] == nil { order.append(s.name) }
                for p in s.points where p.y.isFinite {
                    if pts[s.name]?[p.x] == nil { xOrder[s.name, default: []].append(p.x) }
                    pts[s.name, default: [:]][p.x, default: []].append(p.y)
                }
            }
        }
        out.series = order.map { name in
            Series(name: name, points: xOrder[name, default: []].map { x in
                let ys = pts[name]![x]!
                return DataPoint(x: x, y: ys.reduce(0, +) / Double(ys.count), low: ys.min(), high: ys.max())
            })
        }
        var refs: [ReferencePoint] = []
        for r in fs.flatMap(\.references) where !refs.contains(r) { refs.append(r) }
        out.references = refs
        out.caption = (out.caption.isEmpty ? "" : out.caption + " ") + "Mean of \(fs.count) runs; whiskers span min to max."
        return out
    }

    public static func mergeHeadlines(_ hs: [Headline]) -> Headline {
        var out = hs[0]
        if hs.count == 1 { return out }
        let vs = hs.map(\.value)
        out.value = vs.reduce(0, +) / Double(vs.count)
        out.low = vs.min()
        out.high = vs.max()
        out.runs = hs.map(\.runs).reduce(0, +)
        out.met = hs.contains { $0.met == nil } ? nil : hs.allSatisfy { $0.met == true }
        out.text = "\(out.metric): \(Ticks.label(out.value))\(out.unit.isEmpty ? "" : " " + out.unit), mean of \(hs.count) runs (\(Ticks.label(out.low!)) to \(Ticks.label(out.high!))). First run: \(hs[0].text)"
        return out
    }
}
