import Foundation
import MemVirtCore
import MemVirtExperiments
import Testing

/// FNV-1a 64, written here from its definition (offset basis 14695981039346656037, prime
/// 1099511628211), as the oracle for point IDs.
func fnv1a64(_ s: String) -> UInt64 {
    var h: UInt64 = 14_695_981_039_346_656_037
    for b in s.utf8 { h = (h ^ UInt64(b)) &* 1_099_511_628_211 }
    return h
}

@Suite("Sweep files and plans")
struct SweepPlanTests {
    static let text = """
        [base]
        workload.pattern = "uniform"
        workload.accesses = "20K"

        [axes]
        workload.footprint = ["1MiB", "8MiB", "64MiB"]
        platform.paging = ["native", "nested"]
        workload.seed = [1, 2]
        """

    @Test("Points come in canonical order (axes sorted by key, last fastest) with IDs hashing their scenario")
    func orderAndIDs() throws {
        let plan = try SweepPlan(file: SweepFile(text: Self.text, path: "s.toml"))
        #expect(plan.axes.map(\.key) == ["platform.paging", "workload.footprint", "workload.seed"])
        // The oracle: nested loops in the canonical order, the scenario written by hand.
        var expected: [(String, String, Int)] = []
        for paging in ["native", "nested"] { for fp in ["1MiB", "8MiB", "64MiB"] { for seed in [1, 2] { expected.append((paging, fp, seed)) } } }
        #expect(plan.points.count == expected.count)
        for (i, (p, e)) in zip(plan.points, expected).enumerated() {
            #expect(p.index == i)
            #expect(p.values.map(\.description) == [e.0, e.1, String(e.2)])
            let scenario = """
                [workload]
                accesses = "20K"
                footprint = "\(e.1)"
                pattern = "uniform"
                seed = \(e.2)

                [platform]
                paging = "\(e.0)"

                """
            #expect(p.scenario == scenario)
            let hex = String(fnv1a64(scenario), radix: 16)
            #expect(p.id == String((String(repeating: "0", count: 16 - hex.count) + hex).prefix(12)))
        }
        #expect(Set(plan.points.map(\.id)).count == plan.points.count)
    }

    @Test("The same file gives the same plan; reordering axes or keys changes nothing; a new value keeps the old IDs")
    func stability() throws {
        let a = try SweepPlan(file: SweepFile(text: Self.text, path: "s.toml"))
        let b = try SweepPlan(file: SweepFile(text: Self.text, path: "other/place.toml"))
        #expect(a.points.map(\.id) == b.points.map(\.id))
        let reordered = """
            [axes]
            workload.seed = [1, 2]
            platform.paging = ["native", "nested"]
            workload.footprint = ["1MiB", "8MiB", "64MiB"]
            [base.workload]
            accesses = "20K"
            pattern = "uniform"
            """
        let c = try SweepPlan(file: SweepFile(text: reordered, path: "r.toml"))
        #expect(c.points.map(\.id) == a.points.map(\.id))
        let more = Self.text.replacingOccurrences(of: "workload.seed = [1, 2]", with: "workload.seed = [1, 2, 3]")
        let d = try SweepPlan(file: SweepFile(text: more, path: "m.toml"))
        #expect(d.points.count == 18)
        #expect(Set(a.points.map(\.id)).isSubset(of: Set(d.points.map(\.id))))
        // Changing the base changes every ID: old results are never taken for new points.
        let rebased = Self.text.replacingOccurrences(of: "\"20K\"", with: "\"30K\"")
        let e = try SweepPlan(file: SweepFile(text: rebased, path: "e.toml"))
        #expect(Set(e.points.map(\.id)).isDisjoint(with: Set(a.points.map(\.id))))
    }

    @Test("[[exclude]] removes exactly the matching combinations; a list matches any of its values")
    func exclusion() throws {
        let text = Self.text + """

            [[exclude]]
            platform.paging = "native"
            workload.footprint = ["8MiB", "64MiB"]

            [[exclude]]
            workload.seed = 2
            workload.footprint = "1MiB"
            """
        let plan = try SweepPlan(file: SweepFile(text: text, path: "x.toml"))
        let full = try SweepPlan(file: SweepFile(text: Self.text, path: "s.toml"))
        let keep = full.points.filter { p in
            let (paging, fp, seed) = (p.values[0].description, p.values[1].description, p.values[2].description)
            let ex1 = paging == "native" && (fp == "8MiB" || fp == "64MiB")
            let ex2 = seed == "2" && fp == "1MiB"
            return !(ex1 || ex2)
        }
        #expect(plan.points.map(\.id) == keep.map(\.id))
        #expect(plan.points.map(\.index) == Array(0..<keep.count))
        #expect(plan.excludedCount == full.points.count - keep.count)
        #expect(plan.points.count == 6)
    }

