import MemVirtCore
import Testing

@testable import MemVirtModel

/// The reference two-stage translation: the guest's tables (a software walk) then the
/// hypervisor's guest-physical to host-physical map. Independent of the shadow tables.
func referenceHost(_ va: UInt64, kernel: SimulatedGuestKernel, space: AddressSpace, shadow: ShadowPaging) -> (host: UInt64, entry: PageTableEntry)? {
    guard let leaf = kernel.lookupLeaf(va, space: space) else { return nil }
    let gpa = leaf.entry.pageBase(leaf.size) | (va & leaf.size.offsetMask)
    guard let page = shadow.backedPage(gpa >> 12) else { return nil }
    return (page | (gpa & 0xfff), leaf.entry)
}

@Suite("Shadow paging against a reference two-stage walk")
struct ShadowPagingTests {
    /// Runs a randomized fork/exec/exit churn under shadow paging, checking every access's host
    /// address and, at every CR3 write, every shadow leaf entry.
    @Test("Every access, and every synced shadow entry at INVLPG and CR3 writes, agree with the reference walk",
          arguments: [(1 as UInt64, true, true), (2, true, false), (3, false, true), (4, true, true), (5, true, false)])
    func randomizedAgreement(_ args: (UInt64, Bool, Bool)) throws {
        let (seed, unsync, pcid) = args
        var config = ModelConfig()
        config.paging = .shadow
        config.shadow.unsync = unsync
        config.tlb.pcid = pcid
        var rng = SplitMix64(seed: seed)
        let spec = ProcessChurnSpec(
            iterations: 6 + Int(rng.bounded(6)), parentPages: 40 + Int(rng.bounded(200)), childTouches: Int(rng.bounded(150)),
            childWriteRatio: rng.unitDouble(), execPages: Int(rng.bounded(40)), parentWrites: Int(rng.bounded(40)), seed: seed)
        var accessMismatches = 0
        var entryMismatches = 0
        var checkedEntries = 0
        var syncPoints = 0
        try ModelEngine.withMachine(config: config, capacity: 1 << 30, MachineBody { m in
            let shadow = m.mode as! ShadowPaging
            m.observer = { va, pa in
                guard let ref = referenceHost(va, kernel: m.kernel, space: m.space, shadow: shadow) else { accessMismatches += 1; return }
                if ref.host & ~7 != pa { accessMismatches += 1 }
            }
            m.onSyncPoint = { va in
                syncPoints += 1
                // After a CR3 write without PCIDs nothing reachable is unsync (kvm_mmu_sync_roots);
                // with the no-flush bit KVM syncs nothing, but the guest flushed what it changed,
                // so even unsync entries agree. After an INVLPG other unsync pages may lag.
                for leaf in shadow.shadowLeaves(levels: m.cpu.paging.levels) where va == nil || !leaf.unsync {
                    if va == nil && !pcid { #expect(!leaf.unsync) }
                    checkedEntries += 1
                    guard let ref = referenceHost(leaf.va, kernel: m.kernel, space: m.space, shadow: shadow) else { entryMismatches += 1; continue }
                    let e = ref.entry
                    if ref.host & ~leaf.size.offsetMask != leaf.hostPage || (leaf.writable && !e.isWritable) || (leaf.user && !e.isUser)
                        || (e.isNoExecute && !leaf.noExecute) { entryMismatches += 1 }
                }
            }
            try m.runProcessChurn(spec)
            _ = m.finish()
        })
        #expect(accessMismatches == 0)
        #expect(entryMismatches == 0)
        #expect(checkedEntries > 0 && syncPoints > spec.iterations * 2)
    }

    @Test("The guest sees the same thing natively, under shadow and under nested paging",
          arguments: [PagingKind.shadow, .nested])
    func guestVisibleIdentity(_ kind: PagingKind) throws {
        let spec = ProcessChurnSpec(iterations: 8, parentPages: 120, childTouches: 90, childWriteRatio: 0.6, execPages: 20, parentWrites: 25, seed: 11)
        let native = try ModelEngine.runProcessChurn(spec, config: ModelConfig())
        var c = ModelConfig()
        c.paging = kind
        let virt = try ModelEngine.runProcessChurn(spec, config: c)
        #expect(virt.extra.first { $0.0 == "checksum" }!.1 == native.extra.first { $0.0 == "checksum" }!.1)
        for counter in [Counter.accesses, .guestPageFaults, .guestDemandZeroFaults, .guestCopyOnWriteFaults] {
            #expect(virt.counters[counter] == native.counters[counter], "\(counter.name)")
        }
        for p in [WorkloadSpec.Pattern.uniform, .zipf(theta: 0.9), .chase] {
            let w = WorkloadSpec(pattern: p, footprint: .mib(8), accesses: 40_000, writeRatio: 0.4, seed: 5)
            let a = try ModelEngine.run(spec: w, config: ModelConfig())
            let b = try ModelEngine.run(spec: w, config: c)
            #expect(a.extra.first { $0.0 == "checksum" }!.1 == b.extra.first { $0.0 == "checksum" }!.1)
            #expect(a.counters[.guestPageFaults] == b.counters[.guestPageFaults])
            #expect(b.counters[.pfFixed] >= b.counters[.guestPageFaults], "with 4K host pages every guest fault is followed by a hidden fault")
        }
    }

    @Test("Shadow counters mean what KVM's mean: pf_guest = injected guest faults; fork and exit make emulated PTE writes")
    func kvmMeanings() throws {
        var c = ModelConfig()
        c.paging = .shadow
        c.shadow.unsync = false
        let r = try ModelEngine.runProcessChurn(ProcessChurnSpec(iterations: 5, parentPages: 64, childTouches: 50, execPages: 10, seed: 2), config: c)
        #expect(r.counters[.pfGuest] == r.counters[.guestPageFaults])
        #expect(r.counters[.mmuPteWrite] > 0)
        #expect(r.counters[.pfTaken] >= r.counters[.pfFixed] + r.counters[.pfGuest])
        #expect(r.counters[.mmuUnsync] == 0)
        var u = c
        u.shadow.unsync = true
        let ru = try ModelEngine.runProcessChurn(ProcessChurnSpec(iterations: 5, parentPages: 64, childTouches: 50, execPages: 10, seed: 2), config: u)
        #expect(ru.counters[.mmuPteWrite] < r.counters[.mmuPteWrite], "unsync leaf tables take writes without emulation")
        #expect(ru.counters[.shadowResyncs] > 0)
    }

    @Test("A shadow-page limit recycles pages and the run stays correct")
    func recycling() throws {
        var c = ModelConfig()
        c.paging = .shadow
        c.shadow.maxShadowPages = 8
        let w = WorkloadSpec(pattern: .uniform, footprint: .mib(64), accesses: 30_000, writeRatio: 0.3, seed: 3)
        let r = try ModelEngine.run(spec: w, config: c)
        let n = try ModelEngine.run(spec: w, config: ModelConfig())
        #expect(r.counters[.mmuRecycled] > 0)
        #expect(r.counters[.mmuShadowZapped] >= r.counters[.mmuRecycled])
        #expect(r.extra.first { $0.0 == "checksum" }!.1 == n.extra.first { $0.0 == "checksum" }!.1)
    }

    @Test("Xen-style drop of all shadows: everything is re-shadowed through faults, data intact")
    func dropAll() throws {
        var c = ModelConfig()
        c.paging = .shadow
        try ModelEngine.withMachine(config: c, capacity: 1 << 30, MachineBody { m in
            let base = WorkloadSpec.defaultBase.rawValue
            try m.kernel.map(VirtualMemoryArea(start: base, end: base + 64 * 4096, pageSize: .size4K, writable: true), in: m.space)
            for p in 0..<64 { try m.step(Access(address: GuestVirtualAddress(base + UInt64(p) * 4096), kind: .write)) }
            let shadow = m.mode as! ShadowPaging
            let fixedBefore = m.cpu.counters[.pfFixed]
            shadow.dropAllShadows(cpu: m.cpu)
            #expect(shadow.shadowLeaves(levels: 4).isEmpty)
            for p in 0..<64 { try m.step(Access(address: GuestVirtualAddress(base + UInt64(p) * 4096), kind: .read)) }
            #expect(m.cpu.counters[.pfFixed] - fixedBefore == 64, "one hidden fault per page to re-shadow")
            #expect(shadow.shadowLeaves(levels: 4).count == 64)
        })
    }
}
