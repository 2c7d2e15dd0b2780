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

/// Human-readable renderings of results.
public enum TextReport {
    public static func run(_ r: RunResult) -> String {
        var out = "memvirt run: \(r.engine) engine, \(r.paging) paging, \(r.pageSize) pages, workload \(r.workload.pattern)"
        out += ", footprint \(r.workload.footprint), seed \(r.workload.seed)\n\n"
        var t = TextTable(header: ["counter", "value", "meaning"])
        for (c, v) in r.counters.reported { t.add([c.name, formatGrouped(v), c.meaning]) }
        out += t.rendered
        if let cycles = r.cycles {
            out += "\n"
            var b = TextTable(header: ["cycles", "value", "share"])
            for (name, v) in r.cycleBreakdown {
                b.add([name, formatGrouped(UInt64(v.rounded())), formatFixed(100 * v / max(cycles, 1), digits: 1) + "%"])
            }
            b.add(["total", formatGrouped(UInt64(cycles.rounded())), "100.0%"])
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
