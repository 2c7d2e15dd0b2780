import MemVirtCore

/// One configuration of a sweep.
public struct SweepPoint: Sendable, Hashable {
    /// Position in the plan (0-based): what `--points A-B` and Slurm array tasks count.
    public var index: Int
    /// `SweepPlan.pointID(scenario:)`: a hash of the point's whole scenario.
    public var id: String
    /// The axis values, in the plan's axis order.
    public var values: [ScenarioValue]
    /// The point's scenario as a TOML document (the base with the axis values substituted),
    /// what `memvirt run --config` reads.
    public var scenario: String
}

/// The points of a sweep file, in canonical order.
///
/// Order: axes sorted by key (`platform.paging` before `workload.footprint`), values in the
/// order the file lists them, the last axis varying fastest (an odometer); excluded
/// combinations are left out and the remaining points numbered 0, 1, 2, ...
///
/// IDs: the first 12 hex digits of the 64-bit FNV-1a hash of the point's canonical scenario
/// text (sections in schema order, keys sorted, values as TOML writes them). The ID depends
/// only on what the point runs: the same file gives the same IDs on every machine, reordering
/// axes or adding a value keeps the IDs (and results) of the points that did not change, and
/// changing the base changes every ID, so stale results are never taken for new ones.
public struct SweepPlan: Sendable {
    public var file: SweepFile
    public var axes: [SweepAxis]
    public var points: [SweepPoint]
    /// Combinations the file's [[exclude]] tables removed.
    public var excludedCount: Int

    public init(file: SweepFile) throws {
        self.file = file
        let axes = file.axes
        var points: [SweepPoint] = []
        var excluded = 0
        var seen: [String: Int] = [:]
        let counts = axes.map(\.values.count)
        let total = counts.reduce(1, *)
        var digits = [Int](repeating: 0, count: axes.count)
        for _ in 0..<total {
            let values = zip(axes, digits).map { $0.values[$1] }
            let isExcluded = file.excludes.contains { ex in
                ex.allSatisfy { key, vals in
                    let i = axes.firstIndex { $0.key == key }!
                    return vals.contains(values[i])
                }
            }
            if isExcluded {
                excluded += 1
            } else {
                var scenario = file.base
                for (a, v) in zip(axes, values) { scenario[a.key] = v }
                let text = Self.render(scenario)
                let id = Self.pointID(scenario: text)
                if let other = seen[id] {
                    throw InputError("\(file.path): points \(other) and \(points.count) hash to the same ID \(id); change a value's spelling")
                }
                seen[id] = points.count
                points.append(SweepPoint(index: points.count, id: id, values: values, scenario: text))
            }
            // Odometer: the last axis fastest.
            var i = axes.count - 1
            while i >= 0 {
                digits[i] += 1
                if digits[i] < counts[i] { break }
                digits[i] = 0
                i -= 1
            }
        }
        self.axes = axes
        self.points = points
        excludedCount = excluded
    }

    /// A digest of the whole plan (every ID in order): an sbatch script carries it, so a task
    /// refuses to run when the sweep file changed after the script was written (the indices
    /// it was given would name other points).
    public var digest: String { Self.pointID(scenario: points.map(\.id).joined(separator: "\n")) }

    /// Checks `expected` against `digest`.
    public func check(digest expected: String) throws {
        guard expected == digest else {
            throw InputError("\(file.path): the plan changed since the script was written (plan digest \(digest), the script expects \(expected)); write the script again with `memvirt sweep slurm`")
        }
    }

    /// The point with `id`, or an error listing how to find IDs.
    public func point(id: String) throws -> SweepPoint {
        guard let p = points.first(where: { $0.id == id }) else {
            throw InputError("\(file.path): no point with ID '\(id)' (\(points.count) points; list them with `memvirt sweep plan \(file.path)`)")
        }
        return p
    }

    /// Points `a...b` from a range written `A-B` (or a single index `A`), 0-based, inclusive.
    public func points(range text: String) throws -> ArraySlice<SweepPoint> {
        let parts = text.split(separator: "-", omittingEmptySubsequences: false)
        guard (1...2).contains(parts.count), let a = Int(parts[0]), let b = Int(parts.last!), a >= 0, a <= b else {
            throw InputError("points '\(text)': write A-B with 0 <= A <= B (0-based point indices, inclusive)")
        }
        guard b < points.count else {
            throw InputError("points '\(text)': the plan has \(points.count) points (indices 0-\(points.count - 1))")
        }
        return points[a...b]
    }

    /// A scenario as TOML: sections in schema order, keys sorted within each.
    public static func render(_ scenario: [String: ScenarioValue]) -> String {
        var out = ""
        for (section, _) in ScenarioKeys.sections {
            let keys = scenario.keys.filter { $0.hasPrefix(section + ".") }.sorted()
            guard !keys.isEmpty else { continue }
            if !out.isEmpty { out += "\n" }
            out += "[\(section)]\n"
            for k in keys { out += "\(k.dropFirst(section.count + 1)) = \(scenario[k]!.toml)\n" }
        }
        return out
    }

    /// 12 hex digits of FNV-1a 64 over the scenario text's UTF-8 bytes.
    public static func pointID(scenario: String) -> String {
        let h = FNV1a.hash(bytes: scenario.utf8)
        let hex = String(h, radix: 16)
        return String((String(repeating: "0", count: 16 - hex.count) + hex).prefix(12))
    }

    public var json: JSONValue {
        .object([
            ("schema", "memvirt.sweep-plan/1"), ("file", .string(file.path)), ("count", .int(Int64(points.count))),
            ("excluded", .int(Int64(excludedCount))), ("digest", .string(digest)),
            ("axes", .array(axes.map { a in .object([("key", .string(a.key)), ("values", .array(a.values.map(\.json)))]) })),
            ("points", .array(points.map { p in
                .object([("index", .int(Int64(p.index))), ("id", .string(p.id)),
                         ("axes", .object(zip(axes, p.values).map { ($0.key, $1.json) }))])
            })),
        ])
    }
}
