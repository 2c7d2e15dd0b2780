import MemVirtCore
import Testing

@testable import MemVirtModel

/// The run's "max_walk_refs" (the largest number of references of one completed walk).
func maxWalkRefs(_ r: RunResult) -> Int? {
    guard case .int(let v)? = r.extra.first(where: { $0.0 == "max_walk_refs" })?.1 else { return nil }
    return Int(v)
}

@Suite("Nested paging: 2D walks, EPT violations and misconfigurations, nested TLB and EPT walk caches")
struct NestedPagingTests {
    @Test("With every cache off, each TLB miss is a full 2D walk of (g+1)(h+1)-1 references",
          arguments: [(4, 4), (4, 5), (5, 4), (5, 5)])
    func twoDimensionalClosedForm(_ levels: (Int, Int)) throws {
        let (g, h) = levels
        var c = ModelConfig()
        c.paging = .nested
        c.tlb = .none
        c.prefault = true
        c.pagingConfig.levels = g
        c.hostLevels = h
        let r = try ModelEngine.run(spec: WorkloadSpec(pattern: .uniform, footprint: .mib(4), accesses: 3_000, seed: 2), config: c)
        let closedForm = (g + 1) * (h + 1) - 1
        #expect(maxWalkRefs(r) == closedForm)
        #expect(r.counters[.tlbMisses] == 3_000)
        #expect(r.counters[.walkMemoryRefs] == UInt64(closedForm) * 3_000, "every walk makes exactly the closed form's references")
    }

    @Test("A first touch of each guest frame is one EPT violation, charged an exit; none once backed")
    func eptViolations() throws {
        var c = ModelConfig()
        c.paging = .nested
        let spec = WorkloadSpec(pattern: .uniform, footprint: .mib(8), accesses: 40_000, writeRatio: 0.3, seed: 7)
        let r = try ModelEngine.run(spec: spec, config: c)
        let dataPages = UInt64(try distinctPages(spec, size: .size4K))
        // Guest frames touched: every data page and every guest page-table page.
        #expect(r.counters[.eptViolations] == dataPages + r.counters[.guestPageTablePages])
        #expect(r.counters[.pfFixed] == r.counters[.eptViolations])
        #expect(r.counters[.exits] == r.counters[.eptViolations])
        c.prefault = true
        let warm = try ModelEngine.run(spec: spec, config: c)
        #expect(warm.counters[.eptViolations] == 0)
        #expect(warm.counters[.exits] == 0)
    }

    @Test("MMIO gpa: the EPT entry is misconfigured, every access exits and is never cached")
    func misconfigurationIsMMIO() throws {
        let cpu = ModelCPU(tlb: .goldenCove, paging: PagingConfig(), costs: .bareMetal)
        let nested = try NestedPaging(cpu: cpu, guestCapacity: 1 << 30)
        let mmio: UInt64 = 0x3F0_0000
        nested.addMMIO(mmio..<(mmio + 4096))
        try nested.handleViolation(mmio, write: false)
        let ea = try #require(nested.leafAddress(gfn: mmio >> 12))
        #expect(EPTEntry(rawValue: nested.host.read64(ea)).isMisconfigured(level: 1, physicalAddressBits: cpu.paging.physicalAddressBits))
        for _ in 0..<3 {
            guard case .misconfiguration = nested.translate(mmio + 8, write: false) else {
                Issue.record("MMIO gpa translated")
                return
            }
        }
        #expect(nested.nestedTLBHits == 0)
        // Through the machine: a guest page mapped at the MMIO gpa exits as MMIO.
        let kernel = SimulatedGuestKernel(memory: nested.guestMemory, capacity: 1 << 30, paging: cpu.paging)
        let space = try kernel.createAddressSpace()
        let m = Machine(mode: nested, cpu: cpu, kernel: kernel, space: space)
        m.switchAddressSpace(to: space)
        let va: UInt64 = 0x4000_0000
        try kernel.map(VirtualMemoryArea(start: va, end: va + 4096, pageSize: .size4K, writable: true), in: space)
        try m.step(Access(address: GuestVirtualAddress(va), kind: .read))
        let leaf = try #require(kernel.lookupLeaf(va, space: space))
        nested.guestMemory.write64(leaf.entryAddress, PageTableEntry(frameAddress: mmio, flags: [.present, .writable, .user, .accessed]).rawValue)
        cpu.tlb.flushAll(keepGlobal: false)
        #expect(throws: GuestError.self) { try m.step(Access(address: GuestVirtualAddress(va), kind: .read)) }
        let counters = m.finish()
        #expect(counters[.eptMisconfigurations] == 1)
        #expect(counters[.mmioExits] == 1)
    }

