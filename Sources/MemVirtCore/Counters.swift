/// Counters that both engines report. Where KVM has a statistic for an event, the counter
/// carries KVM's name and KVM's meaning (Documentation/virt/kvm/api.rst, "KVM_GET_STATS_FD";
/// arch/x86/kvm/x86.c `kvm_vcpu_stats_desc` / `kvm_vm_stats_desc`); otherwise the name is ours
/// and the meaning is written here. One name means one thing in both engines.
public enum Counter: Int, CaseIterable, Sendable, Hashable, Codable {
    // Workload and translation (ours).
    case accesses, reads, writes, fetches
    case tlbHits, tlbMisses, l1TLBHits, l2TLBHits
    case walks, walkMemoryRefs, faultedWalkRefs, walkCacheHits, accessedDirtyWrites, walkRetries
    case guestPageFaults, guestDemandZeroFaults, guestCopyOnWriteFaults, guestMajorFaults
    case guestPageTablePages
    // KVM vCPU stats.
    case pfTaken, pfFixed, pfEmulate, pfSpurious, pfFast, pfMmioSpteCreated, pfGuest
    case tlbFlush, invlpg, exits, ioExits, mmioExits, insnEmulation, hypercalls
    // KVM VM stats.
    case mmuShadowZapped, mmuPteWrite, mmuPdeZapped, mmuFlooded, mmuRecycled, mmuCacheMiss, mmuUnsync
    case pages4K, pages2M, pages1G
    // Nested paging and host memory (ours).
    case eptViolations, eptMisconfigurations, nestedTLBHits, nestedWalkCacheHits, nestedWalkRefs
    case shadowPagesCreated, shadowRootCacheHits, shadowResyncs
    case hostMinorFaults, hostMajorFaults, swapIns, swapOuts
    case apfNotPresent, apfReady
    case ksmPagesShared, ksmPagesSharing, ksmCowBreaks

    /// The name in JSON and tables: KVM's stat name where KVM has the event.
    public var name: String {
        switch self {
        case .accesses: "accesses"
        case .reads: "reads"
        case .writes: "writes"
        case .fetches: "fetches"
        case .tlbHits: "tlb_hits"
        case .tlbMisses: "tlb_misses"
        case .l1TLBHits: "l1_tlb_hits"
        case .l2TLBHits: "l2_tlb_hits"
        case .walks: "walks"
        case .walkMemoryRefs: "walk_memory_refs"
        case .faultedWalkRefs: "faulted_walk_refs"
        case .walkCacheHits: "walk_cache_hits"
        case .accessedDirtyWrites: "ad_bit_writes"
        case .walkRetries: "walk_retries"
        case .guestPageFaults: "guest_page_faults"
        case .guestDemandZeroFaults: "guest_demand_zero_faults"
        case .guestCopyOnWriteFaults: "guest_cow_faults"
        case .guestMajorFaults: "guest_major_faults"
        case .guestPageTablePages: "guest_page_table_pages"
        case .pfTaken: "pf_taken"
        case .pfFixed: "pf_fixed"
        case .pfEmulate: "pf_emulate"
        case .pfSpurious: "pf_spurious"
        case .pfFast: "pf_fast"
        case .pfMmioSpteCreated: "pf_mmio_spte_created"
        case .pfGuest: "pf_guest"
        case .tlbFlush: "tlb_flush"
        case .invlpg: "invlpg"
        case .exits: "exits"
        case .ioExits: "io_exits"
        case .mmioExits: "mmio_exits"
        case .insnEmulation: "insn_emulation"
        case .hypercalls: "hypercalls"
        case .mmuShadowZapped: "mmu_shadow_zapped"
        case .mmuPteWrite: "mmu_pte_write"
        case .mmuPdeZapped: "mmu_pde_zapped"
        case .mmuFlooded: "mmu_flooded"
        case .mmuRecycled: "mmu_recycled"
        case .mmuCacheMiss: "mmu_cache_miss"
        case .mmuUnsync: "mmu_unsync"
        case .pages4K: "pages_4k"
        case .pages2M: "pages_2m"
        case .pages1G: "pages_1g"
        case .eptViolations: "ept_violations"
        case .eptMisconfigurations: "ept_misconfigurations"
        case .nestedTLBHits: "nested_tlb_hits"
        case .nestedWalkCacheHits: "nested_walk_cache_hits"
        case .nestedWalkRefs: "nested_walk_refs"
        case .shadowPagesCreated: "shadow_pages_created"
        case .shadowRootCacheHits: "shadow_root_cache_hits"
        case .shadowResyncs: "shadow_resyncs"
        case .hostMinorFaults: "host_minor_faults"
        case .hostMajorFaults: "host_major_faults"
        case .swapIns: "swap_ins"
        case .swapOuts: "swap_outs"
        case .apfNotPresent: "apf_not_present"
        case .apfReady: "apf_ready"
        case .ksmPagesShared: "pages_shared"
        case .ksmPagesSharing: "pages_sharing"
        case .ksmCowBreaks: "ksm_cow_breaks"
        }
    }

