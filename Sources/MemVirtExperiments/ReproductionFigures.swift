import Foundation
import MemVirtCore
import MemVirtReport

/// The charts and the headline of every reproduction, built from the rows it already put in
/// its JSON (so a saved report.json from before reports carried figures rebuilds them too).
/// One function per reproduction; the reference points name their source. An unknown name,
/// or JSON without the expected rows (a skipped KVM run), gives no figures and no headline.
public enum ReproductionFigures {
    public static func derive(name: String, json: JSONValue) -> ([Figure], Headline?) {
        if json["skipped"] != nil { return ([], nil) }
        let kvm = json["engine"]?.asString?.hasPrefix("kvm") == true
        switch (name, kvm) {
        case ("tlb-reach", false): return tlbReach(json)
        case ("2d-walk", false): return twoDimensionalWalk(json)
        case ("rvi", false): return rvi(json)
        case ("fault-cost", false): return faultCost(json)
        case ("apf", false): return apf(json)
        case ("apf-sweep", false): return apfSweep(json)
        case ("ksm", false): return ksm(json)
        case ("log-dirty", false): return logDirty(json)
        case ("page-groups", false): return pageGroups(json)
        case ("migration", false): return migration(json)
        case ("validate", _): return validate(json)
        case ("apf", true), ("apf-sweep", true): return kvmAPF(json)
        case ("ksm", true): return kvmKSM(json)
        case ("migration", true): return kvmMigration(json)
        case ("migration-vs-qemu", _): return versusQEMU(json)
        default: return ([], nil)
        }
    }

    static func rows(_ j: JSONValue, _ key: String) -> [JSONValue] { j[key]?.asArray ?? [] }
    static func d(_ j: JSONValue?, _ key: String) -> Double? { j?[key]?.asDouble }
    static func s(_ j: JSONValue?, _ key: String) -> String { j?[key]?.asString ?? "" }
    static func fmt(_ v: Double, _ digits: Int = 2) -> String { formatFixed(v, digits: digits) }
    static func sentenceCase(_ t: String) -> String { t.prefix(1).uppercased() + t.dropFirst() }
    /// Unique values in order of first appearance.
    static func unique(_ xs: [String]) -> [String] {
        var seen: Set<String> = [], out: [String] = []
        for x in xs where seen.insert(x).inserted { out.append(x) }
        return out
    }

    // MARK: - Translation

    static func tlbReach(_ j: JSONValue) -> ([Figure], Headline?) {
        let rs = rows(j, "rows")
        guard !rs.isEmpty else { return ([], nil) }
        let sizes = unique(rs.map { s($0, "page_size") })
        func series(_ key: String, scale: Double) -> [Series] {
            sizes.map { size in
                Series(name: "\(size) pages", points: rs.filter { s($0, "page_size") == size }.compactMap { r in
                    guard let fp = d(r, "footprint_bytes"), let v = d(r, key) else { return nil }
                    return DataPoint(x: fp / 1_048_576, y: v * scale)
                })
            }
        }
        let footprint = Axis("footprint", unit: "MiB", scale: .log)
        let miss = Figure(id: "miss-rate", title: "TLB miss rate against footprint", kind: .line, x: footprint,
                          y: Axis("TLB miss rate", unit: "%"), series: series("tlb_miss_rate", scale: 100),
                          caption: "Native paging, uniform random reads, pages pre-mapped; one line per page size.")
        let cycles = Figure(id: "cycles-per-access", title: "Cycles per access against footprint", kind: .line, x: footprint,
                            y: Axis("cycles per access", unit: "cycles"), series: series("cycles_per_access", scale: 1),
                            caption: "All cycles (translation and data) per access; the gap between lines is what large pages save.")
        let largest = rs.compactMap { d($0, "footprint_bytes") }.max() ?? 0
        let at = rs.filter { d($0, "footprint_bytes") == largest }
        let r4 = at.first { s($0, "page_size") == sizes.first }
        let big = at.filter { s($0, "page_size") != sizes.first }.min { (d($0, "tlb_miss_rate") ?? 1) < (d($1, "tlb_miss_rate") ?? 1) }
        let m4 = 100 * (d(r4, "tlb_miss_rate") ?? 0)
        var text = "At \(ByteCount(UInt64(largest))) of footprint, \(sizes.first ?? "4K") pages miss the TLB on \(fmt(m4))% of accesses"
        if let b = big { text += "; \(s(b, "page_size")) pages on \(fmt(100 * (d(b, "tlb_miss_rate") ?? 0)))%" }
        text += " (cycles per access \(fmt(d(r4, "cycles_per_access") ?? 0, 1))\(big.map { " against " + fmt(d($0, "cycles_per_access") ?? 0, 1) } ?? ""))."
        return ([miss, cycles], Headline(text: text, metric: "4K TLB miss rate at the largest footprint", value: m4, unit: "%"))
    }

