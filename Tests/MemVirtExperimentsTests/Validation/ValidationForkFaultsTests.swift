import MemVirtCore
import MemVirtKVM
import MemVirtModel
import Testing

@testable import MemVirtExperiments

/// guest-fork-cow-exit's shadow faults, the model beside this host's KVM: after every fork the
/// kernel's first access through its direct map under the child's new shadow root faults (the
/// root has not linked the map), which the model counts since it links the map per root.
@Suite("validate: fork/COW/exit's pf_fixed against KVM", .serialized, .enabled(if: KVM.isUsable, Comment(rawValue: KVM.unavailableReason ?? "")))
struct ValidationForkFaultsTests {
    @Test("kvm ops fork-cow-exit --quick: the model's pf_fixed and pf_taken within 2% of KVM's, pf_spurious and pf_emulate equal")
    func forkFaultsWithinTolerance() throws {
        let script = try #require(GuestOpScript.named("fork-cow-exit", quick: true, seed: 11))
        let (kvm, kvmGuest) = try ValidationGuestOps.runKVM("guest-fork-cow-exit", script)
        let (model, modelGuest) = try ValidationGuestOps.runModel(script, machine: .pvmShadow, cpl0Emulated: ValidationGuestOps.cpl0Emulated)
        // The same guest work on both sides (else the counters are not comparable).
        #expect(ValidationGuestOps.guestCounts(modelGuest, kvmGuest).allSatisfy { $0.1 == $0.2 })
        #expect(modelGuest.forks > 0)
        for (stat, counter) in [("pf_fixed", Counter.pfFixed), ("pf_taken", .pfTaken)] {
            let k = try #require(kvm.counters[stat], "KVM reports no \(stat)")
            let m = model.counters[counter]
            #expect(k > 0)
            #expect(abs(Double(m) - Double(k)) <= 0.02 * Double(k), "\(stat): model \(m) KVM \(k)")
        }
        // Every fork's new root: one spurious fault (the runtime's subtree) on both sides.
        #expect(model.counters[.pfSpurious] == kvm.counters["pf_spurious"], "pf_spurious: model \(model.counters[.pfSpurious]) KVM \(kvm.counters["pf_spurious"] ?? 0)")
        #expect(model.counters[.pfEmulate] == kvm.counters["pf_emulate"], "pf_emulate: model \(model.counters[.pfEmulate]) KVM \(kvm.counters["pf_emulate"] ?? 0)")
    }
}
