import MemVirtCore
import Testing
@testable import MemVirtKVM

/// The stub pairs `kvm calibrate` measures (StubCalibration.swift), in its measurement order.
func stubBenchmarks(_ r: CalibrationReport) -> [String] {
    [Session.invlpgStubPair, Session.cr3StubPair]
        + (r.measurement(Session.stringRootElement) != nil ? [Session.stringRootElement] : [])
        + (r.measurement(Session.cr3SwitchStubPair) != nil ? [Session.cr3SwitchStubPair] : [])
}

@Suite("kvm calibrate: the guest's CPL0 stubs timed whole", .serialized, .enabled(if: KVM.isUsable, Comment(rawValue: kvmReason)))
struct StubCalibrationTests {
    @Test("The stub pairs take the guest's stub paths (KVM's counters per pair) and give positive stub costs")
    func stubPairs() throws {
        let r = try KVMCalibration.run(KVMCalibrationOptions(quick: true))
        let wp = try #require(r.measurement("wp_fault_after_harvest"))
        // Exits the host's own interrupts caused (irq_exits) are not the stub's path: a timer
        // tick during a batch of 30 pairs adds 0.03 per pair, and CI saw 0.201 over (2026-12-04).
        func pathExits(_ m: CalibrationMeasurement) -> Double { m.counter("exits") - m.counter("irq_exits") }
        let wpExits = pathExits(wp)
        for name in stubBenchmarks(r) where name != Session.stringRootElement {
            let m = try #require(r.measurement(name))
            #expect(m.pathConfirmed, "\(name): path counter \(m.pathCounter ?? "-") \(m.pathCounter.map { m.counter($0) } ?? 0)")
            // Each pair: the write-protect fault (pf_fixed, one exit) and one stub: three emulated
            // instructions, the IRET failing the emulator once.
            #expect(abs(m.counter("pf_fixed") - 1) < 0.05, "\(name): pf_fixed \(m.counter("pf_fixed")) per pair")
            #expect(abs(m.counter("insn_emulation_fail") - 1) < 0.05, "\(name): insn_emulation_fail \(m.counter("insn_emulation_fail")) per pair")
            #expect(abs(m.counter("insn_emulation") - 3) < 0.2, "\(name): insn_emulation \(m.counter("insn_emulation")) per pair")
            // The model's exits per stub (the event's own + the IRET's) are what KVM counts.
            let stubExits = pathExits(m) - wpExits
            let model = Double(1 + GuestCPL0StubsOracle.iretExits)
            #expect(abs(stubExits - model) < 0.2, "\(name): \(stubExits) exits per stub, the model counts \(model)")
        }
        #expect(r.measurement(Session.invlpgStubPair)!.counter("invlpg") == 1)
        if let m = r.measurement(Session.stringRootElement) {
            // Per element of a 512-element string KVM emulates whole (one root-copy string of 1
            // and one of 512 per pair, 4 CR3 stubs around them): one tracked write per element,
            // and one exit and one emulated instruction per string, not per element.
            #expect(m.counter("mmu_pte_write") > 0.99 && m.counter("mmu_pte_write") < 1.05, "mmu_pte_write \(m.counter("mmu_pte_write")) per element")
            #expect(m.counter("exits") < 0.1, "exits \(m.counter("exits")) per element")
            #expect(m.counter("insn_emulation") < 0.1, "insn_emulation \(m.counter("insn_emulation")) per element")
            #expect(m.summary.medianNanos > 0)
        }
        guard r.platform == .pvm else { return }
        for p in ["CostModel.invlpgStub", "CostModel.cr3Stub", "CostModel.cr3SwitchStub", "CostModel.stringStoreElement"]
        where r.measurement(Session.cr3SwitchStubPair) != nil || (p != "CostModel.cr3SwitchStub" && p != "CostModel.stringStoreElement") {
            let value = r.cost(p)?.medianNanos ?? r.bounds.first { $0.parameter == p }?.upperNanos
            let v = try #require(value, "\(p) neither measured nor bounded: \(r.omitted.filter { $0.0 == p })")
            #expect(v > 0, "\(p) = \(v) ns")
        }
    }
}

/// MemVirtKVM does not import MemVirtModel: the model's figure (GuestCPL0Stubs.kvmGuestRuntime
/// .iretExits), restated here; GuestStubPricingTests checks the model counts exactly that.
enum GuestCPL0StubsOracle { static let iretExits = 1.0 }
