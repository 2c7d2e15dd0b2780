import MemVirtCore
import Testing

@testable import MemVirtModel

/// Regression tests of model bugs found in review (issue 16, item 6): each failed before its fix.
@Suite("Model regressions: TLB refill, PCID reuse, shadow rmap of large sptes, recycling")
struct ModelBugTests {
    @Test("An L2 TLB hit refills L1 with the entry's global bit: another PCID then hits in L1")
    func l2RefillKeepsGlobal() throws {
        // One L1 4K way, so a second page evicts the first from L1 but not from L2.
        let config = TLBConfig(
            l1d: [TLBArrayConfig(sets: 1, ways: 1, sizes: [.size4K])], l1i: [],
            l2: [TLBArrayConfig(sets: 16, ways: 4, sizes: [.size4K])], pml4eCache: 0, pdpteCache: 0, pdeCache: 0, pcid: true)
        let tlb = TLBHierarchy(config: config)
        let global = TLBEntry(base: 0x1000_0000, size: .size4K, writable: true, user: false, dirty: true, noExecute: false)
        tlb.insert(0xffff_8000_0000_0000, pcid: 1, entry: global, global: true, fetch: false)
        tlb.insert(0x40_0000, pcid: 1, entry: TLBEntry(base: 0x2000_0000, size: .size4K, writable: true, user: true, dirty: true, noExecute: false), global: false, fetch: false)
        // The global page is now only in L2: the look-up from PCID 1 refills L1.
        let first = try #require(tlb.lookup(0xffff_8000_0000_0000, pcid: 1, fetch: false))
        #expect(first.1 == .l2)
        // A global translation matches every PCID: from PCID 2 it must hit the refilled L1 entry.
        let second = try #require(tlb.lookup(0xffff_8000_0000_0000, pcid: 2, fetch: false))
        #expect(second.1 == .l1, "the L1 refill lost the global bit")
        #expect(second.0.base == 0x1000_0000)
    }

    @Test("PCIDs wrap at 4095; a reused PCID does not hit the dead space's TLB entries")
    func pcidReuseFlushes() throws {
        var config = ModelConfig()
        config.paging = .native
        try ModelEngine.withMachine(config: config, capacity: 1 << 30, MachineBody { m in
            let kernel = m.kernel
            let va: UInt64 = 0x4000_0000
            let area = VirtualMemoryArea(start: va, end: va + 4096, pageSize: .size4K, writable: true)
            // The first space maps `va` and caches it in the TLB, then exits (no flush: the
            // hardware keeps entries of a PCID until it is flushed).
            let a = try kernel.createAddressSpace()
            try kernel.map(area, in: a)
            m.switchAddressSpace(to: a)
            try m.step(Access(address: GuestVirtualAddress(va), kind: .write))
            #expect(m.cpu.tlb.lookup(va, pcid: a.pcid, fetch: false) != nil)
            let home = m.space === a ? try kernel.createAddressSpace() : m.space
            m.switchAddressSpace(to: home)
            kernel.exit(a)
            // Every other PCID once, then the old one again.
            var reused: AddressSpace?
            for _ in 0..<4095 {
                let s = try kernel.createAddressSpace()
                if s.pcid == a.pcid { reused = s; break }
                kernel.exit(s)
            }
            let b = try #require(reused, "PCID \(a.pcid) never handed out again")
            try kernel.map(area, in: b)
            m.switchAddressSpace(to: b)
            #expect(m.cpu.tlb.lookup(va, pcid: b.pcid, fetch: false) == nil, "stale translation of the dead space under a reused PCID")
            // Its first access faults (a fresh page of its own), reading zero.
            let faults = m.finish()[.guestPageFaults]
            try m.step(Access(address: GuestVirtualAddress(va), kind: .read))
            #expect(m.finish()[.guestPageFaults] == faults + 1)
        })
    }

    @Test("Live address spaces keep distinct PCIDs across the wrap")
    func pcidsOfLiveSpacesAreDistinct() throws {
        let kernel = SimulatedGuestKernel(memory: NativeGuestMemory(try PhysicalMemory(capacity: 1 << 30, name: "t")), capacity: 1 << 30, paging: PagingConfig())
        let keep = try kernel.createAddressSpace()
        for _ in 0..<5000 { kernel.exit(try kernel.createAddressSpace()) }
        let live = try (0..<10).map { _ in try kernel.createAddressSpace() }
        #expect(Set(live.map(\.pcid) + [keep.pcid]).count == 11)
    }

    @Test("Write-protecting a gfn inside a 2 MiB spte write-protects that spte (rmap of every level)")
    func rmapLargeSpte() throws {
        var config = ModelConfig()
        config.paging = .shadow
        config.pageSize = .size2M
        config.hostPageSize = .size2M
        try ModelEngine.withMachine(config: config, capacity: 1 << 30, MachineBody { m in
            let shadow = m.mode as! ShadowPaging
            let va: UInt64 = 0x4000_0000
            try m.kernel.map(VirtualMemoryArea(start: va, end: va + (2 << 20), pageSize: .size2M, writable: true), in: m.space)
            try m.step(Access(address: GuestVirtualAddress(va), kind: .write))
            let big = shadow.shadowLeaves(levels: 4).filter { $0.size == .size2M }
            #expect(big.count == 1 && big[0].writable)
            let leaf = try #require(m.kernel.lookupLeaf(va, space: m.space))
            // A gfn in the middle of the 2 MiB page, not its first.
            let inside = (leaf.entry.pageBase(.size2M) >> 12) + 5
            shadow.writeProtect(gfn: inside, cpu: m.cpu)
            let after = shadow.shadowLeaves(levels: 4).filter { $0.size == .size2M }
            #expect(after.count == 1 && !after[0].writable, "the 2 MiB spte holding gfn \(inside) stayed writable")
        })
    }

    @Test("Recycling takes the least recently used non-root page without scanning every shadow page")
    func recycleIsLRUAndCheap() throws {
        var config = ModelConfig()
        config.paging = .shadow
        config.shadow.maxShadowPages = 64
        let spec = WorkloadSpec(pattern: .uniform, footprint: .mib(512), accesses: 20_000, writeRatio: 0.2, seed: 4)
        try ModelEngine.withMachine(config: config, capacity: 2 << 30, MachineBody { m in
            let shadow = m.mode as! ShadowPaging
            try m.kernel.map(VirtualMemoryArea(start: spec.base.rawValue, end: spec.base.rawValue + spec.footprint.rawValue, pageSize: .size4K, writable: true), in: m.space)
            var g = try AccessGenerator(spec: spec)
            var checked = 0
            for _ in 0..<spec.accesses {
                // The reference victim: the live non-root page with the oldest use, by a scan.
                let live = shadow.pages.indices.filter { shadow.pages[$0].live && !shadow.pages[$0].isRoot }
                let expected = live.min { shadow.pages[$0].lastUse < shadow.pages[$1].lastUse }
                var victim = shadow.oldest
                while victim >= 0 && shadow.pages[victim].isRoot { victim = shadow.pages[victim].newer }
                if let e = expected {
                    #expect(victim == e)
                    checked += 1
                    if victim != e { return }
                }
                try m.step(g.next())
            }
            let c = m.finish()
            #expect(c[.mmuRecycled] > 100)
            #expect(checked > 1000)
            // Each recycle steps over roots only.
            #expect(shadow.recycleSteps <= c[.mmuRecycled] * UInt64(1 + shadow.cachedRoots.count + 1))
        })
    }
}
