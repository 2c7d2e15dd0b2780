import Foundation
import MemVirtCore
import MemVirtReport

/// A sweep's result directory merged: one row per point, a column per axis and per counter,
/// tables and figures along the axes. Reads only `DIR/*.json` files of schema
/// `memvirt.sweep-point/1` (each names its axes), so it needs no sweep file.
public struct SweepMerge: Sendable {
    public struct Row: Sendable {
        public var id: String
        public var index: Int
        /// Axis key -> value.
        public var axes: [String: ScenarioValue]
        /// Column -> value (numbers and strings from the run's JSON).
        public var metrics: [String: JSONValue]
    }

    /// Axis keys in the order the results list them.
    public var axes: [String]
    /// Axis key -> its values in the order first seen by point index.
    public var axisValues: [String: [ScenarioValue]]
    /// Metric columns: `cycles`, then counters by name, `cycles.<category>`, other fields dotted.
    public var columns: [String]
    /// Sorted by point index, then ID.
    public var rows: [Row]

    /// The CSV, tables and figures of the results in `directory`.
    public static func load(directory: String) throws -> (csv: String, tables: [TextTable], figures: [Figure]) {
        let m = try SweepMerge(directory: directory)
        return (m.csv, m.tables, m.figures())
    }

    public init(directory: String) throws {
        let fm = FileManager.default
        var isDir: ObjCBool = false
        guard fm.fileExists(atPath: directory, isDirectory: &isDir), isDir.boolValue else {
            throw InputError("'\(directory)' is not a directory of sweep results")
        }
        let names = try fm.contentsOfDirectory(atPath: directory).filter { $0.hasSuffix(".json") }.sorted()
        var rows: [Row] = []
        var axes: [String] = []
        var columns: [String] = []
        var seenColumns = Set<String>()
        for name in names {
            let path = "\(directory)/\(name)"
            guard let data = fm.contents(atPath: path), let text = String(data: data, encoding: .utf8) else {
                throw InputError("\(path): cannot read")
            }
            let v: JSONValue
            do { v = try JSONReader.parse(text) } catch { throw InputError("\(path): \(error)") }
            guard v["schema"]?.asString == SweepRunner.resultSchema else { continue }
            guard let id = v["id"]?.asString, let index = v["index"]?.asDouble, let axisPairs = v["axes"]?.asObject,
                  let result = v["result"]?.asObject else {
                throw InputError("\(path): a \(SweepRunner.resultSchema) file needs id, index, axes and result")
            }
            var row = Row(id: id, index: Int(index), axes: [:], metrics: [:])
            for (k, a) in axisPairs {
                if !axes.contains(k) { axes.append(k) }
                switch a {
                case .string(let s): row.axes[k] = .string(s)
                case .int(let i): row.axes[k] = .int(Int(i))
                case .uint(let u): row.axes[k] = .int(Int(u))
                case .double(let d): row.axes[k] = .double(d)
                case .bool(let b): row.axes[k] = .bool(b)
                default: throw InputError("\(path): axis \(k) is not a scalar")
                }
            }
            for (k, x) in Self.flatten(result) {
                row.metrics[k] = x
                if seenColumns.insert(k).inserted { columns.append(k) }
            }
            rows.append(row)
        }
        guard !rows.isEmpty else { throw InputError("\(directory): no sweep results (\(SweepRunner.resultSchema) files) in it") }
        rows.sort { ($0.index, $0.id) < ($1.index, $1.id) }
        var axisValues: [String: [ScenarioValue]] = [:]
        for r in rows {
            for k in axes { if let v = r.axes[k], !(axisValues[k] ?? []).contains(v) { axisValues[k, default: []].append(v) } }
        }
        self.axes = axes
        self.axisValues = axisValues
        self.columns = columns
        self.rows = rows
    }

