import Foundation

/// One self-contained HTML page: a summary (each reproduction's headline number beside the
/// seed's or the target's, met or not), then per reproduction its finding, charts (inline
/// SVG), tables and notes. No script, no network.
public enum HTMLReport {
    static let style = """
        body{font-family:system-ui,sans-serif;margin:2em;max-width:80em;color:#222}
        h2{margin-top:2.5em;border-bottom:1px solid #ccc}
        table{border-collapse:collapse;margin:1em 0;font-size:90%}
        th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
        th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}
        caption{text-align:left;font-weight:bold;padding:.3em 0}
        figure{margin:1.5em 0}figcaption{font-size:90%;color:#444;max-width:720px}
        svg.chart{max-width:100%;height:auto;border:1px solid #eee}
        p.finding{font-size:110%;background:#f5f9ff;border-left:4px solid #0072B2;padding:.5em 1em}
        .met{color:#007a3d;font-weight:bold}.unmet{color:#b00020;font-weight:bold}
        nav a{margin-right:1em}.csv{font-size:85%}
        """

    /// Today's text-only page (kept for callers that only have text).
    public static func page(_ sections: [(name: String, text: String)], skipped: [String]) -> String {
        page(sections.map { ReportSection(name: $0.name, title: $0.name, notes: [$0.text]) }, skipped: skipped)
    }

    static func isNumeric(_ s: String) -> Bool {
        guard let f = s.first else { return false }
        return f.isNumber || ((f == "-" || f == "+") && s.count > 1 && s.dropFirst().first!.isNumber)
    }

    /// The page. `csvLinks`: link each table to `<section id>/<file>.csv` (files written by
    /// `ReportFiles.write`).
    public static func page(_ sections: [ReportSection], skipped: [String], csvLinks: Bool = false, footer: String = "") -> String {
        var o = "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>MemVirt reproductions</title><style>\(style)</style></head><body>\n"
        o += "<h1>MemVirt reproductions</h1>\n<nav>" + sections.map { "<a href=\"#\($0.id)\">\(xmlEscape(label($0)))</a>" }.joined() + "</nav>\n"
        // Summary.
        o += "<h2 id=\"summary\">Summary</h2>\n<table class=\"summary\"><thead><tr><th>reproduction</th><th>engine</th><th>measure</th><th>measured</th><th>seed / target</th><th>source of the target</th><th>met</th></tr></thead><tbody>\n"
        for s in sections {
            o += "<tr><td><a href=\"#\(s.id)\">\(xmlEscape(s.name))</a></td><td>\(xmlEscape(s.engine))</td>"
            if let h = s.headline {
                var v = number(h.value, h.unit)
                if h.runs > 1, let lo = h.low, let hi = h.high { v += " (\(h.runs) runs: \(number(lo, h.unit)) to \(number(hi, h.unit)))" }
                o += "<td>\(xmlEscape(h.metric))</td><td class=\"n\">\(xmlEscape(v))</td><td class=\"n\">\(xmlEscape(h.target.map { number($0, h.unit) } ?? "-"))</td><td>\(xmlEscape(h.targetSource))</td>"
                o += "<td>" + (h.met.map { $0 ? "<span class=\"met\">met</span>" : "<span class=\"unmet\">not met</span>" } ?? "-") + "</td>"
            } else {
                o += "<td colspan=\"5\">no headline</td>"
            }
            o += "</tr>\n"
        }
        o += "</tbody></table>\n"
        for s in sections {
            o += "<section id=\"\(s.id)\"><h2>\(xmlEscape(label(s)))</h2>\n<p>\(xmlEscape(s.title))\(s.runs > 1 ? " (\(s.runs) runs merged)" : "")</p>\n"
            if let h = s.headline { o += "<p class=\"finding\">\(xmlEscape(h.text))</p>\n" }
            for f in s.figures {
                o += "<figure id=\"\(s.id)-\(slug(f.id))\">" + SVGChart.render(f) + "<figcaption>" + xmlEscape(f.caption)
                let sources = Array(Set(f.references.map { "\($0.label): \($0.source)" })).sorted()
                if !sources.isEmpty { o += " <b>Reference points</b> (hollow diamonds): " + xmlEscape(sources.joined(separator: "; ")) + "." }
                o += "</figcaption></figure>\n"
            }
            for (i, t) in s.tables.enumerated() {
                o += table(t, csv: csvLinks ? "\(s.id)/\(ReportFiles.csvName(t, index: i, in: s.tables))" : nil)
            }
            if !s.notes.isEmpty { o += "<ul class=\"notes\">" + s.notes.map { "<li>\(xmlEscape($0))</li>" }.joined() + "</ul>\n" }
            o += "</section>\n"
        }
        if !skipped.isEmpty { o += "<h2 id=\"skipped\">Skipped</h2><ul>" + skipped.map { "<li>\(xmlEscape($0))</li>" }.joined() + "</ul>\n" }
        if !footer.isEmpty { o += "<footer><p>\(xmlEscape(footer))</p></footer>\n" }
        return o + "</body></html>\n"
    }

    static func label(_ s: ReportSection) -> String { s.engine == "model" ? s.name : "\(s.name) (\(s.engine))" }

    static func number(_ v: Double, _ unit: String) -> String {
        let a = abs(v)
        let s: String
        if a != 0 && (a >= 1e6 || a < 1e-3) { s = String(format: "%.3g", v) } else if a >= 100 { s = formatGroupedSigned(v) } else { s = Ticks.trim(a) }
        let signed = (v < 0 && !s.hasPrefix("-")) ? "-" + s : s
        return unit.isEmpty ? signed : unit == "%" ? signed + "%" : "\(signed) \(unit)"
    }

    static func formatGroupedSigned(_ v: Double) -> String {
        let i = Int64(v.rounded())
        var digits = String(abs(i))
        var out = ""
        while digits.count > 3 {
            out = "," + digits.suffix(3) + out
            digits.removeLast(3)
        }
        return (i < 0 ? "-" : "") + digits + out
    }

    static func table(_ t: TextTable, csv: String?) -> String {
        var o = "<table>"
        if t.title != nil || csv != nil {
            o += "<caption>\(xmlEscape(t.title ?? ""))"
            if let c = csv { o += " <a class=\"csv\" href=\"\(xmlEscape(c))\">CSV</a>" }
            o += "</caption>"
        }
        o += "<thead><tr>" + t.header.map { "<th>\(xmlEscape($0))</th>" }.joined() + "</tr></thead><tbody>"
        for r in t.rows {
            o += "<tr>" + r.enumerated().map { i, c in i > 0 && isNumeric(c) ? "<td class=\"n\">\(xmlEscape(c))</td>" : "<td>\(xmlEscape(c))</td>" }.joined() + "</tr>"
        }
        return o + "</tbody></table>\n"
    }
}
