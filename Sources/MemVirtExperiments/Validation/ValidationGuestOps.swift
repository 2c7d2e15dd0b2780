import MemVirtCore
import MemVirtKVM
import MemVirtModel

/// `memvirt validate`'s guest-kernel cases: a guest that edits its own page tables, one
/// `GuestOpScript` realized by both engines. On /dev/kvm the KVM engine's page-table-editing
/// guest (GuestOpsRunner: its own #PF handler, PTE writes through its direct map, INVLPG and
/// CR3 loads through 3-instruction CPL0 stubs) makes KVM's shadow MMU do its real work; the
/// model runs the same script with `SimulatedGuestKernel` over its shadow MMU
/// (`Machine.runGuestOps`), in the KVM guest's situation: the kernel's own accesses through a
/// direct map (`ShadowPaging.Options.guestDirectMap`), anonymous host memory
/// (`hostZeroPage`), the TLB's PCID setting from the script, and on kvm_pvm the CPL0 stubs'
/// emulated instructions (`GuestCPL0Stubs.kvmGuestRuntime`).
enum ValidationGuestOps {
    /// The cases, by GuestOpScript's named scripts (GuestOpScript+Cases.swift).
    static func cases(quick: Bool) -> [ValidationCase] {
        // kvm_pvm offers guests no PCID (docs/guest-ops.md): the PCID script runs where it does.
        let pcid = (try? GuestOpsRunner.pcidOffered()) ?? false
        return GuestOpScript.names.compactMap { name in
            guard let s = GuestOpScript.named(name, quick: quick, seed: 11), pcid || !s.pcid else { return nil }
            return ValidationCase(name: "guest-\(name)", spec: WorkloadSpec(), kind: .guestOps(s))
        }
    }

    /// Whether this host's KVM emulates the guest's CPL0 code (kvm_pvm): the model then
    /// charges each stub as `kvm calibrate` measured the guest's own stubs from CPL3
    /// (GuestCPL0Stubs: faultInjection, invlpgStub, cr3Stub, cr3SwitchStub from the profile) and
    /// counts the second exit each stub's IRET takes.
    static var cpl0Emulated: Bool { KVMPlatform.detect() == .pvm }

    /// The model's run of `script`: a fresh shadow-paged machine, space 0 loaded (its shadow
    /// root built, as the KVM runner's warm-up does), counters and ledger zeroed, then the script.
    static func runModel(_ script: GuestOpScript, machine: ReproductionMachine, cpl0Emulated: Bool) throws -> (ModelSide, GuestOpCounts) {
        var config = ModelConfig()
        config.paging = .shadow
        config.costs = machine.costs
        config.tlb = machine.tlb
        config.tlb.pcid = script.pcid
        config.shadow.hostZeroPage = true
        config.shadow.guestDirectMap = true
        config.shadow.sharedRuntimeSubtree = true
        return try ModelEngine.withMachine(config: config, capacity: 4 << 30, MachineBody { r in
            guard let m = r as? Machine<ShadowPaging> else { throw InputError("validate: the model machine is not shadow-paged") }
            // Space 0 as the KVM runner presets it: its root and PDPT are the first two frames
            // of a 2 MiB-aligned pool, written by the VMM before the guest runs (so the guest
            // kernel's first touches of them through its direct map fault, and prefetch, there
            // as here). The frames below the pool are left allocated and never touched.
            var f = try frame(m)
            while (f >> 12) % 512 != 0 { f = try frame(m) }
            m.kernel.frames.free(f, .size4K)
            let space0 = try m.kernel.createAddressSpace()
            guard m.kernel.prepareTables(GuestOpScript.regionBase(0), downTo: 3, in: space0) else { throw InputError("validate: guest memory exhausted") }
            // The runner's warm-up runs each stub once, loading space 0's CR3, and runs the
            // guest's code, which lives under space 0's PDPT: KVM has shadowed that PDPT.
            m.switchAddressSpace(to: space0)
            let pdpt = PageTableEntry(rawValue: m.mode.guestMemory.read64(space0.root)).address
            (m.mode as ShadowPaging).shadowGuestTable(gfn: pdpt >> 12, level: 3, cpu: m.cpu)
            m.resetStatistics()
            m.cpl0Stubs = cpl0Emulated ? .kvmGuestRuntime : nil
            let guest = try m.runGuestOps(script)
            let counters = m.finish()
            let cycles = m.cpu.ledger.total
            let side = ModelSide(counters: counters, cycles: cycles, seconds: cycles / (config.costs.clockGHz * 1e9), readSum: m.checksum,
                                 dirtyPages: nil, breakdown: m.cpu.ledger.breakdown)
            return (side, guest)
        })
    }

