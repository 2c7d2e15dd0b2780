import MemVirtCore

/// Cycles per event: every number a named parameter with its source. The architectural model
/// (walks, faults) counts events; this table turns counts into time. Presets describe hosts.
public struct CostModel: Sendable, Hashable {
    public var name: String
    /// Core clock used to turn cycles into seconds.
    public var clockGHz: Double

    // Translation.
    /// Translation cost of an L1 TLB hit: it overlaps the L1D access (Intel optimization
    /// manual: the load-to-use latency of 5 cycles already includes the DTLB look-up); 0.
    public var l1TLBHit: Double
    /// An L1 miss that hits the STLB: ~7 cycles (Chips and Cheese, "Popping the Hood on Golden
    /// Cove", 2021: STLB hit adds about 7 cycles; the Intel optimization manual gives 7-9).
    public var l2TLBHit: Double
    /// Fixed cost to start a page walk after an STLB miss (the PMH's set-up), ~10 cycles
    /// (Bhattacharjee, "Large-reach MMU caches", MICRO 2013, walk start-up overhead).
    public var walkStart: Double
    /// One paging-entry read that hits L1D / L2 / LLC / DRAM. Golden Cove: L1D 5, L2 15, L3 ~65
    /// cycles; DRAM ~100 ns ≈ 300 cycles at 3 GHz (Chips and Cheese, Golden Cove, 2021).
    public var walkRefL1: Double
    public var walkRefL2: Double
    public var walkRefLLC: Double
    public var walkRefDRAM: Double
    /// An A/D bit write-back by the walker: a locked RMW on the entry, ~20 cycles (its line is
    /// already in L1 from the walk's read; locked operations cost ~18-20 cycles on Intel cores,
    /// Agner Fog's instruction tables, Golden Cove LOCK CMPXCHG).
    public var adWrite: Double
    /// A data access after translation: the L1D load-to-use latency, 5 cycles (as above). The
    /// model does not simulate data caches; this constant keeps cycles comparable across modes.
    public var dataAccess: Double

    // Guest kernel (native costs; a virtualized guest pays these plus the hypervisor's).
    /// Exception delivery and IRET for a #PF: ~250 cycles on recent Intel cores (lmbench "page
    /// fault" on bare metal ~0.15 us total, Huang et al., "PVM", SOSP 2023).
    public var guestExceptionRoundTrip: Double
    /// Linux anonymous demand-zero fault for 4 KiB, handler plus clearing the page: ~0.7 us ≈
    /// 2,000 cycles (will-it-scale page_fault1 ~1.4 M faults/s per core on a 3 GHz Intel core).
    public var guestDemandZero4K: Double
    /// Demand-zero for 2 MiB: clear_huge_page dominates, ~60 us ≈ 180,000 cycles at ~35 GB/s
    /// store bandwidth (Linux THP fault latency measurements, LWN "Transparent huge pages", 2011).
    public var guestDemandZero2M: Double
    /// Demand-zero for 1 GiB: 512 x the 2 MiB clear, ~30 ms.
    public var guestDemandZero1G: Double
    /// Allocating and zeroing a page-table page inside a fault: ~600 cycles (a 4 KiB clear at
    /// ~35 GB/s ≈ 120 ns plus the allocator).
    public var guestPageTablePage: Double
    /// A guest INVLPG or CR3 write executed natively: ~100 / ~200 cycles (Intel optimization
    /// manual; INVLPG latency in Agner Fog's tables is 100-250 cycles).
    public var invlpg: Double
    public var cr3Write: Double

