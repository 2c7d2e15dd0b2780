import Foundation
import MemVirtCore
import MemVirtExperiments
import Testing
@testable import MemVirtReport

/// The KVM reproductions' charts and headlines, from JSON shaped as they write it (their keys,
/// made-up numbers): the charts carry exactly those numbers, without needing /dev/kvm.
@Suite("Charts of the KVM reproductions")
struct KVMFigureTests {
    static func point(_ f: Figure, _ series: Int, _ i: Int) -> Double? {
        f.series.indices.contains(series) && f.series[series].points.indices.contains(i) ? f.series[series].points[i].y : nil
    }

    @Test func apf() throws {
        let j = try JSONReader.parse("""
            {"name":"apf","engine":"kvm","apf_work_ratio":1.4,"seed_ratio":1.995,"model_ratio":1.9,"work_share_without_apf":0.4,"work_share_with_apf":0.7,
             "sweep":[{"store_delay_us":100,"apf_work_ratio":1.1},{"store_delay_us":1000,"apf_work_ratio":1.6}]}
            """)
        let (figs, h) = ReproductionFigures.derive(name: "apf", json: j)
        #expect(figs.map(\.id) == ["work-ratio", "work-share", "ratio-vs-store-delay"])
        #expect(Self.point(figs[0], 0, 0) == 1.4 && Self.point(figs[0], 1, 0) == 1.9)
        #expect(figs[0].references.first?.y == 1.995)
        #expect(Self.point(figs[1], 1, 0) == 70)
        #expect(figs[2].series[0].points.map(\.x) == [100, 1000])
        #expect(h?.value == 1.4 && h?.target == 1.995 && h?.met == false)  // 30% off: outside 25%
    }

    @Test func ksm() throws {
        let j = try JSONReader.parse("""
            {"name":"ksm","engine":"kvm","pages_shared":100,"pages_sharing":300,"expected_shared":100,"expected_sharing":320,
             "saved_bytes":1228800,"expected_saved_bytes":1310720,"merge_reached_expected":false,"cow_ns_per_write":20000,"unmerged_ns_per_write":500,"model_cow_break_us":12}
            """)
        let (figs, h) = ReproductionFigures.derive(name: "ksm", json: j)
        #expect(figs.count == 2)
        #expect(figs[0].series[0].points.map(\.y) == [100, 300])
        #expect(figs[0].references.map(\.y) == [100, 320])
        #expect(figs[1].references.first?.y == 12_000)
        #expect(h?.met == false)
        #expect(h.map { abs($0.value - 1.171875) < 1e-9 } == true)
    }

    @Test func validateCases() throws {
        let j = try JSONReader.parse("""
            {"name":"validate","mean_abs_time_error":0.085,"all_within_tolerance":false,"cases":[
              {"name":"uniform","measured_seconds":1.4,"measured_seconds_runs":[1.3,1.4,1.8],"predicted_seconds":1.33,"predicted_seconds_runs":[1.25,1.33,1.7],
               "native_seconds":0.06,"time_error":-0.05,"overhead_error":-0.052,"time_within_tolerance":true,"counters_within_tolerance":true,
               "counters":{"pf_fixed":{"model":27891,"kvm":27895,"ratio":0.99986,"deterministic":true},"exits":{"model":1,"kvm":2,"ratio":0.5,"deterministic":false}}},
              {"name":"async-pf-pager","measured_seconds":5.0,"measured_seconds_runs":[5.0],"predicted_seconds":3.3,"predicted_seconds_runs":[3.3],
               "native_seconds":null,"time_error":-0.34,"overhead_error":null,"time_within_tolerance":false,"counters_within_tolerance":true,
               "counters":{"pf_fixed":{"model":4159,"kvm":2724,"ratio":1.5268,"deterministic":false}}}]}
            """)
        let (figs, h) = ReproductionFigures.derive(name: "validate", json: j)
        #expect(figs.map(\.id) == ["time-per-case", "time-error", "counter-differences"])
        #expect(figs[0].categories == ["uniform", "async-pf-pager"])
        #expect(figs[0].series[0].points.map(\.y) == [1.4, 5.0])
        #expect(figs[0].series[0].points[0].low == 1.3 && figs[0].series[0].points[0].high == 1.8)
        #expect(figs[0].series[1].points[0].low == 1.25 && figs[0].series[1].points[0].high == 1.7)
        #expect(figs[0].series[2].points.map(\.x) == [0])  // the native loop: workload cases only
        #expect(figs[1].series[0].points.map(\.y) == [-5, -34])
        #expect(figs[1].series[1].points.count == 1)
        // Only the judged (deterministic) counters: pf_fixed of uniform.
        #expect(figs[2].series.map(\.name) == ["pf_fixed"] && figs[2].series[0].points.map(\.x) == [0])
        #expect(abs((figs[2].series[0].points.first?.y ?? 0) - 100 * (0.99986 - 1)) < 1e-9)
        #expect(h?.value == 8.5 && h?.target == 10 && h?.met == false)
        #expect(h?.text.contains("1 of 2 cases") == true)
    }

    @Test func migration() throws {
        let j = try JSONReader.parse("""
            {"name":"migration","engine":"kvm","targets_met":true,"cases":[
              {"case":"pre-copy","bytes_ratio":1.1,"source":{"downtime_ms":40,"total_ms":900,"dirty_per_round":[1000,200,50]}},
              {"case":"post-copy","bytes_ratio":1.0,"source":{"downtime_ms":5,"total_ms":700,"dirty_per_round":[]}}]}
            """)
        let (figs, h) = ReproductionFigures.derive(name: "migration", json: j)
        #expect(figs.map(\.id) == ["downtime-total", "dirty-per-round"])
        #expect(figs[0].series[0].points.map(\.y) == [40, 5])
        #expect(figs[1].series.map(\.name) == ["pre-copy"])
        #expect(figs[1].series[0].points.map(\.y) == [1000, 200, 50])
        #expect(h?.value == 40 && h?.met == true)
    }