    static func twoDimensionalWalk(_ j: JSONValue) -> ([Figure], Headline?) {
        let walks = rows(j, "walks"), avgs = rows(j, "averages")
        guard !walks.isEmpty else { return ([], nil) }
        let cats = walks.map { "\(Int(d($0, "guest_levels") ?? 0))/\(Int(d($0, "host_levels") ?? 0))" }
        let worst = Figure(
            id: "worst-case-refs", title: "References per TLB miss, every cache off", kind: .groupedBar,
            x: Axis("guest / host levels"), y: Axis("references per TLB miss"),
            series: [Series(name: "max counted", points: walks.enumerated().map { DataPoint(x: Double($0.offset), y: d($0.element, "max_walk_refs") ?? 0) }),
                     Series(name: "average counted", points: walks.enumerated().map { DataPoint(x: Double($0.offset), y: d($0.element, "avg_walk_refs") ?? 0) })],
            categories: cats,
            references: walks.enumerated().map { ReferencePoint(label: "(g+1)(h+1)-1", x: Double($0.offset), y: d($0.element, "closed_form") ?? 0, source: "Bhargava et al., ASPLOS 2008") },
            caption: "Counted by the model's walker with every TLB, walk cache and nested TLB off.")
        var figs = [worst]
        if !avgs.isEmpty {
            figs.append(Figure(
                id: "translation-cycles", title: "What walk caches and large pages save (4/4 levels)", kind: .groupedBar,
                x: Axis("configuration"), y: Axis("translation cycles per access", unit: "cycles"),
                series: [Series(name: "translation cycles/access", points: avgs.enumerated().map { DataPoint(x: Double($0.offset), y: d($0.element, "translation_cycles_per_access") ?? 0) })],
                categories: avgs.map { s($0, "configuration") },
                caption: "Uniform reads, Golden Cove TLBs; references per miss are in the table below."))
        }
        let allMatch = walks.allSatisfy { d($0, "max_walk_refs") == d($0, "closed_form") }
        let w44 = walks.first { d($0, "guest_levels") == 4 && d($0, "host_levels") == 4 } ?? walks[0]
        let v = d(w44, "max_walk_refs") ?? 0, target = d(w44, "closed_form") ?? 24
        return (figs, Headline(
            text: "A 4/4-level nested walk makes at most \(Int(v)) memory references per TLB miss (closed form \(Int(target))); \(allMatch ? "all four level pairs match (g+1)(h+1)-1" : "some level pairs differ from (g+1)(h+1)-1").",
            metric: "max references per miss, 4/4 levels", value: v, target: target, targetSource: "Bhargava et al., ASPLOS 2008", met: allMatch))
    }

    static func rvi(_ j: JSONValue) -> ([Figure], Headline?) {
        let cs = rows(j, "cases")
        guard !cs.isEmpty else { return ([], nil) }
        let cats = cs.map { "\(s($0, "workload").prefix(3)) \(s($0, "page_size")) (per \(s($0, "unit")))" }
        let fig = Figure(
            id: "shadow-vs-nested", title: "Shadow against nested paging", kind: .groupedBar,
            x: Axis("workload, page size"), y: Axis("cycles per unit", unit: "cycles", scale: .log),
            series: [Series(name: "shadow", points: cs.enumerated().map { DataPoint(x: Double($0.offset), y: d($0.element, "shadow_cycles_per_unit") ?? 0) }),
                     Series(name: "nested", points: cs.enumerated().map { DataPoint(x: Double($0.offset), y: d($0.element, "nested_cycles_per_unit") ?? 0) })],
            categories: cats,
            caption: "(a) fork/exec/exit loop: cycles per iteration; (b) uniform random reads: cycles per access. vmx-ept cost model. Log scale: the two workloads differ by orders of magnitude.")
        let a = cs.first { s($0, "workload").hasPrefix("(a)") }
        let b4 = cs.first { s($0, "workload").hasPrefix("(b)") && s($0, "page_size") == "4K" }
        let margin = d(a, "faster_by_percent") ?? 0
        let aNested = cs.filter { s($0, "workload").hasPrefix("(a)") }.allSatisfy { s($0, "winner") == "nested" }
        let met = aNested && s(b4, "winner") == "shadow"
        return ([fig], Headline(
            text: "On the page-table-update-heavy loop (4K) \(s(a, "winner")) paging wins by \(fmt(margin, 1))% (VMware: RVI up to 42-48% faster on MMU-intensive benchmarks); on TLB-miss-heavy reads (4K) \(s(b4, "winner")) wins by \(fmt(d(b4, "faster_by_percent") ?? 0, 1))%.",
            metric: "nested faster on fork/exec/exit (4K)", value: s(a, "winner") == "nested" ? margin : -margin, unit: "%", target: 42,
            targetSource: "VMware RVI study (2008-09); met = nested wins (a), shadow wins (b) 4K", met: met))
    }

    static func faultCost(_ j: JSONValue) -> ([Figure], Headline?) {
        let rs = rows(j, "rows")
        guard !rs.isEmpty else { return ([], nil) }
        let cats = rs.map { "\(s($0, "fault")) \(s($0, "paging")) \(s($0, "costs"))" }
        let fig = Figure(
            id: "cycles-per-fault", title: "Cycles per guest page fault, split by layer", kind: .stackedBar,
            x: Axis("fault, paging, cost model"), y: Axis("cycles per fault", unit: "cycles"),
            series: [Series(name: "guest and device", points: rs.enumerated().map { DataPoint(x: Double($0.offset), y: max(0, (d($0.element, "cycles_per_fault") ?? 0) - (d($0.element, "virtualization_cycles_per_fault") ?? 0))) }),
                     Series(name: "virtualization layer", points: rs.enumerated().map { DataPoint(x: Double($0.offset), y: d($0.element, "virtualization_cycles_per_fault") ?? 0) })],
            categories: cats,
            caption: "Virtualization layer: exits, hypervisor fault handling, emulation, shadow synchronization, host page allocation. Hard faults include a 4 KiB NVMe read.")
        let virt = Figure(
            id: "virt-cycles", title: "Virtualization-layer cycles per fault", kind: .groupedBar,
            x: Axis("fault, paging, cost model"), y: Axis("cycles per fault", unit: "cycles"),
            series: [Series(name: "virtualization layer", points: rs.enumerated().map { DataPoint(x: Double($0.offset), y: d($0.element, "virtualization_cycles_per_fault") ?? 0) })],
            categories: cats, caption: "The layer's cycles alone (the upper part of the stacks above).")
        let pvm = rs.first { s($0, "fault") == "soft" && s($0, "costs") == "pvm-shadow" } ?? rs.first { s($0, "paging") == "shadow" } ?? rs[0]
        let cpu = 100 * (d(pvm, "virtualization_cpu_at_50k_faults_per_s") ?? 0)
        return ([fig, virt], Headline(
            text: "A soft guest fault under \(s(pvm, "paging")) paging (\(s(pvm, "costs"))) costs \(formatGrouped(UInt64(d(pvm, "cycles_per_fault") ?? 0))) cycles, \(fmt(100 * (d(pvm, "virtualization_share") ?? 0), 1))% of them in the virtualization layer: at 50,000 faults/s that layer alone takes \(fmt(cpu, 1))% of a CPU (VMware KB 1687: tens of thousands of faults/s slow a VM to a crawl).",
            metric: "virtualization CPU at 50k soft faults/s (\(s(pvm, "costs")))", value: cpu, unit: "%"))
    }

