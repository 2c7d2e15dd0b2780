import MemVirtCore
import MemVirtKVM
import Testing

@testable import MemVirtExperiments

/// `memvirt validate --quick`'s guest-kernel cases: every one runs on /dev/kvm (a guest that
/// edits its own page tables under KVM's real shadow MMU) and in the model, and the two
/// kernels did the same guest-side work.
@Suite("validate: guest-kernel cases", .serialized, .enabled(if: KVM.isUsable, Comment(rawValue: KVM.unavailableReason ?? "")))
struct ValidationGuestOpsTests {
    @Test("Every guest-op case runs on both engines; the guest-side counts agree; fork/COW/exit exercises KVM's PTE-write path")
    func quickGuestOps() throws {
        let cases = ValidationGuestOps.cases(quick: true)
        // Every named script, but the PCID one where KVM offers no PCID (kvm_pvm).
        #expect(cases.count >= GuestOpScript.names.count - 1)
        let v = Validation(cases: cases)
        let results = try v.runCases(machine: .pvmShadow, progress: { _ in })
        #expect(results.map(\.name) == cases.map(\.name))
        let json = Validation.report(results, profile: nil).json
        guard case .object(let top) = json, case .array(let jc)? = top.first(where: { $0.0 == "cases" })?.1 else {
            Issue.record("no cases array"); return
        }
        #expect(jc.count == cases.count)
        for r in results {
            #expect(r.measuredSeconds > 0, "\(r.name): KVM measured no time")
            #expect(r.predictedSeconds > 0, "\(r.name): the model predicted no time")
            #expect(r.readSumEqual, "\(r.name): read_sum differs")
            #expect(!r.note.contains("DIFFER"), "\(r.name): \(r.note)")
            let guest = try #require(r.rows.first { $0.stat == "pf_guest" }, "\(r.name): no pf_guest row")
            // Every script maps regions that start unmapped: KVM delivered the guest's #PFs.
            #expect(guest.kvm > 0 && guest.model > 0, "\(r.name): pf_guest model \(guest.model) kvm \(guest.kvm)")
            #expect(r.rows.contains { $0.stat == "pf_fixed" && $0.kvm > 0 }, "\(r.name): no pf_fixed on KVM")
        }
        let fork = try #require(results.first { $0.name == "guest-fork-cow-exit" })
        func kvm(_ s: String) -> UInt64 { fork.rows.first { $0.stat == s }?.kvm ?? 0 }
        func model(_ s: String) -> UInt64 { fork.rows.first { $0.stat == s }?.model ?? 0 }
        #expect(kvm("mmu_pte_write") + kvm("mmu_unsync") > 0, "fork/COW/exit: KVM saw no guest PTE write")
        #expect(kvm("invlpg") > 0 && model("invlpg") > 0, "fork/COW/exit: invlpg model \(model("invlpg")) kvm \(kvm("invlpg"))")
    }
}