    static func frame(_ m: Machine<ShadowPaging>) throws -> UInt64 {
        guard let f = m.kernel.frames.allocate(.size4K) else { throw InputError("validate: guest memory exhausted") }
        return f
    }

    /// The KVM engine's run of `script` (the measured phase: the script's one guest command).
    /// The script on /dev/kvm, bracketed by the CPL0 reference on its CPU (`HostSpeedBracket.around`).
    static func runKVM(_ name: String, _ script: GuestOpScript) throws -> (KVMSide, GuestOpsCounts) {
        let r: GuestOpsResult
        let bracket: HostSpeedBracket?
        do { (r, bracket) = try HostSpeedBracket.around { try GuestOpsRunner.run(script) } } catch { throw InputError("validate: case \(name): the KVM run failed: \(error)") }
        var side = KVMSide(counters: r.kvm, seconds: r.cpuSeconds, wallSeconds: r.wallSeconds, readSum: r.guest.readSum, dirtyPages: nil,
                           userspaceExits: r.vmmExits.values.reduce(0, +))
        side.hostSpeed = bracket
        return (side, r.guest)
    }

    /// The guest-side counts both kernels report, model beside KVM's guest (they follow the
    /// same policy, so they must be equal): (name, model, kvm).
    static func guestCounts(_ m: GuestOpCounts, _ k: GuestOpsCounts) -> [(String, UInt64, UInt64)] {
        [("guest_pf", m.guestPageFaults, k.guestPageFaults), ("demand_zero", m.demandZero, k.demandZero),
         ("cow_faults", m.copyOnWriteFaults, k.copyOnWriteFaults), ("cow_copies", m.copyOnWriteCopies, k.copyOnWriteCopies),
         ("leaf_writes", m.leafWrites, k.leafWrites), ("invlpg", m.invlpg, k.invlpg), ("cr3_loads", m.cr3Loads, k.cr3Loads),
         ("full_flushes", m.fullFlushes, k.fullFlushes), ("forks", m.forks, k.forks), ("exits", m.exits, k.exits),
         ("pages_unmapped", m.pagesUnmapped, k.pagesUnmapped), ("touches", m.touches, k.touches)]
    }

    /// Runs one case on both engines.
    /// `states`: the host's two speeds from the calibrations so far; with them and a bracket the
    /// run is priced at its share of the slow state (as the workload cases), else at `machine`.
    static func run(_ c: ValidationCase, script: GuestOpScript, machine: ReproductionMachine, states: HostStateMachines? = nil,
                    progress: @Sendable (String) -> Void) throws -> Validation.CaseResult {
        progress("\(Validation.name): \(c.name) on /dev/kvm")
        var (kvm, kvmGuest) = try runKVM(c.name, script)
        progress("\(Validation.name): \(c.name) in the model (shadow, \(machine.name))")
        let model: ModelSide, modelGuest: GuestOpCounts
        if let st = states, let b = kvm.hostSpeed {
            let share = st.slowShare(b)
            kvm.slowShare = share
            let (fast, g) = try runModel(script, machine: st.fast, cpl0Emulated: cpl0Emulated)
            let (slow, _) = try runModel(script, machine: st.slow, cpl0Emulated: cpl0Emulated)
            (model, modelGuest) = (fast.mixed(with: slow, share: share), g)
        } else {
            (model, modelGuest) = try runModel(script, machine: machine, cpl0Emulated: cpl0Emulated)
        }
        var r = Validation.compare(c, model: model, kvm: kvm)
        let differing = guestCounts(modelGuest, kvmGuest).filter { $0.1 != $0.2 }
        r.note += differing.isEmpty
            ? " Guest-side counts (guest_pf, demand_zero, cow_faults, cow_copies, leaf_writes, invlpg, cr3_loads, ...) equal in both kernels."
            : " Guest-side counts DIFFER: " + differing.map { "\($0.0) model \($0.1) kvm \($0.2)" }.joined(separator: ", ") + "."
        return r
    }

    static let note = "A guest that edits its own page tables (GuestOpScript): regions start unmapped and the guest's own #PF handler maps zeroed frames; its kernel zeroes, copies and writes PTEs through a direct map (2 MiB guest pages, 4 KiB sptes), so KVM sees first touches of frames there, write-protection of shadowed tables, unsync and emulated PTE writes; INVLPG and CR3 loads run in 3-instruction CPL0 stubs (emulated on kvm_pvm: each stub priced as `kvm calibrate` times it whole, two exits each)."
}