    // MARK: - Host memory

    static let seedAPFRatio = 258_846_142_585.0 / 129_752_639_953.0

    static func apf(_ j: JSONValue) -> ([Figure], Headline?) {
        guard let ratio = d(j, "apf_work_ratio"), let on = j["with_apf"]?["time_profile"]?.asObject, let off = j["without_apf"]?["time_profile"]?.asObject else { return ([], nil) }
        let names = on.map(\.0)
        let cats = ["with APF", "without APF", "seed with APF", "seed without APF"]
        var series: [Series] = names.map { n in
            Series(name: n, points: [DataPoint(x: 0, y: 100 * (on.first { $0.0 == n }?.1.asDouble ?? 0)),
                                     DataPoint(x: 1, y: 100 * (off.first { $0.0 == n }?.1.asDouble ?? 0))])
        }
        // The seed's guest profile (perf in the guest, KVM Forum 2010): work thread, fault
        // thread, do_softirq; the rest unattributed.
        let seed: [(String, Double, Double)] = [("work_thread", 97.93, 63.42), ("fault_thread", 0, 8.95), ("guest_kernel", 0, 13.64)]
        for (n, w, wo) in seed {
            if let i = series.firstIndex(where: { $0.name == n }) {
                series[i].points += [DataPoint(x: 2, y: w), DataPoint(x: 3, y: wo)]
            } else {
                series.append(Series(name: n, points: [DataPoint(x: 2, y: w), DataPoint(x: 3, y: wo)]))
            }
        }
        series.append(Series(name: "seed: not in the profile", points: [DataPoint(x: 2, y: 100 - 97.93), DataPoint(x: 3, y: 100 - 63.42 - 8.95 - 13.64)]))
        let profile = Figure(
            id: "vcpu-time", title: "Where vCPU time went, with and without APF", kind: .stackedBar,
            x: Axis("run"), y: Axis("share of vCPU time", unit: "%"), series: series, categories: cats,
            references: [ReferencePoint(label: "seed: work thread share", x: 2, y: 97.93, source: "seed 001, KVM Forum 2010 guest profile"),
                         ReferencePoint(label: "seed: work thread share", x: 3, y: 63.42, source: "seed 001, KVM Forum 2010 guest profile")],
            caption: "Model: share of 4 vCPUs' time by category. Seed: the guest profiler's shares (it cannot sample while a vCPU is blocked, so its work share without APF is higher than the vCPU-time share).")
        let totals = Figure(
            id: "work-ratio", title: "Counter-thread work, with APF / without", kind: .groupedBar,
            x: Axis(""), y: Axis("work with APF / work without"),
            series: [Series(name: "model", points: [DataPoint(x: 0, y: ratio)])], categories: ["apf_work_ratio"],
            references: [ReferencePoint(label: "seed ratio", x: 0, y: seedAPFRatio, source: "seed 001, KVM Forum 2010: 258.8e9 / 129.8e9 increments")],
            caption: "Total increments of the counter threads in the same simulated time.")
        let met = abs(ratio - seedAPFRatio) / seedAPFRatio <= 0.15
        return ([profile, totals], Headline(
            text: "With async page faults the counter threads do \(fmt(ratio, 3))x the work they do without (seed: \(fmt(seedAPFRatio, 3))x); their share of vCPU time is \(fmt(100 * (d(j, "work_share_with_apf") ?? 0), 1))% with APF against \(fmt(100 * (d(j, "work_share_without_apf") ?? 0), 1))% without.",
            metric: "APF work ratio", value: ratio, target: seedAPFRatio, targetSource: "seed 001 (KVM Forum 2010); met within 15%", met: met))
    }

    static func apfSweep(_ j: JSONValue) -> ([Figure], Headline?) {
        let ps = rows(j, "points")
        guard !ps.isEmpty else { return ([], nil) }
        let ratios = unique(ps.map { "\(Int(d($0, "overcommit") ?? 0))x" })
        let lats = Array(Set(ps.compactMap { d($0, "read_latency_ns") })).sorted()
        let line = Figure(
            id: "work-ratio-vs-latency", title: "APF work ratio against swap read latency", kind: .line,
            x: Axis("swap read latency", unit: "us", scale: .log), y: Axis("work with APF / work without"),
            series: ratios.map { r in
                Series(name: "overcommit \(r)", points: ps.filter { "\(Int(d($0, "overcommit") ?? 0))x" == r }.compactMap { p in
                    guard let l = d(p, "read_latency_ns"), let v = d(p, "apf_work_ratio") else { return nil }
                    return DataPoint(x: l / 1000, y: v)
                })
            },
            references: [ReferencePoint(label: "seed ratio (disk swap)", x: (lats.last ?? 5e6) / 1000, y: seedAPFRatio, source: "seed 001, KVM Forum 2010")],
            caption: "Each point: the with/without pair of simulations at one overcommit ratio and device latency. 1 means APF gains nothing.")
        let heat = Figure(
            id: "work-ratio-heatmap", title: "APF work ratio over overcommit and latency", kind: .heatmap,
            x: Axis("swap read latency"), y: Axis("overcommit"),
            series: ratios.map { r in
                Series(name: r, points: ps.filter { "\(Int(d($0, "overcommit") ?? 0))x" == r }.compactMap { p in
                    guard let l = d(p, "read_latency_ns"), let i = lats.firstIndex(of: l), let v = d(p, "apf_work_ratio") else { return nil }
                    return DataPoint(x: Double(i), y: v)
                })
            },
            categories: lats.map { Ticks.label($0 / 1000) + " us" }, caption: "The same points as a grid; darker is a larger ratio.")
        let slow = ps.filter { d($0, "read_latency_ns") == lats.last }.max { (d($0, "overcommit") ?? 0) < (d($1, "overcommit") ?? 0) }
        let fast = ps.filter { d($0, "read_latency_ns") == lats.first }.max { (d($0, "overcommit") ?? 0) < (d($1, "overcommit") ?? 0) }
        let v = d(slow, "apf_work_ratio") ?? 0
        return ([line, heat], Headline(
            text: "At \(Ticks.label((lats.last ?? 0) / 1000)) us per page-in and \(Int(d(slow, "overcommit") ?? 0))x overcommit APF gives \(fmt(v, 3))x the work (seed, disk swap: \(fmt(seedAPFRatio, 3))x); at \(Ticks.label((lats.first ?? 0) / 1000)) us it gives \(fmt(d(fast, "apf_work_ratio") ?? 0, 3))x.",
            metric: "APF work ratio, slowest device, highest overcommit", value: v, target: seedAPFRatio, targetSource: "seed 001 (KVM Forum 2010, disk swap)"))
    }

