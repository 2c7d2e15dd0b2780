import MemVirtCore
@testable import MemVirtExperiments
import MemVirtKVM
import MemVirtModel
import Testing

/// The host-memory cases of `memvirt validate` at quick size: both engines ran each case, the
/// JSON has the documented keys, the pager's and KSM's own counters appear on both sides, and
/// a case outside a tolerance says why in `explanation`.
@Suite("memvirt validate: host-memory cases", .serialized, .enabled(if: KVM.isUsable, Comment(rawValue: KVM.unavailableReason ?? "")))
struct ValidationHostCasesTests {
    @Test("pager at a resident limit, KSM copy-on-write breaks: both engines, JSON shape, explanation when missed")
    func quick() throws {
        let cases = ValidationCase.hostCases(quick: true)
        let v = Validation(cases: cases)
        let results = try v.runCases(machine: .pvmShadow, progress: { _ in })
        let report = Validation.report(results, profile: .object([("name", "pvm-shadow")]))
        print(report.text)
        guard case .object(let top) = report.json, case .array(let casesJSON)? = top.first(where: { $0.0 == "cases" })?.1 else {
            Issue.record("no cases array"); return
        }
        #expect(casesJSON.count == cases.count)
        for (c, r) in zip(casesJSON, results) {
            guard case .object(let kv) = c else { Issue.record("a case is not an object"); continue }
            let keys = Set(kv.map(\.0))
            #expect(keys.isSuperset(of: ["name", "counters", "predicted_seconds", "measured_seconds", "time_error", "explanation"]), "\(r.name): keys \(keys)")
            #expect(r.measuredSeconds > 0, "\(r.name): KVM measured no time")
            #expect(r.predictedSeconds > 0, "\(r.name): the model predicted no time")
            let fixed = try #require(r.rows.first { $0.stat == "pf_fixed" }, "\(r.name): no pf_fixed row")
            #expect(fixed.kvm > 0 && fixed.model > 0, "\(r.name): pf_fixed model \(fixed.model) kvm \(fixed.kvm)")
            #expect(r.readSumEqual, "\(r.name): read_sum differs")
            // The explanation is there exactly when a tolerance is missed, and names what missed.
            #expect(r.explanation.isEmpty == r.withinTolerance, "\(r.name): explanation '\(r.explanation)'")
            for row in r.rows where row.deterministic && !row.withinTolerance {
                #expect(r.explanation.contains(row.stat), "\(r.name): explanation does not name \(row.stat)")
            }
        }
        // The pager's counters on both sides, and the limit really made it evict.
        let pager = try #require(results.first { $0.name == "pager-resident-limit" })
        for s in [HostCaseStats.served, HostCaseStats.evictions, HostCaseStats.refaults] {
            let row = try #require(pager.rows.first { $0.stat == s }, "pager: no \(s) row")
            #expect(row.kvm > 0 && row.model > 0, "pager \(s): model \(row.model) kvm \(row.kvm)")
        }
        let ksm = try #require(results.first { $0.name == "ksm-cow-breaks" })
        let unmerged = try #require(ksm.rows.first { $0.stat == HostCaseStats.unmergedPfFixed })
        #expect(unmerged.model == 0, "the model faulted on unmerged pages")
    }
}
