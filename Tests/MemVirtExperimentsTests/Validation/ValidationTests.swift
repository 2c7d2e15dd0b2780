import MemVirtCore
import MemVirtExperiments
import MemVirtKVM
import MemVirtModel
import Testing

/// `memvirt validate --quick`: every case runs on both engines, the report has the documented
/// JSON shape, and where the mechanism is the same in both (prebuilt guest tables, one vCPU, a
/// fixed stream) the deterministic counters agree with real KVM's.
@Suite("memvirt validate", .serialized, .enabled(if: KVM.isUsable, Comment(rawValue: KVM.unavailableReason ?? "")))
struct ValidationTests {
    @Test("validate --quick: JSON shape, every case on both engines, prebuilt-table counters agree with KVM's")
    func quick() throws {
        let v = Validation(quick: true)
        let results = try v.runCases(machine: .pvmShadow, progress: { _ in })
        #expect(results.count == v.cases.count)
        let json = Validation.report(results, profile: .object([("name", "pvm-shadow")])).json
        guard case .object(let top) = json else { Issue.record("not an object"); return }
        let keys = Set(top.map(\.0))
        for k in ["cases", "mean_abs_time_error", "all_within_tolerance", "profile"] { #expect(keys.contains(k), "top-level key \(k)") }
        guard case .array(let cases)? = top.first(where: { $0.0 == "cases" })?.1 else { Issue.record("no cases array"); return }
        #expect(cases.count == v.cases.count)
        var names: [String] = []
        for c in cases {
            guard case .object(let kv) = c else { Issue.record("a case is not an object"); continue }
            func value(_ k: String) -> JSONValue? { kv.first { $0.0 == k }?.1 }
            guard case .string(let name)? = value("name") else { Issue.record("case without name"); continue }
            names.append(name)
            // Both engines ran: KVM measured a time, the model predicted one.
            guard case .double(let measured)? = value("measured_seconds"), case .double(let predicted)? = value("predicted_seconds"),
                  case .double(let err)? = value("time_error") else { Issue.record("\(name): times missing"); continue }
            #expect(measured > 0, "\(name): KVM measured no time")
            #expect(predicted > 0, "\(name): the model predicted no time")
            #expect(abs(err - (predicted - measured) / measured) < 1e-9, "\(name): time_error is (predicted - measured) / measured")
            // --quick runs each case's KVM side once: its one repeat is the measured time.
            guard case .array(let runs)? = value("measured_seconds_runs") else { Issue.record("\(name): measured_seconds_runs missing"); continue }
            #expect(runs.count == 1 && runs.first.map { if case .double(let x) = $0 { x == measured } else { false } } == true, "\(name): runs \(runs)")
            guard case .object(let counters)? = value("counters") else { Issue.record("\(name): no counters"); continue }
            #expect(counters.contains { $0.0 == "pf_fixed" }, "\(name): pf_fixed missing")
            for (stat, row) in counters {
                guard case .object(let r) = row else { Issue.record("\(name).\(stat) not an object"); continue }
                let rk = Set(r.map(\.0))
                #expect(rk.isSuperset(of: ["model", "kvm", "ratio"]), "\(name).\(stat) keys \(rk)")
            }
        }
        #expect(names == v.cases.map(\.name))

        for (c, r) in zip(v.cases, results) {
            // The host-memory cases are checked by ValidationHostCasesTests (their counts are
            // not all deterministic, and not over prebuilt tables alone).
            if case .host = c.kind { continue }
            // The guest-kernel cases (guest-*) have their own test (ValidationGuestOpsTests).
            if case .guestOps = c.kind { continue }
            // Same stream, same data rules: the values read are equal.
            #expect(r.readSumEqual, "\(r.name): read_sum differs between the engines")
            // Every data page is touched by a 100,000-access stream over 1,024 pages except for
            // the strided one; KVM's pf_fixed is at least one per touched page and the model's
            // must be within the tolerance of it (the runtime's own first touches are a few).
            let fixed = try #require(r.rows.first { $0.stat == "pf_fixed" })
            #expect(fixed.kvm > 0 && fixed.model > 0, "\(r.name): pf_fixed model \(fixed.model) kvm \(fixed.kvm)")
            #expect(fixed.withinTolerance, "\(r.name): pf_fixed model \(fixed.model) kvm \(fixed.kvm)")
            for row in r.rows where ["pf_guest", "pf_emulate", "mmu_pte_write", "invlpg"].contains(row.stat) {
                // Prebuilt tables: no guest fault, no table write, no INVLPG in either engine.
                #expect(row.model == 0 && row.kvm == 0, "\(r.name).\(row.stat): model \(row.model) kvm \(row.kvm)")
            }
            // The workload cases ran the guest's loop natively too: a time, and the predicted time
            // is that native time plus the model's overhead (its cycles less its native part).
            let native = try #require(r.nativeSeconds, "\(r.name): no native run")
            #expect(native > 0, "\(r.name): native \(native)")
            #expect(r.modelNativeSeconds >= 0 && r.modelNativeSeconds < r.modelOnlySeconds, "\(r.name): model native \(r.modelNativeSeconds) of \(r.modelOnlySeconds)")
            #expect(abs(r.predictedSeconds - (native + r.modelOnlySeconds - r.modelNativeSeconds)) < 1e-9, "\(r.name): predicted \(r.predictedSeconds)")
            // The host's speed was read on the run's CPU at both ends: on kvm_pvm an emulated
            // CPL0 instruction takes between 10 ns and 100 us (elsewhere CPL0 runs natively and
            // the difference of two KVM_RUNs is noise around 0).
            let bracket = try #require(r.hostSpeedReferences.first, "\(r.name): no host-speed bracket")
            #expect(bracket.cpu >= 0, "\(r.name): not pinned")
            if KVMPlatform.detect() == .pvm {
                for x in [bracket.beforeNanos, bracket.afterNanos] { #expect(x > 10 && x < 100_000, "\(r.name): CPL0 reference \(x) ns") }
            }
            if let d = r.rows.first(where: { $0.stat == "dirty_pages" }) {
                #expect(d.withinTolerance, "\(r.name): dirty pages model \(d.model) kvm \(d.kvm)")
            }
        }
        #expect(results.contains { $0.rows.contains { $0.stat == "dirty_pages" } }, "no dirty-logging case ran")
    }
}