    static func ksm(_ j: JSONValue) -> ([Figure], Headline?) {
        let pts = rows(j, "series")
        guard !pts.isEmpty else { return ([], nil) }
        let mib = 4096.0 / 1_048_576
        let bound = d(j, "pages_sharing_upper_bound") ?? 0
        let lastT = pts.compactMap { d($0, "t_seconds") }.max() ?? 0
        let saved = Figure(
            id: "saved-over-time", title: "Memory KSM saves over time", kind: .line,
            x: Axis("simulated time", unit: "s"), y: Axis("saved (pages_sharing x 4 KiB)", unit: "MiB"),
            series: [Series(name: "saved", points: pts.compactMap { p in d(p, "t_seconds").map { DataPoint(x: $0, y: (d(p, "pages_sharing") ?? 0) * mib) } })],
            references: [ReferencePoint(label: "upper bound: every image and zero page merged", x: lastT, y: bound * mib, source: "this run's content mix")],
            caption: "Four guests with 60% image pages, 20% zero pages; ksmd at its default rate.")
        let cow = Figure(
            id: "cow-over-time", title: "Copy-on-write breaks over time", kind: .line,
            x: Axis("simulated time", unit: "s"), y: Axis("copy-on-write breaks (cumulative)"),
            series: [Series(name: "cow breaks", points: pts.compactMap { p in d(p, "t_seconds").map { DataPoint(x: $0, y: d(p, "cow_breaks") ?? 0) } })],
            caption: "Every guest write to a merged page: an EPT violation and a copy.")
        let savedMiB = (d(j, "saved_bytes") ?? 0) / 1_048_576
        return ([saved, cow], Headline(
            text: "KSM saves \(fmt(savedMiB, 1)) MiB across \(Int(d(j, "vms") ?? 0)) guests at the end (\(fmt(bound > 0 ? 100 * (d(j, "pages_sharing") ?? 0) / bound : 0, 1))% of the \(fmt(bound * mib, 1)) MiB upper bound), at the cost of \(formatGrouped(UInt64(d(j, "cow_breaks") ?? 0))) copy-on-write breaks.",
            metric: "memory saved at the end", value: savedMiB, unit: "MiB", target: bound * mib, targetSource: "upper bound from the content mix"))
    }

    // MARK: - Migration

    static func logDirty(_ j: JSONValue) -> ([Figure], Headline?) {
        let modes = rows(j, "modes")
        guard !modes.isEmpty else { return ([], nil) }
        let label = { (m: JSONValue) in "\(s(m, "mode"))/\(s(m, "harvest"))" }
        let perRound = Figure(
            id: "tracking-per-round", title: "Dirty-tracking cost per harvest round", kind: .line,
            x: Axis("round"), y: Axis("tracking cost per round", unit: "ms", scale: .log),
            series: modes.map { m in Series(name: label(m), points: rows(m, "rounds").compactMap { r in
                guard let x = d(r, "round"), let y = d(r, "tracking_ms"), y > 0 else { return nil }
                return DataPoint(x: x, y: y)
            }) },
            caption: "Fixup faults, re-shadowing, log-full exits and harvest, per round of guest time. Log scale.")
        let steady = Figure(
            id: "steady-split", title: "Steady-state tracking cost by part", kind: .stackedBar,
            x: Axis("mode / harvest"), y: Axis("ms per round", unit: "ms"),
            series: [("fixup faults", "steady_fixup_ms"), ("re-shadowing", "steady_reshadow_ms"), ("harvest", "steady_harvest_ms")].map { n, k in
                Series(name: n, points: modes.enumerated().map { DataPoint(x: Double($0.offset), y: d($0.element, k) ?? 0) })
            } + [Series(name: "other (exits)", points: modes.enumerated().map { i, m in
                DataPoint(x: Double(i), y: max(0, (d(m, "steady_tracking_ms") ?? 0) - (d(m, "steady_fixup_ms") ?? 0) - (d(m, "steady_reshadow_ms") ?? 0) - (d(m, "steady_harvest_ms") ?? 0)))
            })],
            categories: modes.map(label), caption: "Mean of rounds 2 onwards.")
        let lowest = modes.min { (d($0, "steady_tracking_ms") ?? .infinity) < (d($1, "steady_tracking_ms") ?? .infinity) }!
        let xen = modes.first { label($0) == "shadow-xen/bitmap" }
        let ratio = d(xen, "steady_reshadow_over_fixup") ?? 0
        return ([perRound, steady], Headline(
            text: "Lowest tracking cost: \(label(lowest)) at \(fmt(d(lowest, "steady_tracking_ms") ?? 0, 3)) ms per round; Xen-style shadow re-shadowing costs \(fmt(ratio, 1))x its fixup faults (xen-devel 2009: the blown-away shadows dominate).",
            metric: "Xen-style re-shadow / fixup cost", value: ratio, unit: "x", target: 1, targetSource: "xen-devel 2009: re-shadowing dominates (ratio > 1)", met: ratio > 1))
    }