    /// The columns of one run's JSON: its inputs (schema, engine, paging, page size, workload)
    /// are left out (the axes and the scenario carry them); `counters.X` becomes `X`,
    /// `cycle_breakdown.X` becomes `cycles.X`, other nested fields are dotted.
    static func flatten(_ result: [(String, JSONValue)]) -> [(String, JSONValue)] {
        var out: [(String, JSONValue)] = []
        func walk(_ prefix: String, _ v: JSONValue) {
            switch v {
            case .object(let kv): for (k, x) in kv { walk(prefix.isEmpty ? k : "\(prefix).\(k)", x) }
            case .array: out.append((prefix, .string(v.rendered())))
            default: out.append((prefix, v))
            }
        }
        for (k, v) in result where !["schema", "engine", "paging", "page_size", "workload"].contains(k) {
            switch k {
            case "counters": for (c, x) in v.asObject ?? [] { walk(c, x) }
            case "cycle_breakdown": for (c, x) in v.asObject ?? [] { walk("cycles.\(c)", x) }
            default: walk(k, v)
            }
        }
        return out
    }

    static func cell(_ v: JSONValue?) -> String {
        guard let v else { return "" }
        switch v {
        case .null: return ""
        case .string(let s): return s
        default: return v.rendered()
        }
    }

    static func csvField(_ s: String) -> String {
        guard s.contains(where: { $0 == "," || $0 == "\"" || $0 == "\n" || $0 == "\r" }) else { return s }
        return "\"" + s.replacingOccurrences(of: "\"", with: "\"\"") + "\""
    }

    /// One header line, one line per point: `id,index,<axes...>,<columns...>`.
    public var csv: String {
        var out = (["id", "index"] + axes + columns).map(Self.csvField).joined(separator: ",") + "\n"
        for r in rows {
            let cells = [r.id, String(r.index)] + axes.map { r.axes[$0]?.description ?? "" } + columns.map { Self.cell(r.metrics[$0]) }
            out += cells.map(Self.csvField).joined(separator: ",") + "\n"
        }
        return out
    }

    /// The metric the figures and summary tables show: simulated cycles when the runs have
    /// them, else the first numeric column.
    public var headline: String? {
        if columns.contains("cycles"), rows.contains(where: { $0.metrics["cycles"]?.asDouble != nil }) { return "cycles" }
        return columns.first { c in rows.contains { $0.metrics[c]?.asDouble != nil } }
    }

    /// Axes with more than one value.
    var variedAxes: [String] { axes.filter { (axisValues[$0]?.count ?? 0) > 1 } }

    public var tables: [TextTable] {
        var out: [TextTable] = []
        // Points: axes, then the headline and the columns that differ between points (at most 8).
        let varying = columns.filter { c in
            Set(rows.map { Self.cell($0.metrics[c]) }).count > 1 && c != "wall_seconds"
        }
        var shown = Array(varying.prefix(8))
        if let h = headline, !shown.contains(h) { shown.insert(h, at: 0) }
        var t = TextTable(title: "Sweep points (\(rows.count)); all \(columns.count) columns are in the CSV", header: ["id"] + axes + shown)
        for r in rows {
            t.add([r.id] + axes.map { r.axes[$0]?.description ?? "" } + shown.map { Self.formatCell(r.metrics[$0]) })
        }
        out.append(t)
        // Per axis: the headline's mean, min and max over the points with each value.
        if let h = headline {
            for a in variedAxes {
                var s = TextTable(title: "\(h) by \(a)", header: [a, "points", "mean \(h)", "min", "max"])
                for v in axisValues[a] ?? [] {
                    let ys = rows.filter { $0.axes[a] == v }.compactMap { $0.metrics[h]?.asDouble }
                    guard !ys.isEmpty else { continue }
                    s.add([v.description, String(ys.count), formatGrouped(UInt64(max(0, ys.reduce(0, +) / Double(ys.count)).rounded())),
                           formatGrouped(UInt64(max(0, ys.min()!).rounded())), formatGrouped(UInt64(max(0, ys.max()!).rounded()))])
                }
                out.append(s)
            }
        }
        return out
    }

    static func formatCell(_ v: JSONValue?) -> String {
        guard let v else { return "" }
        switch v {
        case .uint(let u): return formatGrouped(u)
        case .int(let i): return i >= 0 ? formatGrouped(UInt64(i)) : String(i)
        case .double(let d): return abs(d) >= 1000 ? formatGrouped(UInt64(abs(d).rounded())) : formatFixed(d, digits: 3)
        default: return cell(v)
        }
    }