    // Hypervisor.
    /// A VM exit and re-entry with KVM's minimal handling: ~1,000 cycles on recent Intel cores
    /// (kvm-unit-tests vmexit "vmcall" ~1,000-1,200 cycles on Skylake/Ice Lake). PVM's world
    /// switch is 0.179 us ≈ 540 cycles (Huang et al., SOSP 2023).
    public var vmExitRoundTrip: Double
    /// KVM's EPT-violation handler without the host page allocation (kvm_tdp_page_fault: memslot
    /// look-up, GUP fast path, SPTE install): ~1,500 cycles (KVM selftests demand_paging_test
    /// reports ~1-2 us per fault including the exit on recent hosts).
    public var eptViolationHandler: Double
    /// Emulating one instruction in KVM's x86 emulator (MMIO, PTE writes): ~3,000 cycles ≈ 1 us
    /// (estimate; docs/references.md, instruction emulation: 0.9-2.6 us measured on kvm_pvm).
    public var instructionEmulation: Double
    /// KVM's shadow page-fault handler without the exit (FNAME(page_fault): software guest walk,
    /// shadow page look-ups, SPTE install): ~2,300 cycles. lmbench page-fault latency is 0.93 us
    /// under kvm-spt against 0.15 us bare (Huang et al., "PVM", SOSP 2023): ~0.78 us extra per fault,
    /// minus the ~1,000-cycle exit.
    public var shadowFaultHandler: Double
    /// Creating a shadow page: allocate and clear a table, hash it, write-protect the guest
    /// table through the rmap (kvm_mmu_get_page + account_shadowed): ~1,500 cycles.
    public var shadowPageCreate: Double
    /// Resynchronizing an unsync shadow page: compare 512 guest entries (kvm_sync_page):
    /// ~5,000 cycles (512 entries at ~10 cycles each, measured KVM sync costs are a few us).
    public var shadowResync: Double
    /// KVM's INVLPG handler under shadow paging (kvm_mmu_invlpg): ~500 cycles plus the exit.
    public var invlpgHandler: Double
    /// Injecting an intercepted #PF into the guest (kvm_inject_page_fault): ~300 cycles.
    public var faultInjection: Double
    /// An exit that KVM hands to the VMM process and back (KVM_RUN returns for a PIO or MMIO
    /// exit; the VMM handles it and re-enters): ~12,000 cycles on a VMX host (estimate from
    /// kvm-unit-tests x86/vmexit.c, whose `inl_from_qemu` test times exactly this round trip,
    /// against ~1,000-1,500 for an exit handled in the kernel). Profiles set it per host; not yet
    /// charged by the model's events.
    public var userspaceExitRoundTrip: Double = 12_000
    /// KVM's handling of a guest CR3 write under shadow paging, beside the exit
    /// (kvm_mmu_new_pgd: look up the cached shadow root or build one, sync unsync children):
    /// ~1,000 cycles (estimate). Charged with an exit per guest CR3 load under shadow paging
    /// (ShadowPaging.loadCR3), in place of the native `cr3Write`.
    public var cr3SwitchHandler: Double = 1_000
    /// KVM's handling of a guest write to a shadowed page-table page beyond the instruction's
    /// emulation (kvm_mmu_track_write: find the shadow pages of the gfn, update or zap the
    /// affected sptes, detect flooding): ~1,000 cycles (estimate). Charged per emulated guest
    /// page-table write with the exit and `instructionEmulation` (ShadowPaging.emulatedTableWrite).
    public var shadowPTEWrite: Double = 1_000
    /// A guest INVLPG stub where the guest's CPL0 code is emulated (kvm_pvm; `GuestCPL0Stubs`),
    /// beyond the INVLPG's exit and `invlpgHandler`: the exception that enters it from CPL3
    /// (`ud2`), its delivery at CPL0, the stub's other instruction and its IRET (on kvm_pvm the
    /// IRET fails KVM's emulator and is completed by a second exit). Estimate 3,300 cycles
    /// (`faultInjection` + one `instructionEmulation`, what the model charged before it was
    /// measured); `kvm calibrate` measures it (pair_invlpg_stub_minus_wp, StubCalibration.swift).
    public var invlpgStub: Double = 3_300
    /// The same for the CR3 stub (`div` by zero, `mov %rdx,%cr3`), beyond the CR3 write's exit
    /// and `cr3SwitchHandler`. Estimate 3,300 cycles as `invlpgStub`; measured by
    /// pair_cr3_stub_minus_wp.
    public var cr3Stub: Double = 3_300
    /// The CR3 stub switching to another address space (a different root), beyond the CR3
    /// write's exit and `cr3SwitchHandler`: `cr3Stub` for a switch. Estimate 3,300 cycles as
    /// `cr3Stub`; measured by pair_cr3_switch_stub_minus_wp.
    public var cr3SwitchStub: Double = 3_300
    /// One element of a guest string store (`rep stosq`/`rep movsq`) that KVM emulates whole
    /// because its frame is a shadow root in use (ShadowPaging.stringWrite): an emulator
    /// iteration and kvm_mmu_track_write, beside the string's one exit and instruction
    /// emulation. Estimate 1,000 cycles, as `shadowPTEWrite` (what the model charged per element
    /// before it was measured); `kvm calibrate` measures it (string_root_per_element).
    public var stringStoreElement: Double = 1_000
    /// The host kernel's demand-zero fault on a 4 KiB page of guest memory (the hypervisor's
    /// GUP faults it in: handle_mm_fault -> do_anonymous_page, allocate and clear): charged
    /// where the model backs a guest frame with a new host page (ShadowPaging.hostAddress,
    /// nested paging's host faults). 2,000 cycles as the guest's own (will-it-scale
    /// page_fault1, ~0.7 us); `kvm calibrate` measures it on the host (host_first_touch: the
    /// VMM's own first write to a fresh private anonymous page), the same figure its
    /// shadowFaultHandler and pageCopy derivations take out of a first touch.
    public var hostDemandZero4K: Double = 2_000
    /// The host's copy-on-write of its zero page inside a hypervisor write fault, beyond the
    /// two faults it costs (the write exits, KVM's GUP for write runs do_wp_page ->
    /// wp_page_copy, which allocates a zeroed page for the zero pfn, and the mmu-notifier
    /// invalidation zaps the spte and flushes TLBs, kvm_flush_remote_tlbs; the fault is stale
    /// and retried): 2,000 cycles, a demand-zero fault's allocation and clear
    /// (mm/memory.c: wp_page_copy of the zero pfn takes vma_alloc_zeroed_movable_folio), the
    /// invalidation and flush not counted. `kvm calibrate` measures the whole event
    /// (zero_page_cow_write: a guest write to a page it read before, minus two first reads).
    /// Charged where the model copies the zero page (ShadowPaging, options.hostZeroPage).
    public var hostZeroPageCopy: Double = 2_000
    /// The categories that are the virtualization layer's (what a hypervisor adds).
    public static let virtualizationCategories: Set<String> = ["vm_exits", "hypervisor_faults", "emulation", "shadow_sync", "host_faults"]
    /// A 4 KiB read from the guest's disk for a hard (major) fault: ~80 us for a datacenter
    /// NVMe SSD random read (Intel P4510 data sheet: 77 us typical read latency) ≈ 240,000 cycles.
    public var diskRead4K: Double = 240_000
    /// Exits per guest disk I/O under virtualization: the virtio queue notification (an
    /// MMIO/PIO exit, emulated) and the completion interrupt's injection and EOI (Linux
    /// virtio-blk; with PV EOI the second is cheaper). Counted as 2 exits.
    public var exitsPerDiskIO: Double = 2