    static func pageGroups(_ j: JSONValue) -> ([Figure], Headline?) {
        let gs = rows(j, "groups")
        guard !gs.isEmpty else { return ([], nil) }
        let ns = Array(Set(gs.compactMap { d($0, "n") })).sorted()
        let patterns = unique(gs.map { s($0, "pattern") })
        func fig(_ id: String, _ title: String, _ axis: Axis, _ key: String, _ scale: Double) -> Figure {
            Figure(id: id, title: title, kind: .groupedBar, x: Axis("pages per group (n)"), y: axis,
                   series: patterns.map { p in Series(name: p, points: gs.filter { s($0, "pattern") == p }.compactMap { g in
                       guard let n = d(g, "n"), let i = ns.firstIndex(of: n), let v = d(g, key) else { return nil }
                       return DataPoint(x: Double(i), y: v * scale)
                   }) },
                   categories: ns.map { "n=\(Int($0))" }, caption: "One write-protect fault un-protects a group of n pages: fewer faults, more bytes resent.")
        }
        let faults = fig("write-faults", "Write faults against group size", Axis("write faults", scale: .log), "write_faults", 1)
        let bytes = fig("bytes-sent", "Bytes sent against group size", Axis("sent", unit: "MiB"), "bytes_sent", 1.0 / 1_048_576)
        let p0 = patterns.last ?? ""
        let one = gs.first { s($0, "pattern") == p0 && d($0, "n") == ns.first }, most = gs.first { s($0, "pattern") == p0 && d($0, "n") == ns.last }
        let fr = (d(most, "write_faults") ?? 0) / max(d(one, "write_faults") ?? 1, 1)
        let br = (d(most, "bytes_sent") ?? 0) / max(d(one, "bytes_sent") ?? 1, 1)
        return ([faults, bytes], Headline(
            text: "For the \(p0) writer, groups of \(Int(ns.last ?? 1)) pages cut write faults to \(fmt(100 * fr, 1))% of n=1 while bytes sent change by \(fmt(br, 2))x.",
            metric: "write faults at the largest n / n=1 (\(p0))", value: 100 * fr, unit: "%"))
    }

    static func migration(_ j: JSONValue) -> ([Figure], Headline?) {
        let rs = rows(j, "rows")
        guard !rs.isEmpty else { return ([], nil) }
        let label = { (r: JSONValue) in "\(s(r, "guest")) \(s(r, "migration"))\(r["auto_converge"]?.asBool == true ? " +AC" : "")" }
        let withRounds = rs.filter { rows($0, "per_round").count > 1 && s($0, "migration").hasPrefix("pre") }
        let dirty = Figure(
            id: "dirty-per-round", title: "Dirty pages per migration round", kind: .line,
            x: Axis("round"), y: Axis("dirty pages", scale: .log),
            series: withRounds.map { r in Series(name: label(r), points: rows(r, "per_round").compactMap { p in
                guard let x = d(p, "round"), let y = d(p, "dirty_pages"), y > 0 else { return nil }
                return DataPoint(x: x, y: y)
            }) },
            caption: "Pre-copy cases: pages dirtied while the previous round was sent. Log scale.")
        let cats = rs.map(label)
        let times = Figure(
            id: "downtime-total", title: "Downtime and total time per case", kind: .groupedBar,
            x: Axis("guest, migration"), y: Axis("time", unit: "ms", scale: .log),
            series: [Series(name: "downtime", points: rs.enumerated().compactMap { i, r in d(r, "downtime_ms").map { DataPoint(x: Double(i), y: max($0, 0.01)) } }),
                     Series(name: "total", points: rs.enumerated().compactMap { i, r in d(r, "total_ms").map { DataPoint(x: Double(i), y: max($0, 0.01)) } })],
            categories: cats,
            references: cats.indices.map { ReferencePoint(label: "QEMU downtime-limit 300 ms", x: Double($0), y: 300, source: "QEMU defaults") },
            caption: "QEMU's defaults: 128 MiB/s, 300 ms downtime limit. Clark et al. (NSDI 2005) report 60-210 ms downtime for Xen pre-copy.")
        let web = rs.first { s($0, "guest").hasPrefix("web") && s($0, "migration").hasPrefix("pre") && $0["auto_converge"]?.asBool != true } ?? rs[0]
        let down = d(web, "downtime_ms") ?? 0
        return (withRounds.isEmpty ? [times] : [dirty, times], Headline(
            text: "\(sentenceCase(label(web))): \(fmt(down, 1)) ms of downtime in \(Int(d(web, "rounds") ?? 0)) rounds, \(fmt(d(web, "total_ms") ?? 0, 0)) ms in all (QEMU's downtime limit: 300 ms; Clark et al.: 60-210 ms).",
            metric: "downtime, \(label(web))", value: down, unit: "ms", target: 300, targetSource: "QEMU downtime-limit default", met: down <= 300))
    }

    // MARK: - Cross-engine and KVM