    /// What one count means.
    public var meaning: String {
        switch self {
        case .accesses: "memory accesses made by the workload"
        case .reads: "accesses that read"
        case .writes: "accesses that write (read-modify-writes included)"
        case .fetches: "instruction fetches"
        case .tlbHits: "translations found in any TLB level"
        case .tlbMisses: "translations found in no TLB level (a page walk followed)"
        case .l1TLBHits: "translations found in an L1 TLB"
        case .l2TLBHits: "translations that missed L1 and hit the unified L2 TLB"
        case .walks: "completed hardware page walks"
        case .walkMemoryRefs: "paging-entry reads of completed walks (A/D write-backs and retried walks counted apart)"
        case .faultedWalkRefs: "paging-entry reads of walks that ended in a fault (their retries are counted as new walks)"
        case .walkCacheHits: "walks that started below the root thanks to a paging-structure cache"
        case .accessedDirtyWrites: "A/D bit write-backs by the walker"
        case .walkRetries: "walks that faulted and were retried after the fault was fixed"
        case .guestPageFaults: "page faults delivered to the guest kernel, in any paging mode"
        case .guestDemandZeroFaults: "guest faults fixed by mapping a fresh zeroed frame"
        case .guestCopyOnWriteFaults: "guest faults fixed by copying a shared frame"
        case .guestMajorFaults: "guest faults that read the page from the guest's disk (hard faults)"
        case .guestPageTablePages: "guest page-table pages allocated"
        case .pfTaken: "KVM: page faults the hypervisor handled (shadow faults, EPT violations)"
        case .pfFixed: "KVM: faults fixed by the hypervisor by installing a shadow/EPT entry (a hidden fault)"
        case .pfEmulate: "KVM: faults fixed by emulating the faulting instruction"
        case .pfSpurious: "KVM: faults with nothing to fix (another vCPU fixed it)"
        case .pfFast: "KVM: faults fixed without taking the MMU lock"
        case .pfMmioSpteCreated: "KVM: MMIO shadow/EPT entries created"
        case .pfGuest: "KVM: faults the hypervisor intercepted and injected into the guest"
        case .tlbFlush: "KVM: TLB flushes requested by the hypervisor"
        case .invlpg: "KVM: guest INVLPG instructions intercepted"
        case .exits: "KVM: VM exits"
        case .ioExits: "KVM: exits for port I/O"
        case .mmioExits: "KVM: exits for MMIO"
        case .insnEmulation: "KVM: instructions emulated"
        case .hypercalls: "KVM: hypercalls"
        case .mmuShadowZapped: "KVM: shadow pages zapped"
        case .mmuPteWrite: "KVM: guest writes to write-protected (shadowed) page-table entries, emulated"
        case .mmuPdeZapped: "KVM: shadow page-directory entries zapped by an emulated PTE write"
        case .mmuFlooded: "KVM: shadow pages unshadowed after repeated emulated writes (write flooding)"
        case .mmuRecycled: "KVM: shadow pages reclaimed to stay under the shadow-page limit"
        case .mmuCacheMiss: "KVM: shadow page look-ups that had to create a new shadow page"
        case .mmuUnsync: "KVM: shadow pages currently unsynced (leaf tables the guest may write freely)"
        case .pages4K: "KVM: host mappings (shadow/EPT leaves) of 4 KiB"
        case .pages2M: "KVM: host mappings of 2 MiB"
        case .pages1G: "KVM: host mappings of 1 GiB"
        case .eptViolations: "EPT violations (nested paging exits for a missing or forbidden mapping)"
        case .eptMisconfigurations: "EPT misconfigurations (exits for MMIO ranges)"
        case .nestedTLBHits: "guest-physical translations found in the nested TLB during 2D walks"
        case .nestedWalkCacheHits: "nested walks that started below the EPT root thanks to a cache"
        case .nestedWalkRefs: "EPT-entry reads made during 2D walks"
        case .shadowPagesCreated: "shadow page-table pages created"
        case .shadowRootCacheHits: "CR3 writes served from the cache of shadow roots"
        case .shadowResyncs: "unsync shadow pages resynchronized with the guest table"
        case .hostMinorFaults: "host faults fixed without I/O (a fresh or cached page)"
        case .hostMajorFaults: "host faults that waited for I/O (swap-in)"
        case .swapIns: "pages read back from the swap device"
        case .swapOuts: "pages written to the swap device"
        case .apfNotPresent: "async page faults: 'page not present' delivered to the guest"
        case .apfReady: "async page faults: 'page ready' delivered to the guest"
        case .ksmPagesShared: "KSM: shared pages in use (sysfs pages_shared)"
        case .ksmPagesSharing: "KSM: further mappings of shared pages, i.e. pages saved (sysfs pages_sharing)"
        case .ksmCowBreaks: "KSM: writes to a merged page that copied it (copy-on-write breaks)"
        }
    }