    /// Bare metal on a recent Intel core (Golden Cove class, 3 GHz). The same numbers, each with
    /// its source, are the built-in profile `bare-metal` (Sources/MemVirtConfig/Profiles), which
    /// is what `memvirt run --profile` reads; a test keeps the two equal.
    public static let bareMetal = CostModel(
        name: "bare-metal", clockGHz: 3.0, l1TLBHit: 0, l2TLBHit: 7, walkStart: 10, walkRefL1: 5, walkRefL2: 15,
        walkRefLLC: 65, walkRefDRAM: 300, adWrite: 20, dataAccess: 5, guestExceptionRoundTrip: 250,
        guestDemandZero4K: 2_000, guestDemandZero2M: 180_000, guestDemandZero1G: 92_160_000, guestPageTablePage: 600,
        invlpg: 100, cr3Write: 200, vmExitRoundTrip: 1_000, eptViolationHandler: 1_500, instructionEmulation: 3_000,
        shadowFaultHandler: 2_300, shadowPageCreate: 1_500, shadowResync: 5_000, invlpgHandler: 500, faultInjection: 300)

    /// A VMX host with EPT (Intel, recent KVM): the same numbers as `bareMetal`, whose hypervisor
    /// entries already are the VMX/EPT figures (native runs never charge them). Built-in profile
    /// `vmx-ept`.
    public static let vmxEPT: CostModel = {
        var c = bareMetal
        c.name = "vmx-ept"
        return c
    }()