    static func validate(_ j: JSONValue) -> ([Figure], Headline?) {
        if !rows(j, "cases").isEmpty { return validateCases(j) }
        let rs = rows(j, "rows")
        guard !rs.isEmpty else { return ([], nil) }
        let faults = Figure(
            id: "pf-fixed", title: "Shadow faults: model prediction against KVM", kind: .scatter,
            x: Axis("KVM pf_fixed (measured)", scale: .log), y: Axis("model shadow pf_fixed (predicted)", scale: .log),
            series: rs.map { r in Series(name: s(r, "workload"), points: [DataPoint(x: max(d(r, "kvm_pf_fixed") ?? 1, 1), y: max(d(r, "model_shadow_pf_fixed") ?? 1, 1))]) },
            caption: "One point per workload; on the dashed line the model predicts KVM's count exactly.")
        let time = Figure(
            id: "wall-time", title: "Run time: model against KVM", kind: .scatter,
            x: Axis("KVM wall time (measured)", unit: "s", scale: .log), y: Axis("model shadow wall time", unit: "s", scale: .log),
            series: rs.map { r in Series(name: s(r, "workload"), points: [DataPoint(x: max(d(r, "kvm_wall_seconds") ?? 0, 1e-4), y: max(d(r, "model_shadow_wall_seconds") ?? 0, 1e-4))]) },
            caption: "Wall time of the same workload on both engines (the model simulates, KVM runs).")
        let all = j["all_equal"]?.asBool ?? false
        let ratios = rs.map { (d($0, "model_shadow_pf_fixed") ?? 0) / max(d($0, "kvm_pf_fixed") ?? 1, 1) }
        let worst = ratios.max { abs($0 - 1) < abs($1 - 1) } ?? 1
        return ([faults, time], Headline(
            text: "Both engines compute the same read sums and memory checksums on \(rs.count) workloads: \(all ? "all equal" : "SOME DIFFER"); the model's shadow pf_fixed is \(fmt(worst, 3))x KVM's at worst.",
            metric: "workloads with equal results", value: Double(rs.filter { $0["read_sum_equal"]?.asBool == true && $0["memory_equal"]?.asBool == true }.count),
            target: Double(rs.count), targetSource: "every workload equal", met: all))
    }

    /// `memvirt validate`'s JSON (`Validation`): per case the measured time (median, the
    /// repeats' range), the prediction and the native loop; the signed time error; the judged
    /// counters' model/KVM ratios.
    static func validateCases(_ j: JSONValue) -> ([Figure], Headline?) {
        let cs = rows(j, "cases")
        let names = cs.map { s($0, "name") }
        func range(_ c: JSONValue, _ key: String) -> (Double?, Double?) {
            let xs = (c[key]?.asArray ?? []).compactMap(\.asDouble)
            return (xs.min(), xs.max())
        }
        let timeSeries: [Series] = [
            Series(name: "measured on /dev/kvm", points: cs.enumerated().map { i, c in
                let (lo, hi) = range(c, "measured_seconds_runs")
                return DataPoint(x: Double(i), y: d(c, "measured_seconds") ?? 0, low: lo, high: hi)
            }),
            Series(name: "predicted by the model", points: cs.enumerated().map { i, c in
                let (lo, hi) = range(c, "predicted_seconds_runs")
                return DataPoint(x: Double(i), y: d(c, "predicted_seconds") ?? 0, low: lo, high: hi)
            }),
            Series(name: "guest loop, native", points: cs.enumerated().compactMap { i, c in
                d(c, "native_seconds").map { DataPoint(x: Double(i), y: $0) }
            }),
        ]
        let time = Figure(
            id: "time-per-case", title: "Time of each case's measured phase: model against KVM", kind: .groupedBar,
            x: Axis("case"), y: Axis("time", unit: "s", scale: .log), series: timeSeries, categories: names,
            caption: "Measured: the KVM engine's CPU time of the phase, the median of the repeats (whiskers: their range). Predicted, whiskers each repeat's prediction: the model's cycles over the profile's clock (workload cases: the native loop's time plus the model's overhead, priced at the run's share of the host's slow state).")
        let error = Figure(
            id: "time-error", title: "Predicted time against measured, per case", kind: .groupedBar,
            x: Axis("case"), y: Axis("time error (predicted - measured) / measured", unit: "%"),
            series: [Series(name: "time error", points: cs.enumerated().map { i, c in DataPoint(x: Double(i), y: 100 * (d(c, "time_error") ?? 0)) }),
                     Series(name: "overhead error (workload cases)", points: cs.enumerated().compactMap { i, c in
                         d(c, "overhead_error").map { DataPoint(x: Double(i), y: 100 * $0) } })],
            categories: names,
            caption: "The tolerance is within 20% on every case and a mean |error| of at most 10%; the overhead error compares the model's overhead with KVM's time less the native loop's.")
        let judged = ["pf_fixed", "pf_taken", "pf_guest", "mmu_pte_write", "invlpg", "dirty_pages"]
        let counters = Figure(
            id: "counter-differences", title: "Judged counters: model against KVM", kind: .groupedBar,
            x: Axis("case"), y: Axis("(model - KVM) / KVM", unit: "%"),
            series: judged.compactMap { stat in
                let pts = cs.enumerated().compactMap { i, c -> DataPoint? in
                    guard let row = c["counters"]?[stat], row["deterministic"]?.asBool == true, let r = d(row, "ratio"),
                          (d(row, "kvm") ?? 0) > 0 else { return nil }
                    return DataPoint(x: Double(i), y: 100 * (r - 1))
                }
                return pts.isEmpty ? nil : Series(name: stat, points: pts)
            },
            categories: names,
            caption: "Every deterministic counter of every case; the tolerance is within 2%.")
        let mean = d(j, "mean_abs_time_error") ?? 0
        let within = cs.filter { $0["time_within_tolerance"]?.asBool == true }.count
        let countersOK = cs.allSatisfy { $0["counters_within_tolerance"]?.asBool == true }
        let all = j["all_within_tolerance"]?.asBool ?? false
        return ([time, error, counters], Headline(
            text: "The model predicts KVM's time on \(within) of \(cs.count) cases within 20% (mean |error| \(fmt(100 * mean, 1))%); judged counters within 2% on \(countersOK ? "every case" : "NOT every case").",
            metric: "mean |time error|", value: 100 * mean, unit: "%", target: 10,
            targetSource: "issue 11: every case within 20%, mean at most 10%, counters within 2%", met: all))
    }

