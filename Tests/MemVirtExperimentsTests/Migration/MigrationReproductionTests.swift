import MemVirtCore
import Testing

@testable import MemVirtExperiments

func number(_ v: JSONValue?) -> Double? {
    switch v {
    case .double(let d)?: d
    case .int(let i)?: Double(i)
    case .uint(let u)?: Double(u)
    default: nil
    }
}

func array(_ v: JSONValue?) -> [JSONValue] {
    if case .array(let a)? = v { return a }
    return []
}

@Suite("Migration reproductions (log-dirty, page-groups, migration)")
struct MigrationReproductionTests {
    @Test("log-dirty --quick: Xen re-shadowing exceeds its fixup faults; nested + PML tracks cheapest")
    func logDirtyQuick() throws {
        let r = try LogDirty(quick: true).run { _ in }
        let modes = array(r.json["modes"])
        #expect(modes.count == LogDirty.configs.count)
        var totals: [String: Double] = [:]
        for m in modes {
            guard case .string(let mode)? = m["mode"], case .string(let h)? = m["harvest"], let total = number(m["steady_tracking_ms"]) else {
                Issue.record("missing keys")
                return
            }
            totals["\(mode)/\(h)"] = total
            if mode == "shadow-xen" { #expect((number(m["steady_reshadow_over_fixup"]) ?? 0) > 1) }
        }
        let pml = min(totals["ept-pml/bitmap"]!, totals["ept-pml/ring"]!)
        for (k, v) in totals where !k.hasPrefix("ept-pml") { #expect(pml < v, "\(k): \(v) ms vs PML \(pml) ms") }
    }

    @Test("page-groups --quick: sequential writer's faults fall about n-fold while bytes rise; JSON shape")
    func pageGroupsQuick() throws {
        let r = try PageGroups(quick: true).run { _ in }
        let groups = array(r.json["groups"])
        #expect(groups.count == 2 * PageGroups.groupSizes.count)
        var seq: [Int: (faults: Double, bytes: Double)] = [:]
        for g in groups {
            guard let n = number(g["n"]), case .string(let p)? = g["pattern"], let f = number(g["write_faults"]), let b = number(g["bytes_sent"]),
                  number(g["pages_resent"]) != nil, number(g["total_ms"]) != nil else {
                Issue.record("missing keys")
                return
            }
            if p == "sequential" { seq[Int(n)] = (f, b) }
            #expect(g["hashes_match"].map { if case .bool(true) = $0 { true } else { false } } == true)
        }
        let f1 = seq[1]!.faults
        #expect(f1 / seq[8]!.faults > 5)
        #expect(f1 / seq[64]!.faults > 25)
        #expect(seq[512]!.faults < seq[64]!.faults)
        #expect(seq[1000]!.bytes > seq[1]!.bytes)
    }

    @Test("migration --quick: hashes equal everywhere; write-heavy pre-copy does not converge; auto-converge does")
    func migrationQuick() throws {
        let r = try MigrationReproduction(quick: true).run { _ in }
        let rows = array(r.json["rows"])
        #expect(rows.count == 10)
        for row in rows {
            #expect(row["hashes_match"].map { if case .bool(true) = $0 { true } else { false } } == true)
        }
        let heavy = rows.filter { if case .string("write-heavy")? = $0["guest"], case .string("pre-copy")? = $0["migration"] { true } else { false } }
        #expect(heavy.count == 2)
        let converged = heavy.map { row -> Bool in if case .bool(let b)? = row["converged"] { b } else { false } }
        let ac = heavy.map { row -> Bool in if case .bool(let b)? = row["auto_converge"] { b } else { false } }
        #expect(converged == ac)
    }
}

@Suite("The reproduction registry")
struct ReproductionRegistryTests {
    @Test("Every name is unique and names the reproduction it returns")
    func namesResolve() {
        #expect(Set(Reproductions.names).count == Reproductions.names.count)
        for name in Reproductions.names { #expect(Reproductions.named(name)?.name == name) }
        #expect(Reproductions.named("no-such-reproduction") == nil)
    }
}

@Suite("QEMU comparison notes come from the measured phases")
struct QEMUComparisonNotesTests {
    @Test("The downtime note sums the phases from the stop, names the largest and the SYNC wait")
    func downtimeBreakdown() {
        let ms: UInt64 = 1_000_000
        let phases: [(String, UInt64)] = [("round0", 900 * ms), ("rounds", 300 * ms), ("sync", 40 * ms), ("stop", 1 * ms),
                                          ("final_harvest", 2 * ms), ("final_send", 3 * ms), ("state", 4 * ms), ("resumed", 10 * ms)]
        let note = QEMUComparison.downtimeBreakdown(phases)
        #expect(note.contains("(20.0 ms in all)"), "\(note)")
        #expect(note.contains("The largest is 'resumed'"), "\(note)")
        #expect(note.contains("50 %"), "\(note)")
        #expect(note.contains("waited 40.0 ms"), "\(note)")
        #expect(!note.contains("backlog is to blame") && !note.contains("~10 ms"))
        var other = phases
        other[7].1 = 1 * ms
        other[6].1 = 30 * ms
        #expect(QEMUComparison.downtimeBreakdown(other).contains("The largest is 'state'"))
    }
}