    /// kvm_pvm (shadow paging without VMX): constants from a calibration with `memvirt kvm probe`
    /// on one machine on 2026-11-22, not a measurement of the host you run on (recalibrate with
    /// `memvirt kvm calibrate`). That calibration measured a first guest touch (shadow fault fixed
    /// in KVM, host page allocated) at 11.9-13.8 us ≈ 37,500 cycles at 3 GHz and one emulated
    /// CPL0 instruction at 1.2-1.4 us ≈ 3,700 cycles. PVM's world switch is 0.179 us ≈ 540
    /// cycles (Huang et al., SOSP 2023); the remaining ~35,000 cycles of a first touch are the
    /// shadow-fault handler. INVLPG and CR3 writes are single emulated CPL0 instructions there.
    /// `shadowResync` is an estimate, not measured: 20 emulated instructions, standing for the
    /// guest's emulated CPL0 flush path that precedes each resync. An exit to the VMM process
    /// (PIO) was measured at ~36 us by `memvirt kvm probe` on such a machine in 2026-12. Guest kernel work
    /// is kept at native speed, as PVM runs it (this host emulates CPL0 instead, which is why
    /// MemVirt's own guest runtime stays at CPL3). Built-in profile `pvm-shadow`.
    public static let pvmShadow: CostModel = {
        var c = bareMetal
        c.name = "pvm-shadow"
        c.vmExitRoundTrip = 540
        c.shadowFaultHandler = 35_000
        c.instructionEmulation = 3_700
        c.invlpgHandler = 3_700
        c.cr3SwitchHandler = 3_700
        c.invlpgStub = 300 + 3_700
        c.cr3Stub = 300 + 3_700
        c.cr3SwitchStub = 300 + 3_700
        c.shadowResync = 3_700 * 20
        c.userspaceExitRoundTrip = 108_000
        return c
    }()

    /// The presets by name.
    public static let presets: [String: CostModel] = ["bare-metal": bareMetal, "vmx-ept": vmxEPT, "pvm-shadow": pvmShadow]

    /// The host's demand-zero fault for a host page of `size` (4 KiB: `hostDemandZero4K`;
    /// huge host pages: the guest's clear of the same size, a clear_huge_page either way).
    public func hostDemandZero(_ size: PageSize) -> Double { size == .size4K ? hostDemandZero4K : demandZero(size) }

    public func demandZero(_ size: PageSize) -> Double {
        switch size {
        case .size4K: guestDemandZero4K
        case .size2M: guestDemandZero2M
        case .size1G: guestDemandZero1G
        }
    }
}

/// Where simulated cycles went. The ledger's categories print in this order.
public enum CostCategory: Int, CaseIterable, Sendable {
    case dataAccess, l2TLB, pageWalk, adWrites, compute, guestFaults, guestKernel
    case vmExits, hypervisorFaults, emulation, shadowSync, hostFaults, diskIO

    /// What a run of the same access stream also costs with no virtualization at all: the
    /// accesses, TLB hits, page walks (shadow paging's walk is the native 4-level one), A/D
    /// writes and compute. The rest is what the hypervisor and the host add.
    public static let native: [CostCategory] = [.dataAccess, .l2TLB, .pageWalk, .adWrites, .compute]

    public var name: String {
        switch self {
        case .dataAccess: "data_access"
        case .l2TLB: "l2_tlb"
        case .pageWalk: "page_walk"
        case .adWrites: "ad_bit_writes"
        case .compute: "compute"
        case .guestFaults: "guest_page_faults"
        case .guestKernel: "guest_kernel"
        case .vmExits: "vm_exits"
        case .hypervisorFaults: "hypervisor_faults"
        case .emulation: "emulation"
        case .shadowSync: "shadow_sync"
        case .hostFaults: "host_faults"
        case .diskIO: "disk_io"
        }
    }
}

/// Simulated cycles by category.
public struct CostLedger: Sendable {
    public var cycles: [Double] = Array(repeating: 0, count: CostCategory.allCases.count)
    public init() {}
    @inline(__always) public mutating func charge(_ c: CostCategory, _ n: Double) { cycles[c.rawValue] += n }
    public var total: Double { cycles.reduce(0, +) }
    public var breakdown: [(String, Double)] {
        CostCategory.allCases.filter { cycles[$0.rawValue] != 0 }.map { ($0.name, cycles[$0.rawValue]) }
    }
    public mutating func merge(_ o: CostLedger) { for i in cycles.indices { cycles[i] += o.cycles[i] } }
}
