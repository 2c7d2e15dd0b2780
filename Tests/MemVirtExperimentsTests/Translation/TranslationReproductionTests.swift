import MemVirtCore
import MemVirtModel
import Testing

@testable import MemVirtExperiments

/// The rows of a reproduction's JSON array `key`, each as a dictionary.
func rows(_ r: ExperimentReport, _ key: String) -> [[String: JSONValue]] {
    guard case .object(let top) = r.json, case .array(let a)? = top.first(where: { $0.0 == key })?.1 else { return [] }
    return a.compactMap { v in
        guard case .object(let kv) = v else { return nil }
        return Dictionary(kv, uniquingKeysWith: { a, _ in a })
    }
}

func string(_ v: JSONValue?) -> String? {
    if case .string(let s)? = v { return s }
    return nil
}

@Suite("Translation reproductions: their headline relations")
struct TranslationReproductionTests {
    @Test("2d-walk --quick: the counted maximum is the closed form; caches and large pages cut the average")
    func twoDimensionalWalk() throws {
        let r = try TwoDimensionalWalk(quick: true).run { _ in }
        let walks = rows(r, "walks")
        #expect(walks.count == 4)
        for w in walks {
            let g = try #require(number(w["guest_levels"])), h = try #require(number(w["host_levels"]))
            #expect(number(w["max_walk_refs"]) == (g + 1) * (h + 1) - 1, "\(g)/\(h)")
            #expect(number(w["avg_walk_refs"]) == (g + 1) * (h + 1) - 1, "\(g)/\(h): with every cache off every walk is full")
        }
        let savings = Dictionary(rows(r, "averages").map { (string($0["configuration"]) ?? "", $0) }, uniquingKeysWith: { a, _ in a })
        func refs(_ k: String) throws -> Double { try #require(number(savings[k]?["avg_walk_refs"]), "no row \(k)") }
        func cycles(_ k: String) throws -> Double { try #require(number(savings[k]?["translation_cycles_per_access"]), "no row \(k)") }
        #expect(try refs("nested, 4K/4K, walk caches + nested TLB") < refs("nested, 4K/4K, no walk caches"))
        #expect(try refs("nested, 4K/4K, no walk caches") > refs("native, 4K, no walk caches"))
        #expect(try cycles("nested, 2M guest / 2M host") < cycles("nested, 4K/4K, walk caches + nested TLB"))
    }

    @Test("rvi --quick: nested beats shadow on the fork loop; shadow beats nested on 4K random reads")
    func shadowVersusNested() throws {
        let r = try ShadowVersusNested(quick: true).run { _ in }
        let cases = rows(r, "cases")
        #expect(cases.count == 4)
        for c in cases {
            let name = string(c["workload"]) ?? "", size = string(c["page_size"]) ?? ""
            let s = try #require(number(c["shadow_cycles_per_unit"])), n = try #require(number(c["nested_cycles_per_unit"]))
            if name.hasPrefix("(a)") {
                #expect(n < s, "fork loop, \(size): nested \(n) vs shadow \(s)")
                #expect((number(c["shadow_mmu_pte_write"]) ?? 0) > 0, "shadow paging must trap guest page-table writes")
            } else if size == "4K" {
                #expect(s < n, "random reads, 4K: shadow \(s) vs nested \(n)")
                #expect((number(c["nested_walk_refs_per_miss"]) ?? 0) > (number(c["shadow_walk_refs_per_miss"]) ?? 99))
            }
        }
    }

    @Test("fault-cost --quick: native has no virtualization layer; shadow pays more per fault than nested")
    func faultCost() throws {
        let r = try FaultCost(quick: true).run { _ in }
        var virt: [String: Double] = [:]
        var exits: [String: Double] = [:]
        for row in rows(r, "rows") {
            let key = "\(string(row["fault"]) ?? "")/\(string(row["paging"]) ?? "")/\(string(row["costs"]) ?? "")"
            virt[key] = number(row["virtualization_cycles_per_fault"])
            exits[key] = number(row["exits_per_fault"])
        }
        #expect(virt.count == 8)
        for fault in ["soft", "hard"] {
            #expect(virt["\(fault)/native/bare-metal"] == 0)
            #expect(exits["\(fault)/native/bare-metal"] == 0)
            let shadow = try #require(virt["\(fault)/shadow/vmx-ept"]), nested = try #require(virt["\(fault)/nested/vmx-ept"])
            #expect(shadow > nested, "\(fault): shadow \(shadow) vs nested \(nested) cycles per fault in the virtualization layer")
            #expect(try #require(exits["\(fault)/shadow/vmx-ept"]) >= 1, "every shadow guest fault exits")
        }
    }

    @Test("tlb-reach --quick: larger pages miss less on the same footprint; a small footprint hardly misses")
    func tlbReach() throws {
        let r = try TLBReach(quick: true).run { _ in }
        var miss: [String: Double] = [:]
        for row in rows(r, "rows") {
            let key = "\(number(row["footprint_bytes"]).map { Int($0) } ?? 0)/\(string(row["page_size"]) ?? "")"
            miss[key] = number(row["tlb_miss_rate"])
            #expect((number(row["walk_refs_per_miss"]) ?? 9) <= 4)
        }
        let mib64 = 64 << 20, mib1 = 1 << 20
        let m4K = try #require(miss["\(mib64)/4K"]), m2M = try #require(miss["\(mib64)/2M"])
        #expect(m2M < m4K)
        #expect(try #require(miss["\(mib1)/4K"]) < m4K / 10)
    }
}
