import MemVirtCore

/// A plain-text table: columns padded to their widest cell, numbers right-aligned.
public struct TextTable: Sendable {
    public var title: String?
    public var header: [String]
    public var rows: [[String]] = []
    public init(title: String? = nil, header: [String]) {
        self.title = title
        self.header = header
    }
    public mutating func add(_ row: [String]) { rows.append(row) }

    public var rendered: String {
        let all = [header] + rows
        let n = all.map(\.count).max() ?? 0
        var widths = [Int](repeating: 0, count: n)
        for r in all { for (i, c) in r.enumerated() { widths[i] = max(widths[i], c.count) } }
        func isNumeric(_ s: String) -> Bool {
            guard let f = s.first else { return false }
            return f.isNumber || ((f == "-" || f == "+") && s.count > 1)
        }
        func line(_ r: [String]) -> String {
            r.enumerated().map { i, c in
                let pad = String(repeating: " ", count: widths[i] - c.count)
                return i > 0 && isNumeric(c) ? pad + c : c + pad
            }.joined(separator: "  ").replacing(/\s+$/, with: "")
        }
        var out = ""
        if let t = title { out += t + "\n" }
        out += line(header) + "\n"
        out += widths.map { String(repeating: "-", count: $0) }.joined(separator: "  ") + "\n"
        for r in rows { out += line(r) + "\n" }
        return out
    }
}

/// Cycles as a grouped whole number ("1,234,567"); a count a UInt64 cannot hold (a huge
/// `--compute-per-access` makes the ledger exceed 2^64: issue 17 defect 4, it trapped) is
/// written as a Double ("1.8e+22"), never converted.
func groupedCycles(_ v: Double) -> String {
    let r = v.rounded()
    guard r >= 0, r < 18_446_744_073_709_551_616.0 else { return r.isFinite ? "\(r)" : formatFixed(r, digits: 0) }
    return formatGrouped(UInt64(r))
}

/// Human-readable renderings of results.
public enum TextReport {
    public static func run(_ r: RunResult) -> String {
        var out = "memvirt run: \(r.engine) engine, \(r.paging) paging, \(r.pageSize) pages, workload \(r.workload.pattern)"
        out += ", footprint \(r.workload.footprint)"
        if case .lackey = r.workload.pattern {} else { out += ", seed \(r.workload.seed)" }  // a trace has none
        out += "\n\n"
        var t = TextTable(header: ["counter", "value", "meaning"])
        for (c, v) in r.counters.reported { t.add([c.name, formatGrouped(v), c.meaning]) }
        out += t.rendered
        if let cycles = r.cycles {
            out += "\n"
            var b = TextTable(header: ["cycles", "value", "share"])
            for (name, v) in r.cycleBreakdown {
                b.add([name, groupedCycles(v), formatFixed(100 * v / max(cycles, 1), digits: 1) + "%"])
            }
            b.add(["total", groupedCycles(cycles), "100.0%"])
            out += b.rendered
            let accesses = r.counters[.accesses]
            if accesses > 0 {
                out += "\ncycles per access: \(formatFixed(cycles / Double(accesses), digits: 2))"
                let misses = r.counters[.tlbMisses]
                if misses > 0 {
                    out += ", walk references per TLB miss: \(formatFixed(Double(r.counters[.walkMemoryRefs]) / Double(misses), digits: 2))"
                }
                out += "\n"
            }
        }
        for (k, v) in r.extra { out += "\(k): \(v.rendered())\n" }
        out += "wall time: \(formatFixed(r.wallSeconds, digits: 3)) s\n"
        return out
    }
}