    /// Means of `metric` over the rows matching `fixed` (axis -> value).
    func mean(_ metric: String, where fixed: [String: ScenarioValue]) -> Double? {
        let ys = rows.filter { r in fixed.allSatisfy { r.axes[$0.key] == $0.value } }.compactMap { $0.metrics[metric]?.asDouble }
        return ys.isEmpty ? nil : ys.reduce(0, +) / Double(ys.count)
    }

    static func slug(_ s: String) -> String {
        var out = ""
        for c in s.lowercased() {
            if c.isASCII && (c.isLetter || c.isNumber) { out.append(c) } else if !out.hasSuffix("-") { out.append("-") }
        }
        return out.trimmingCharacters(in: CharacterSet(charactersIn: "-"))
    }

    func axis(_ key: String) -> Axis {
        let values = axisValues[key] ?? []
        let nums = values.compactMap(\.numeric)
        let isSize = values.allSatisfy { v in
            if case .string(let s) = v { return v.numeric != nil && s.contains(where: \.isLetter) }
            return false
        }
        let scale: Axis.Scale = nums.count == values.count && (nums.min() ?? 0) > 0 && (nums.max()! / nums.min()!) >= 16 ? .log : .linear
        return Axis(key, unit: isSize ? "bytes" : "", scale: scale)
    }

    /// For every varied axis X and every other varied axis S: a line per value of S against X
    /// (bars when X's values are words); for every pair of varied axes: a heatmap. Points
    /// that differ in the remaining axes are averaged (the caption says over which).
    public func figures() -> [Figure] {
        guard let h = headline else { return [] }
        let varied = variedAxes
        let yAxis = Axis(h, unit: h.hasPrefix("cycles") ? "cycles" : "")
        var out: [Figure] = []
        func averagedNote(_ used: [String]) -> String {
            let rest = varied.filter { !used.contains($0) }
            return rest.isEmpty ? "" : " Each point is the mean over \(rest.joined(separator: ", "))."
        }
        for x in varied {
            let xs = axisValues[x]!
            let numeric = xs.allSatisfy { $0.numeric != nil }
            let others = varied.filter { $0 != x }
            for s in (others.isEmpty ? [nil] : others.map { Optional($0) }) {
                let seriesValues: [ScenarioValue?] = s.map { axisValues[$0]!.map { Optional($0) } } ?? [nil]
                var series: [Series] = []
                for sv in seriesValues {
                    var pts: [DataPoint] = []
                    for (i, xv) in xs.enumerated() {
                        var fixed = [x: xv]
                        if let s, let sv { fixed[s] = sv }
                        if let y = mean(h, where: fixed) { pts.append(DataPoint(x: numeric ? xv.numeric! : Double(i), y: y)) }
                    }
                    series.append(Series(name: sv.map { "\(s!) = \($0.description)" } ?? h, points: pts))
                }
                let by = s.map { " by \($0)" } ?? ""
                out.append(Figure(
                    id: Self.slug("sweep-\(h)-vs-\(x)\(by)"), title: "\(h) against \(x)\(by)",
                    kind: numeric ? .line : .groupedBar, x: axis(x), y: yAxis, series: series,
                    categories: numeric ? [] : xs.map(\.description),
                    caption: "\(h) of each sweep point against \(x)\(s.map { ", one \(numeric ? "line" : "bar") per value of \($0)" } ?? "")." + averagedNote([x] + (s.map { [$0] } ?? []))))
            }
        }
        for (i, a) in varied.enumerated() {
            for b in varied[(i + 1)...] {
                let cols = axisValues[a]!, rowsB = axisValues[b]!
                let series = rowsB.map { bv in
                    Series(name: "\(b) = \(bv.description)", points: cols.enumerated().compactMap { j, av in
                        mean(h, where: [a: av, b: bv]).map { DataPoint(x: Double(j), y: $0) }
                    })
                }
                out.append(Figure(
                    id: Self.slug("sweep-\(h)-heatmap-\(a)-\(b)"), title: "\(h) where \(a) and \(b) cross",
                    kind: .heatmap, x: Axis(a), y: Axis(b), series: series, categories: cols.map(\.description),
                    caption: "Heatmap of \(h): columns are the values of \(a) (categories, x indexes them), rows are the values of \(b) (one series each), the cell value is y." + averagedNote([a, b])))
            }
        }
        return out
    }
}