    @Test func validateAndVersusQEMU() throws {
        let v = try JSONReader.parse("""
            {"name":"validate","all_equal":true,"rows":[{"workload":"uniform","read_sum_equal":true,"memory_equal":true,"kvm_pf_fixed":1000,"model_shadow_pf_fixed":1100,"kvm_wall_seconds":2,"model_shadow_wall_seconds":3}]}
            """)
        let (vf, vh) = ReproductionFigures.derive(name: "validate", json: v)
        #expect(vf.allSatisfy { $0.kind == .scatter })
        #expect(vf[0].series[0].points[0].x == 1000 && vf[0].series[0].points[0].y == 1100)
        #expect(SVGChart.render(vf[0]).contains("class=\"identity\""))
        #expect(vh?.value == 1 && vh?.met == true)
        // Two settings, two pre-copy guests and one post-copy guest: charts per setting, and the
        // headline counts the pre-copy pairs where MemVirt is at or below QEMU on all three.
        let q = try JSONReader.parse("""
            {"name":"migration-vs-qemu","qemu_version":"7.2","cases":[
              {"guest":"idle","setting":"defaults","vmm":"memvirt","mode":"precopy","downtime_ms":3,"total_ms":100,"guest_gap_ms":10,"bytes_sent":2000000,"equals_oracle":true},
              {"guest":"idle","setting":"defaults","vmm":"qemu","mode":"precopy","downtime_ms":6,"total_ms":300,"guest_gap_ms":30,"bytes_sent":4000000,"equals_oracle":true},
              {"guest":"writer","setting":"defaults","vmm":"memvirt","mode":"precopy","downtime_ms":9,"total_ms":200,"guest_gap_ms":10,"bytes_sent":2000000,"equals_oracle":true},
              {"guest":"writer","setting":"defaults","vmm":"qemu","mode":"precopy","downtime_ms":6,"total_ms":300,"guest_gap_ms":30,"bytes_sent":4000000,"equals_oracle":true},
              {"guest":"writer, post-copy","setting":"defaults","vmm":"memvirt","mode":"postcopy","downtime_ms":9,"total_ms":200,"guest_gap_ms":10,"bytes_sent":2000000,"equals_oracle":true},
              {"guest":"writer, post-copy","setting":"defaults","vmm":"qemu","mode":"postcopy","downtime_ms":2,"total_ms":300,"guest_gap_ms":30,"bytes_sent":4000000,"equals_oracle":true},
              {"guest":"idle","setting":"tight","vmm":"memvirt","mode":"precopy","downtime_ms":3,"total_ms":50,"guest_gap_ms":4,"bytes_sent":1000000,"equals_oracle":true},
              {"guest":"idle","setting":"tight","vmm":"qemu","mode":"precopy","downtime_ms":5,"total_ms":80,"guest_gap_ms":7,"bytes_sent":3000000,"equals_oracle":true}]}
            """)
        let (qf, qh) = ReproductionFigures.derive(name: "migration-vs-qemu", json: q)
        #expect(qf.count == 8)
        #expect(qf.map(\.id) == ["downtime-defaults", "gap-defaults", "total-defaults", "bytes-defaults", "downtime-tight", "gap-tight", "total-tight", "bytes-tight"])
        #expect(qf[0].categories == ["idle", "writer", "writer, post-copy"])
        #expect(qf[0].series.map { $0.points.map(\.y) } == [[3, 9, 9], [6, 6, 2]])
        #expect(qf[3].series.map { $0.points.map(\.y) } == [[2, 2, 2], [4, 4, 4]])
        #expect(qf[6].series.map { $0.points.map(\.y) } == [[50], [80]])
        // idle defaults and idle tight win on all three; writer defaults loses on downtime;
        // the post-copy row is not counted.
        #expect(qh?.value == 2 && qh?.target == 3 && qh?.met == false)
        #expect(qh?.text.contains("defaults 1/2, tight 1/1") == true)
        // A report saved before the settings (rows, no setting) still charts, as one set.
        let old = try JSONReader.parse("""
            {"name":"migration-vs-qemu","qemu_version":"7.2","rows":[
              {"guest":"idle","vmm":"memvirt","vmm_downtime_ms":3,"total_ms":100,"guest_seen_gap_ms":10,"bytes_sent":2000000,"equals_oracle":true},
              {"guest":"idle","vmm":"qemu","vmm_downtime_ms":6,"total_ms":300,"guest_seen_gap_ms":30,"bytes_sent":4000000,"equals_oracle":true}]}
            """)
        let (of, oh) = ReproductionFigures.derive(name: "migration-vs-qemu", json: old)
        #expect(of.count == 4 && of[1].series.map { $0.points.map(\.y) } == [[10], [30]])
        #expect(oh?.value == 1 && oh?.target == 1 && oh?.met == true)
    }

    @Test func skippedRunsHaveNoCharts() {
        let (f, h) = ReproductionFigures.derive(name: "ksm", json: .object([("name", "ksm"), ("engine", "kvm"), ("skipped", "no /dev/kvm")]))
        #expect(f.isEmpty && h == nil)
    }
}