    static func kvmAPF(_ j: JSONValue) -> ([Figure], Headline?) {
        guard let ratio = d(j, "apf_work_ratio") else { return ([], nil) }
        let seed = d(j, "seed_ratio") ?? seedAPFRatio
        var figs = [Figure(
            id: "work-ratio", title: "APF work ratio on /dev/kvm", kind: .groupedBar,
            x: Axis(""), y: Axis("work with APF / work without"),
            series: [Series(name: "measured (KVM engine)", points: [DataPoint(x: 0, y: ratio)]),
                     Series(name: "model engine", points: [DataPoint(x: 0, y: d(j, "model_ratio") ?? 0)])],
            categories: ["apf_work_ratio"],
            references: [ReferencePoint(label: "seed ratio", x: 0, y: seed, source: "seed 001, KVM Forum 2010")],
            caption: "Working threads' work per second with the guest runtime's async page faults against without, from the VMM's counters."),
            Figure(id: "work-share", title: "Working threads' share of vCPU time", kind: .groupedBar,
                   x: Axis(""), y: Axis("share", unit: "%"),
                   series: [Series(name: "without APF", points: [DataPoint(x: 0, y: 100 * (d(j, "work_share_without_apf") ?? 0))]),
                            Series(name: "with APF", points: [DataPoint(x: 0, y: 100 * (d(j, "work_share_with_apf") ?? 0))])],
                   categories: ["working threads"],
                   references: [ReferencePoint(label: "seed profile with APF", x: 0, y: 97.93, source: "seed 001 guest profile"),
                                ReferencePoint(label: "seed profile without APF", x: 0, y: 63.42, source: "seed 001 guest profile")],
                   caption: "From the VMM's scheduler.")]
        let sweep = rows(j, "sweep")
        if sweep.count > 1 {
            figs.append(Figure(
                id: "ratio-vs-store-delay", title: "APF work ratio against the store's delay", kind: .line,
                x: Axis("store delay per page", unit: "us", scale: .log), y: Axis("work with APF / work without"),
                series: [Series(name: "measured", points: sweep.compactMap { p in
                    guard let x = d(p, "store_delay_us"), x > 0, let y = d(p, "apf_work_ratio") else { return nil }
                    return DataPoint(x: x, y: y)
                })],
                caption: "Each point a with/without pair on /dev/kvm."))
        }
        let met = abs(ratio - seed) / seed <= 0.25
        return (figs, Headline(
            text: "On /dev/kvm the working threads do \(fmt(ratio, 3))x the work with APF (model engine \(fmt(d(j, "model_ratio") ?? 0, 3))x, seed \(fmt(seed, 3))x).",
            metric: "APF work ratio (KVM)", value: ratio, target: seed, targetSource: "seed 001 (KVM Forum 2010); met within 25%", met: met))
    }

    static func kvmKSM(_ j: JSONValue) -> ([Figure], Headline?) {
        guard let sharing = d(j, "pages_sharing") else { return ([], nil) }
        let merge = Figure(
            id: "merged-pages", title: "Pages merged by the host's ksmd", kind: .groupedBar,
            x: Axis("counter"), y: Axis("pages"),
            series: [Series(name: "measured", points: [DataPoint(x: 0, y: d(j, "pages_shared") ?? 0), DataPoint(x: 1, y: sharing)])],
            categories: ["pages_shared", "pages_sharing"],
            references: [ReferencePoint(label: "expected from the guests' content", x: 0, y: d(j, "expected_shared") ?? 0, source: "oracle: the content both VMs wrote"),
                         ReferencePoint(label: "expected from the guests' content", x: 1, y: d(j, "expected_sharing") ?? 0, source: "oracle: the content both VMs wrote")],
            caption: "Host counters as deltas over the run (/sys/kernel/mm/ksm).")
        let cow = Figure(
            id: "cow-cost", title: "Cost of a write: unmerged against merged pages", kind: .groupedBar,
            x: Axis("page"), y: Axis("time per write", unit: "ns", scale: .log),
            series: [Series(name: "measured", points: [DataPoint(x: 0, y: max(d(j, "unmerged_ns_per_write") ?? 1, 1)), DataPoint(x: 1, y: max(d(j, "cow_ns_per_write") ?? 1, 1))])],
            categories: ["unmerged", "merged (copy-on-write)"],
            references: (d(j, "model_cow_break_us")).map { [ReferencePoint(label: "model engine's COW break", x: 1, y: $0 * 1000, source: "model HostCosts")] } ?? [],
            caption: "VM 0 writes one word in each page; merged pages take a copy-on-write fault.")
        let savedMiB = (d(j, "saved_bytes") ?? 0) / 1_048_576, expectedMiB = (d(j, "expected_saved_bytes") ?? 0) / 1_048_576
        return ([merge, cow], Headline(
            text: "The host's KSM saves \(fmt(savedMiB, 1)) MiB of two VMs (expected \(fmt(expectedMiB, 1)) MiB); a write to a merged page costs \(fmt((d(j, "cow_ns_per_write") ?? 0) / 1000, 1)) us against \(fmt((d(j, "unmerged_ns_per_write") ?? 0) / 1000, 2)) us unmerged.",
            metric: "memory saved (KVM)", value: savedMiB, unit: "MiB", target: expectedMiB, targetSource: "content written by the guests",
            met: j["merge_reached_expected"]?.asBool))
    }