    func error(_ text: String) -> String {
        do {
            _ = try SweepPlan(file: SweepFile(text: text, path: "bad.toml"))
            return "no error"
        } catch {
            return "\(error)"
        }
    }

    @Test("Bad sweep files are refused with the file, the line and the allowed keys")
    func strictErrors() {
        let unknownTop = error("[base]\nworkload.pattern = \"uniform\"\n[axis]\nworkload.seed = [1]\n")
        #expect(unknownTop.contains("bad.toml:3"), "\(unknownTop)")
        #expect(unknownTop.contains("'axis'") && unknownTop.contains("base, axes, exclude"), "\(unknownTop)")

        let unknownKey = error("[base]\nworkload.pattern = \"uniform\"\nworkload.footprnt = \"1MiB\"\n")
        #expect(unknownKey.contains("bad.toml:3") && unknownKey.contains("workload.footprnt"), "\(unknownKey)")
        #expect(unknownKey.contains("workload.footprint"), "names the allowed keys: \(unknownKey)")

        let unknownSection = error("[axes]\nplatfrm.paging = [\"native\"]\n")
        #expect(unknownSection.contains("bad.toml:2") && unknownSection.contains("workload, platform"), "\(unknownSection)")

        let notList = error("[axes]\nworkload.seed = [1, 2]\nplatform.paging = \"nested\"\n")
        #expect(notList.contains("bad.toml:3") && notList.contains("must be a list"), "\(notList)")

        let emptyAxis = error("[axes]\nworkload.seed = []\n")
        #expect(emptyAxis.contains("bad.toml:2") && emptyAxis.contains("no values"), "\(emptyAxis)")

        let duplicate = error("[axes]\nworkload.seed = [1, 1]\n")
        #expect(duplicate.contains("twice"), "\(duplicate)")

        let exNotAxis = error("[axes]\nworkload.seed = [1, 2]\n[[exclude]]\nworkload.seed = 1\n[[exclude]]\nplatform.paging = \"native\"\n")
        #expect(exNotAxis.contains("bad.toml:6") && exNotAxis.contains("not an axis"), "\(exNotAxis)")

        let exBadValue = error("[axes]\nworkload.seed = [1, 2]\n[[exclude]]\nworkload.seed = 3\n")
        #expect(exBadValue.contains("bad.toml:4") && exBadValue.contains("not one of"), "\(exBadValue)")

        let syntax = error("[axes]\nworkload.seed = [1, 2\n")
        #expect(syntax.hasPrefix("bad.toml:"), "\(syntax)")

        let nested = error("[base]\nworkload.pattern = [\"a\"]\n")
        #expect(nested.contains("bad.toml:2") && nested.contains("string, number or boolean"), "\(nested)")
    }

    @Test("A 1,000-point plan is made in well under a second")
    func thousandPoints() throws {
        let ten = (1...10).map(String.init).joined(separator: ", ")
        let text = "[base]\nworkload.pattern = \"uniform\"\n[axes]\nworkload.seed = [\(ten)]\nworkload.threads = [\(ten)]\nworkload.compute_per_access = [\(ten)]\n"
        let t0 = Date()
        let plan = try SweepPlan(file: SweepFile(text: text, path: "k.toml"))
        let seconds = Date().timeIntervalSince(t0)
        #expect(plan.points.count == 1000)
        #expect(Set(plan.points.map(\.id)).count == 1000)
        #expect(seconds < 1.0, "plan took \(seconds) s")
    }

    @Test("Point ranges: A-B inclusive, bounds checked")
    func ranges() throws {
        let plan = try SweepPlan(file: SweepFile(text: Self.text, path: "s.toml"))
        #expect(try plan.points(range: "3-5").map(\.index) == [3, 4, 5])
        #expect(try plan.points(range: "7").map(\.index) == [7])
        #expect(throws: InputError.self) { try plan.points(range: "5-3") }
        #expect(throws: InputError.self) { try plan.points(range: "0-12") }
        #expect(throws: InputError.self) { try plan.points(range: "x") }
        #expect(throws: InputError.self) { try plan.point(id: "nope") }
        try plan.check(digest: plan.digest)
        let other = try SweepPlan(file: SweepFile(text: Self.text.replacingOccurrences(of: "[1, 2]", with: "[2, 1]"), path: "s.toml"))
        #expect(other.digest != plan.digest, "the same points in another order are other indices")
        #expect(throws: InputError.self) { try other.check(digest: plan.digest) }
    }
}