    @Test("Nested TLB and EPT walk caches: references of a cold 2D walk, 4 with the nested TLB, 9 with only the EPT PDE cache")
    func nestedTLBAndWalkCaches() throws {
        var c = ModelConfig()
        c.paging = .nested
        try ModelEngine.withMachine(config: c, capacity: 1 << 30, MachineBody { m in
            let nested = m.mode as! NestedPaging
            let va: UInt64 = 0x4000_0000
            try m.kernel.map(VirtualMemoryArea(start: va, end: va + 4096, pageSize: .size4K, writable: true), in: m.space)
            try m.step(Access(address: GuestVirtualAddress(va), kind: .write))
            func refs(dropNestedTLB: Bool, dropEPTCaches: Bool) throws -> UInt64 {
                m.cpu.tlb.flushAll(keepGlobal: false)
                m.cpu.walkCaches.flushAll()
                if dropNestedTLB { nested.cur.nestedTLB.flushAll() }
                if dropEPTCaches { nested.cur.eptPDE.flushAll(); nested.cur.eptPDPTE.flushAll(); nested.cur.eptPML4E.flushAll() }
                let before = m.finish()[.walkMemoryRefs]
                try m.step(Access(address: GuestVirtualAddress(va), kind: .read))
                return m.finish()[.walkMemoryRefs] - before
            }
            // The 2D walk's five gpas (4 guest tables, the data page), in walk order; with the
            // EPT caches empty, each costs 4 EPT references, or fewer where an earlier one of the
            // same walk left its 2 MiB (1), 1 GiB (2) or 512 GiB (3) region in the caches.
            var gpas: [UInt64] = []
            var table = m.space.root
            for level in stride(from: 4, through: 1, by: -1) {
                gpas.append(table)
                let e = PageTableEntry(rawValue: m.kernel.memory.read64(table + UInt64(GuestVirtualAddress(va).tableIndex(level: level)) * 8))
                table = e.address
            }
            gpas.append(table)
            var seen21 = Set<UInt64>(), seen30 = Set<UInt64>(), seen39 = Set<UInt64>()
            var eptRefs: UInt64 = 0
            for g in gpas {
                eptRefs += seen21.contains(g >> 21) ? 1 : seen30.contains(g >> 30) ? 2 : seen39.contains(g >> 39) ? 3 : 4
                seen21.insert(g >> 21); seen30.insert(g >> 30); seen39.insert(g >> 39)
            }
            let cold = try refs(dropNestedTLB: true, dropEPTCaches: true)
            #expect(cold == 4 + eptRefs)
            let hits = m.finish()[.nestedTLBHits]
            // 4 guest entries, each guest table's gpa and the data gpa from the nested TLB.
            let warm = try refs(dropNestedTLB: false, dropEPTCaches: false)
            #expect(warm == 4)
            #expect(m.finish()[.nestedTLBHits] == hits + 5)
            // Nested TLB gone, EPT PDE cache kept: one EPT reference (the EPT PTE) per gpa.
            let cacheHits = m.finish()[.nestedWalkCacheHits]
            let pde = try refs(dropNestedTLB: true, dropEPTCaches: false)
            #expect(pde == 4 + 5)
            #expect(m.finish()[.nestedWalkCacheHits] == cacheHits + 5)
        })
    }

    @Test("Host memory exhausted under nested paging: a run error naming the limit, no guest fault, no crash")
    func hostExhaustion() throws {
        let cpu = ModelCPU(tlb: .goldenCove, paging: PagingConfig(), costs: .bareMetal)
        // A limit of 4 pages and no room in swap: the guest's page tables alone exhaust it.
        let host = try HostMemory(capacity: 2 << 30, limit: .kib(16), swapDevice: .nvme, swapSlots: 1)
        let nested = try NestedPaging(cpu: cpu, guestCapacity: 1 << 30, hostMemory: host)
        let kernel = SimulatedGuestKernel(memory: nested.guestMemory, capacity: 1 << 30, paging: cpu.paging)
        let space = try kernel.createAddressSpace()
        let m = Machine(mode: nested, cpu: cpu, kernel: kernel, space: space)
        m.switchAddressSpace(to: space)
        let va: UInt64 = 0x4000_0000
        try kernel.map(VirtualMemoryArea(start: va, end: va + (16 << 20), pageSize: .size4K, writable: true), in: space)
        var message = ""
        do {
            for p in 0..<UInt64(4096) { try m.step(Access(address: GuestVirtualAddress(va + p * 4096), kind: .write)) }
        } catch {
            message = "\(error)"
        }
        #expect(message.contains("host memory exhausted"), "got: \(message)")
        #expect(message.contains("a limit of 16KiB"), "the limit is not named: \(message)")
        #expect(m.finish()[.guestPageFaults] <= 1, "exhaustion was turned into guest faults")
    }
}
