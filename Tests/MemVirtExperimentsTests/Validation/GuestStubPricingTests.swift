import MemVirtCore
import MemVirtModel
import Testing

@testable import MemVirtExperiments

/// The model's pricing of the KVM guest's CPL0 stubs (GuestCPL0Stubs, Machine.chargeStub) in
/// the guest-* validation cases: each INVLPG stub costs CostModel.invlpgStub, each CR3 reload
/// cr3Stub and each switch cr3SwitchStub beyond the paging mode's own charges, taken from the
/// profile; each stub's IRET adds one exit. Model only (no /dev/kvm).
struct GuestStubPricingTests {
    static let names = ["mmap-churn", "fork-cow-exit", "switch", "pt-update-heavy"]

    @Test("Per stub the profile's figure: a change of invlpgStub, cr3Stub, cr3SwitchStub moves the prediction by count x change", arguments: names)
    func pricingFollowsProfile(_ name: String) throws {
        let script = try #require(GuestOpScript.named(name, quick: true, seed: 11))
        let a = ReproductionMachine.pvmShadow
        var b = a
        let d1 = 1_000.0, d2 = 20_000.0, d3 = 300_000.0
        b.costs.invlpgStub += d1
        b.costs.cr3Stub += d2
        b.costs.cr3SwitchStub += d3
        let (ma, ga) = try ValidationGuestOps.runModel(script, machine: a, cpl0Emulated: true)
        let (mb, gb) = try ValidationGuestOps.runModel(script, machine: b, cpl0Emulated: true)
        #expect(ga == gb, "\(name): the guest did different work")
        // The closed form: N stubs of each kind x the change of its price.
        let switches = Double(ga.cr3Loads - ga.fullFlushes)
        let expected = Double(ga.invlpg) * d1 + Double(ga.fullFlushes) * d2 + switches * d3
        let delta = mb.cycles - ma.cycles
        #expect(abs(delta - expected) <= 1e-9 * mb.cycles + 1e-6, "\(name): cycles moved \(delta), expected \(expected) (invlpg \(ga.invlpg), reloads \(ga.fullFlushes), switches \(switches))")
        #expect(ga.invlpg + ga.cr3Loads > 0, "\(name): no stub ran")
    }

    @Test("Emulated stubs: one more exit and three emulated instructions per stub (#PF, INVLPG, CR3) than natively run CPL0 code", arguments: names)
    func stubExits(_ name: String) throws {
        let script = try #require(GuestOpScript.named(name, quick: true, seed: 11))
        let (emulated, g) = try ValidationGuestOps.runModel(script, machine: .pvmShadow, cpl0Emulated: true)
        let (native, g2) = try ValidationGuestOps.runModel(script, machine: .pvmShadow, cpl0Emulated: false)
        #expect(g == g2)
        let stubs = g.guestPageFaults + g.invlpg + g.cr3Loads
        #expect(emulated.counters[.exits] - native.counters[.exits] == stubs, "\(name): exits \(emulated.counters[.exits]) vs \(native.counters[.exits]) natively, stubs \(stubs)")
        #expect(emulated.counters[.insnEmulation] - native.counters[.insnEmulation] == 3 * stubs)
    }

    @Test("Emulated string stores into a root in use: stringStoreElement per 8-byte element, 512 per 4 KiB string")
    func stringElements() throws {
        let script = try #require(GuestOpScript.named("fork-cow-exit", quick: true, seed: 11))
        let a = ReproductionMachine.pvmShadow
        var b = a
        let d = 7_000.0
        b.costs.stringStoreElement += d
        let (ma, _) = try ValidationGuestOps.runModel(script, machine: a, cpl0Emulated: true)
        let (mb, _) = try ValidationGuestOps.runModel(script, machine: b, cpl0Emulated: true)
        let elements = (mb.cycles - ma.cycles) / d
        let strings = (elements / 512).rounded()
        // fork-cow-exit reuses an exited child's root frame for a new table: KVM emulates those strings.
        #expect(strings >= 1 && abs(elements - 512 * strings) < 1e-3, "\(elements) elements charged")
        #expect(512 * strings <= Double(ma.counters[.mmuPteWrite]), "each element is a tracked write (mmu_pte_write \(ma.counters[.mmuPteWrite]))")
    }

    @Test("A whole stub's charge: N INVLPG stubs cost N x (exit + invlpgHandler + invlpgStub) in the model's ledger")
    func invlpgClosedForm() throws {
        var config = ModelConfig()
        config.paging = .shadow
        config.costs = CostModel.pvmShadow
        config.costs.invlpgStub = 12_345
        let n = 37
        let cycles = try ModelEngine.withMachine(config: config, capacity: 1 << 30, MachineBody { r in
            guard let m = r as? Machine<ShadowPaging> else { throw InputError("not shadow") }
            m.cpl0Stubs = .kvmGuestRuntime
            m.resetStatistics()
            for i in 0..<n { m.invalidatePage(0x4000_0000 + UInt64(i) * 4096, space: m.space) }
            return (m.cpu.ledger.total, m.cpu.counters[.exits], m.cpu.counters[.invlpg])
        })
        let c = config.costs
        let per = c.vmExitRoundTrip + c.invlpgHandler + c.invlpgStub
        #expect(abs(cycles.0 - Double(n) * per) < 1e-6 * Double(n) * per, "ledger \(cycles.0), expected \(Double(n) * per)")
        #expect(cycles.1 == UInt64(2 * n) && cycles.2 == UInt64(n))
    }
}
