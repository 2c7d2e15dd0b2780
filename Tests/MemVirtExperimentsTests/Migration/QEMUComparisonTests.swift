import Foundation
import MemVirtCore
import MemVirtKVM
import MemVirtReport
import Testing
@testable import MemVirtExperiments

/// The settings both VMMs get, and the JSON of a quick run (needs /dev/kvm and QEMU).
@Suite("QEMU comparison at equal settings")
struct QEMUComparisonSettingsTests {
    @Test("defaults are QEMU's defaults on both VMMs; tight is one high cap and 30 ms on both")
    func settings() {
        let d = QEMUComparison.Setting.defaults, t = QEMUComparison.Setting.tight
        #expect(d.qemu == .qemuDefaults && d.bandwidth == 134_217_728 && d.downtimeTargetMillis == 300)
        let md = d.memvirt(postcopy: false, afterNanos: 1)
        #expect(md.bandwidth == d.bandwidth && md.downtimeTargetNanos == 300_000_000 && md.mode == .precopy)
        let mt = t.memvirt(postcopy: false, afterNanos: 1)
        #expect(mt.bandwidth == t.qemu.maxBandwidth && mt.downtimeTargetNanos == t.qemu.downtimeLimitMillis * 1_000_000 && t.downtimeTargetMillis == 30)
        // Post-copy: no cap on either (QEMU's max-postcopy-bandwidth defaults to none).
        #expect(d.memvirt(postcopy: true, afterNanos: 1).bandwidth == nil && d.memvirt(postcopy: true, afterNanos: 1).mode == .postcopy)
        #expect(QEMUComparison.Setting.all.map(\.name) == ["defaults", "tight"])
    }

    @Test("the full run has 512 MiB and 2 GiB guests, idle and writers, pre- and post-copy; quick stays at 128 MiB")
    func cases() {
        let full = QEMUComparison.cases(quick: false)
        #expect(Set(full.map(\.memory)) == [512 << 20, 2 << 30])
        #expect(full.contains { $0.memory == 2 << 30 && $0.spec.writeRatio == 1 && $0.rate == 50 * 256 && !$0.postcopy })
        #expect(full.contains { $0.memory == 2 << 30 && $0.postcopy })
        #expect(full.contains { $0.memory == 512 << 20 && $0.rate == 10 * 256 && $0.postcopy })
        #expect(full.allSatisfy { $0.spec.footprint.rawValue + Multiboot.lowBytes <= $0.memory })
        #expect(QEMUComparison.cases(quick: true).allSatisfy { $0.memory == 128 << 20 })
    }
}

@Suite("The pages a paced writer has written")
struct QEMUComparisonExpectedPagesTests {
    @Test("the closed form matches a seeded simulation of uniform writes, and is nil for a reader")
    func expectedPages() {
        // 2 vCPUs, each 2,560 writes/s over its own 4 MiB (1,024 pages), for 0.5 s and 2 s.
        let c = QEMUComparison.Case(name: "t", memory: 64 << 20, spec: WorkloadSpec(pattern: .uniform, footprint: .mib(4), accesses: 100_000, writeRatio: 1, seed: 1),
                                    rate: 2_560, postcopy: false, vcpus: 2)
        for seconds in [0.5, 2.0] {
            // The reference: draw the writes and count distinct pages, averaged over 20 runs.
            var rng = SplitMix64(seed: 42)
            var total = 0
            for _ in 0..<20 {
                for _ in 0..<2 {
                    var seen = Set<UInt64>()
                    for _ in 0..<Int(2_560 * seconds) { seen.insert(rng.next() % 1_024) }
                    total += seen.count
                }
            }
            let simulated = Double(total) / 20
            let closed = QEMUComparison.expectedWrittenPages(c, seconds: seconds) ?? 0
            #expect(abs(closed - simulated) / simulated < 0.02, "closed form \(closed) vs simulated \(simulated) at \(seconds) s")
        }
        // Never more writes than the workload has: 100,000 accesses cover 1,024 pages fully.
        #expect(abs((QEMUComparison.expectedWrittenPages(c, seconds: 1e6) ?? 0) - 2_048) < 1e-6)
        var idle = c
        idle.spec.writeRatio = 0
        #expect(QEMUComparison.expectedWrittenPages(idle, seconds: 1) == nil)
    }
}

@Suite("QEMU comparison, quick run", .serialized, .enabled(if: QEMU.unavailableReason == nil, Comment(rawValue: QEMU.unavailableReason ?? "")))
struct QEMUComparisonRunTests {
    @Test("a quick run's JSON has a row per case, setting and VMM with the keys, and both VMMs equal the oracle")
    func quickRun() throws {
        let r = try QEMUComparison(quick: true).run { _ in }
        let cases = r.json["cases"]?.asArray ?? []
        let n = QEMUComparison.cases(quick: true).count
        #expect(cases.count == n * 2 * 2)
        for row in cases {
            for k in ["guest", "setting", "vmm", "downtime_ms", "guest_gap_ms", "total_ms", "bytes_sent", "equals_oracle"] {
                #expect(row[k] != nil && row[k] != .null, "\(k) missing in \(row.rendered())")
            }
            #expect(row["equals_oracle"]?.asBool == true, "\(row["guest"]?.asString ?? "") \(row["setting"]?.asString ?? "") \(row["vmm"]?.asString ?? "")")
        }
        #expect(Set(cases.compactMap { $0["setting"]?.asString }) == ["defaults", "tight"])
        #expect(Set(cases.compactMap { $0["vmm"]?.asString }) == ["memvirt", "qemu"])
        // QEMU ran at the values it read back, equal to MemVirt's.
        for st in QEMUComparison.Setting.all {
            let q = cases.first { $0["setting"]?.asString == st.name && $0["vmm"]?.asString == "qemu" }
            #expect(q?["bandwidth_bytes_per_s"]?.asDouble == Double(st.bandwidth))
            #expect(q?["downtime_target_ms"]?.asDouble == Double(st.downtimeTargetMillis))
        }
        #expect((r.json["verdicts"]?.asArray ?? []).count == n * 2)
        #expect(r.figures.count == 8 && r.headline != nil)
    }
}