    static func kvmMigration(_ j: JSONValue) -> ([Figure], Headline?) {
        let cs = rows(j, "cases")
        guard !cs.isEmpty else { return ([], nil) }
        let cats = cs.map { s($0, "case") }
        let times = Figure(
            id: "downtime-total", title: "Live migration on /dev/kvm: downtime and total time", kind: .groupedBar,
            x: Axis("case"), y: Axis("time", unit: "ms", scale: .log),
            series: [Series(name: "downtime (guest-seen)", points: cs.enumerated().compactMap { i, c in d(c["source"], "downtime_ms").map { DataPoint(x: Double(i), y: max($0, 0.01)) } }),
                     Series(name: "total", points: cs.enumerated().compactMap { i, c in d(c["source"], "total_ms").map { DataPoint(x: Double(i), y: max($0, 0.01)) } })],
            categories: cats,
            references: cats.indices.map { ReferencePoint(label: "downtime target 60 ms", x: Double($0), y: 60, source: "issue's target for a 256 MiB guest writing 10 MiB/s") },
            caption: "Loopback migration of a real VM; downtime is the largest gap between two guest accesses across the switch.")
        let dirty = Figure(
            id: "dirty-per-round", title: "Dirty pages per round on /dev/kvm", kind: .line,
            x: Axis("round"), y: Axis("dirty pages"),
            series: cs.compactMap { c in
                let ds = rows(c["source"] ?? .null, "dirty_per_round").compactMap(\.asDouble)
                return ds.count > 1 ? Series(name: s(c, "case"), points: ds.enumerated().map { DataPoint(x: Double($0.offset + 1), y: $0.element) }) : nil
            },
            caption: "From KVM's dirty log, per pre-copy round.")
        let met = j["targets_met"]?.asBool
        let pre = cs[0]
        let down = d(pre["source"], "downtime_ms") ?? 0
        return (dirty.series.isEmpty ? [times] : [times, dirty], Headline(
            text: "\(sentenceCase(s(pre, "case"))) migrates the real VM with \(fmt(down, 1)) ms of guest-seen downtime and \(fmt(d(pre, "bytes_ratio") ?? 0, 2))x its memory sent; the targets (60 ms, 1.5x) are \(met == true ? "met in every case" : "not met in every case").",
            metric: "pre-copy downtime (KVM)", value: down, unit: "ms", target: 60, targetSource: "issue target: <= 60 ms and <= 1.5x memory, every case", met: met))
    }

    /// migration-vs-qemu: per equal setting (`cases[].setting`), grouped bars of MemVirt and
    /// QEMU per guest for the VMM's downtime, the guest-seen gap, total time and bytes. A saved
    /// report from before the settings (`rows`, no `setting`) gives one chart set, "own settings".
    static func versusQEMU(_ j: JSONValue) -> ([Figure], Headline?) {
        let rs = rows(j, "cases").isEmpty ? rows(j, "rows") : rows(j, "cases")
        guard !rs.isEmpty else { return ([], nil) }
        func setting(_ r: JSONValue) -> String { s(r, "setting").isEmpty ? "own settings" : s(r, "setting") }
        func val(_ r: JSONValue, _ keys: [String]) -> Double? { keys.lazy.compactMap { d(r, $0) }.first }
        var figs: [Figure] = []
        for st in unique(rs.map(setting)) {
            let at = rs.filter { setting($0) == st }
            let guests = unique(at.map { s($0, "guest") })
            func fig(_ id: String, _ title: String, _ axis: String, _ keys: [String], _ unit: String, _ scale: Double) -> Figure {
                Figure(id: "\(id)-\(st.replacingOccurrences(of: " ", with: "-"))", title: "\(title) (\(st))", kind: .groupedBar, x: Axis("guest"), y: Axis(axis, unit: unit),
                       series: ["memvirt", "qemu"].map { vmm in Series(name: vmm, points: guests.enumerated().compactMap { i, g in
                           at.first { s($0, "guest") == g && s($0, "vmm") == vmm }.flatMap { val($0, keys) }.map { DataPoint(x: Double(i), y: $0 * scale) }
                       }) },
                       categories: guests, caption: "The same multiboot guest under MemVirt and qemu-system-x86_64, live-migrated over loopback; setting '\(st)' on both VMMs.")
            }
            figs += [fig("downtime", "Downtime (VMM): MemVirt against QEMU", "downtime", ["downtime_ms", "vmm_downtime_ms"], "ms", 1),
                     fig("gap", "Downtime the guest sees: MemVirt against QEMU", "longest gap between guest accesses", ["guest_gap_ms", "guest_seen_gap_ms"], "ms", 1),
                     fig("total", "Total migration time: MemVirt against QEMU", "total time", ["total_ms"], "ms", 1),
                     fig("bytes", "Bytes sent: MemVirt against QEMU", "sent", ["bytes_sent"], "MB", 1e-6)]
        }
        let ok = rs.allSatisfy { $0["equals_oracle"]?.asBool == true }
        // Pre-copy (case, setting) pairs where MemVirt is at or below QEMU on all three figures.
        var pairs = 0, wins = 0
        var perSetting: [String] = []
        for st in unique(rs.map(setting)) {
            var p = 0, w = 0
            for g in unique(rs.filter { setting($0) == st && s($0, "mode") != "postcopy" && !s($0, "guest").contains("post-copy") }.map { s($0, "guest") }) {
                guard let m = rs.first(where: { setting($0) == st && s($0, "guest") == g && s($0, "vmm") == "memvirt" }),
                      let q = rs.first(where: { setting($0) == st && s($0, "guest") == g && s($0, "vmm") == "qemu" }) else { continue }
                p += 1
                let keys = [["downtime_ms", "vmm_downtime_ms"], ["total_ms"], ["bytes_sent"]]
                if keys.allSatisfy({ k in if let a = val(m, k), let b = val(q, k) { return a <= b } else { return false } }) { w += 1 }
            }
            pairs += p; wins += w
            perSetting.append("\(st) \(w)/\(p)")
        }
        return (figs, Headline(
            text: "At equal settings MemVirt is at or below QEMU on downtime, total time and bytes in \(wins) of \(pairs) pre-copy rows (\(perSetting.joined(separator: ", "))); guest memory equals the oracle after migration on \(ok ? "both VMMs in every case" : "not every run").",
            metric: "pre-copy rows where MemVirt is at or below QEMU on all three", value: Double(wins), unit: "rows", target: Double(pairs),
            targetSource: "QEMU \(s(j, "qemu_version")), same guest, same settings; met = every pre-copy row, and guest memory equals the oracle on both VMMs", met: ok && wins == pairs))
    }
}
