import MemVirtCore
import MemVirtExperiments
import MemVirtKVM
import Testing

/// `memvirt reproduce migration --engine kvm --quick`: every case migrates with equal
/// switch-over hashes, and the post-copy runs under the guest kernel report async PF events
/// only when APF is on. Times and ratios are the reproduction's to report, not a test's.
@Suite("KVM migration reproduction", .serialized, .enabled(if: KVM.isUsable, Comment(rawValue: KVM.unavailableReason ?? "")))
struct KVMMigrationReproductionTests {
    func field(_ v: JSONValue, _ key: String) -> JSONValue? {
        if case .object(let kv) = v { return kv.first { $0.0 == key }?.1 }
        return nil
    }

    @Test("every case's hashes are equal; APF events only with APF; the JSON names the targets")
    func quick() throws {
        let r = try KVMMigration(quick: true).run(progress: { _ in })
        print(r.text)
        guard case .array(let cases)? = field(r.json, "cases") else { Issue.record("no cases"); return }
        #expect(cases.count == 4)
        for c in cases {
            #expect(field(c, "hashes_equal") == .bool(true))
            // The bytes target holds in every case (loopback, no cap); the verdict agrees with it.
            guard case .double(let ratio)? = field(c, "bytes_ratio"), case .bool(let met)? = field(c, "targets_met") else {
                Issue.record("no bytes_ratio or targets_met"); continue
            }
            #expect(ratio <= KVMMigration.bytesTargetRatio, "\(ratio)x of guest memory sent")
            if ratio > KVMMigration.bytesTargetRatio { #expect(!met) }
        }
        guard let apf = field(r.json, "postcopy_async_pf"), case .array(let runs)? = field(apf, "runs") else { Issue.record("no APF runs"); return }
        #expect(runs.count == 2)
        for run in runs {
            #expect(field(run, "hashes_equal") == .bool(true))
            guard let d = field(run, "destination"), let k = field(d, "guest_kernel"), case .uint(let np)? = field(k, "apf_not_present") else {
                Issue.record("no destination guest_kernel"); continue
            }
            if field(run, "async_pf") == .bool(true) { #expect(np > 0) } else { #expect(np == 0) }
        }
    }
}
