import MemVirtCore
import Testing

@testable import MemVirtModel

/// The shadow MMU with guest RAM behind `ShadowResidentPager`, against closed forms.
@Suite("Resident limit under shadow paging (the userfaultfd pager's mechanism)")
struct ShadowResidentPagerTests {
    static let base: UInt64 = 0x4000_0000

    /// A shadow-paged machine whose `pages` data pages are mapped before the run (P|W|U, A/D
    /// clear, data frames untouched) and put under a pager of `limit` pages (nil: no pager).
    /// `body` gets the machine and the pager.
    func withPagedMachine<R>(pages: Int, limit: Int?, _ body: @escaping (Machine<ShadowPaging>, ShadowResidentPager?) throws -> R) throws -> R {
        var config = ModelConfig()
        config.paging = .shadow
        config.costs = .pvmShadow
        let capacity: UInt64 = 1 << 30
        return try ModelEngine.withMachine(config: config, capacity: capacity, MachineBody { r in
            let m = r as! Machine<ShadowPaging>
            let area = VirtualMemoryArea(start: Self.base, end: Self.base + UInt64(pages) * 4096, pageSize: .size4K, writable: true)
            try m.kernel.map(area, in: m.space)
            var gfns: [UInt64] = []
            for p in 0..<UInt64(pages) {
                guard let frame = m.kernel.frames.allocate(.size4K) else { throw InputError("guest memory exhausted") }
                #expect(m.kernel.installLeaf(Self.base + p * 4096, frame: frame, size: .size4K, flags: [.present, .writable, .user], space: m.space))
                gfns.append(frame >> 12)
            }
            var pager: ShadowResidentPager? = nil
            if let limit {
                let p = try ShadowResidentPager(guestFrames: Int(capacity >> 12), limitPages: limit, costs: HostCosts())
                for g in gfns { p.manage(gfn: g) }
                m.mode.attach(pager: p)
                pager = p
            }
            m.mode.settle(cpu: m.cpu)
            m.resetStatistics()
            return try body(m, pager)
        })
    }

    @Test("N pages written round-robin behind a FIFO limit R < N: N first faults, (passes-1)N re-faults, every fault after the set is full evicts and retries once",
          arguments: [(64, 16, 4), (33, 32, 3), (100, 1, 2)])
    func roundRobin(_ args: (Int, Int, Int)) throws {
        let (n, r, passes) = args
        try withPagedMachine(pages: n, limit: r) { m, pager in
            for _ in 0..<passes {
                for p in 0..<UInt64(n) { try m.step(Access(address: GuestVirtualAddress(Self.base + p * 4096), kind: .write)) }
            }
            let c = m.finish()
            let s = try #require(pager).stats
            let faults = UInt64(passes * n)
            #expect(s.zeroFills == UInt64(n))
            #expect(s.storeReads == UInt64((passes - 1) * n))
            #expect(s.served == faults)
            #expect(s.evictions == faults - UInt64(r))
            #expect(s.staleRetries == faults - UInt64(r))
            #expect(s.peakResident == r)
            // One shadow fault fixed per page fault; the evicting ones were taken twice.
            #expect(c[.pfFixed] == faults)
            #expect(c[.pfTaken] == faults + (faults - UInt64(r)))
            // Every evicted page was mapped: each eviction zapped a present spte.
            #expect(s.zappedMappings == s.evictions)
        }
    }

    @Test("A limit at or above the footprint: only first touches, no eviction, no retry")
    func noPressure() throws {
        try withPagedMachine(pages: 50, limit: 50) { m, pager in
            for _ in 0..<3 {
                for p in 0..<UInt64(50) { try m.step(Access(address: GuestVirtualAddress(Self.base + p * 4096), kind: .write)) }
            }
            let c = m.finish()
            let s = try #require(pager).stats
            #expect(s.served == 50 && s.zeroFills == 50 && s.evictions == 0 && s.storeReads == 0)
            #expect(c[.pfFixed] == 50 && c[.pfTaken] == 50)
        }
    }

    @Test("A read then a write of each page (clean gptes): two faults per page per residency, the write one fixed without the pager")
    func readThenWrite() throws {
        // 8 pages, limit 4, two passes of (read p, write p): per page and pass one pager fault
        // (the read) and a second fixed fault for the write on the read-only spte, except in
        // pass 2 where the gpte is dirty already and the re-fault maps it writable.
        try withPagedMachine(pages: 8, limit: 4) { m, pager in
            for _ in 0..<2 {
                for p in 0..<UInt64(8) {
                    try m.step(Access(address: GuestVirtualAddress(Self.base + p * 4096), kind: .read))
                    try m.step(Access(address: GuestVirtualAddress(Self.base + p * 4096), kind: .write))
                }
            }
            let c = m.finish()
            let s = try #require(pager).stats
            #expect(s.served == 16 && s.evictions == 12 && s.storeReads == 8)
            #expect(c[.pfFixed] == 16 + 8)
            #expect(c[.pfTaken] == 16 + 8 + 12)
        }
    }

    @Test("Data survive eviction: a random read/write stream reads the same values with and without the limit")
    func contentPreserved() throws {
        let spec = WorkloadSpec(pattern: .uniform, footprint: .kib(256), accesses: 20_000, writeRatio: 0.5, seed: 5, base: GuestVirtualAddress(Self.base))
        func run(_ limit: Int?) throws -> (UInt64, UInt64) {
            try withPagedMachine(pages: 64, limit: limit) { m, pager in
                var source = GeneratedAccesses(try AccessGenerator(spec: spec, thread: 0), count: spec.accesses)
                try m.run(&source)
                return (m.checksum, pager?.stats.storeReads ?? 0)
            }
        }
        let (free, _) = try run(nil)
        let (limited, refaults) = try run(16)
        #expect(refaults > 1000, "the limit should force many re-faults")
        #expect(limited == free)
    }

    @Test("A limit below one page is refused")
    func badLimit() {
        #expect(throws: InputError.self) { try ShadowResidentPager(guestFrames: 16, limitPages: 0, costs: HostCosts()) }
    }
}