    public static let byName: [String: Counter] = Dictionary(uniqueKeysWithValues: allCases.map { ($0.name, $0) })
}

/// A set of counter values, with the subset that applies to a run (reported even when 0).
public struct CounterSet: Sendable, Hashable {
    public private(set) var values: [UInt64]
    public private(set) var applicable: [Bool]

    public init(applicable counters: [Counter] = []) {
        values = [UInt64](repeating: 0, count: Counter.allCases.count)
        applicable = [Bool](repeating: false, count: Counter.allCases.count)
        for c in counters { applicable[c.rawValue] = true }
    }

    public subscript(_ c: Counter) -> UInt64 {
        get { values[c.rawValue] }
        set { values[c.rawValue] = newValue; applicable[c.rawValue] = true }
    }

    public mutating func add(_ c: Counter, _ n: UInt64) { self[c] = self[c] &+ n }
    public mutating func markApplicable(_ cs: [Counter]) { for c in cs { applicable[c.rawValue] = true } }
    public mutating func markNotApplicable(_ cs: [Counter]) { for c in cs where values[c.rawValue] == 0 { applicable[c.rawValue] = false } }

    /// The counters that apply, in declaration order, with their values.
    public var reported: [(Counter, UInt64)] {
        Counter.allCases.filter { applicable[$0.rawValue] || values[$0.rawValue] != 0 }.map { ($0, values[$0.rawValue]) }
    }

    /// Adds another set's values (and applicability) into this one.
    public mutating func merge(_ other: CounterSet) {
        for i in values.indices {
            values[i] &+= other.values[i]
            applicable[i] = applicable[i] || other.applicable[i]
        }
    }
}
