import MemVirtCore
import Testing

@testable import MemVirtModel

/// Distinct pages of `size` the stream touches: an oracle independent of the machine.
func distinctPages(_ spec: WorkloadSpec, size: PageSize) throws -> Int {
    var pages = Set<UInt64>()
    for t in 0..<spec.threads {
        var g = try AccessGenerator(spec: spec, thread: t)
        for _ in 0..<spec.accesses { pages.insert(g.next().address.rawValue >> UInt64(size.shift)) }
    }
    return pages.count
}

@Suite("Native paging runs")
struct NativeRunTests {
    @Test("Demand faults equal distinct pages touched; at most 4 refs per TLB miss",
          arguments: [WorkloadSpec.Pattern.uniform, .sequential, .zipf(theta: 0.99), .chase, .gups, .strided(stride: 12288)])
    func demandFaults(_ pattern: WorkloadSpec.Pattern) throws {
        let spec = WorkloadSpec(pattern: pattern, footprint: .mib(8), accesses: 60_000, writeRatio: 0.3, seed: 7)
        let r = try ModelEngine.run(spec: spec, config: ModelConfig())
        let c = r.counters
        #expect(Int(c[.guestPageFaults]) == (try distinctPages(spec, size: .size4K)))
        #expect(c[.accesses] == 60_000)
        // One translation per access; a GUPS read-modify-write is a load and a store.
        let translations = pattern == .gups ? 2 * c[.accesses] : c[.accesses]
        #expect(c[.tlbHits] + c[.tlbMisses] == translations)
        #expect(c[.walks] == c[.tlbMisses])
        #expect(c[.walkMemoryRefs] <= 4 * c[.tlbMisses])
        #expect(c[.walkMemoryRefs] >= c[.tlbMisses], "every walk reads at least the leaf")
    }

    @Test("Large pages: faults equal distinct 2M pages", arguments: [PageSize.size2M, .size1G])
    func largePageFaults(_ size: PageSize) throws {
        let spec = WorkloadSpec(pattern: .uniform, footprint: .mib(size == .size1G ? 1024 : 64), accesses: 20_000, seed: 3)
        var cfg = ModelConfig()
        cfg.pageSize = size
        let r = try ModelEngine.run(spec: spec, config: cfg)
        #expect(Int(r.counters[.guestPageFaults]) == (try distinctPages(spec, size: size)))
        #expect(r.counters[.walkMemoryRefs] <= (size == .size2M ? 3 : 2) * r.counters[.tlbMisses])
    }

    @Test("Without TLBs every access walks the full 4 levels (after its page is mapped)")
    func noTLB() throws {
        let spec = WorkloadSpec(pattern: .uniform, footprint: .mib(4), accesses: 10_000, seed: 5)
        var cfg = ModelConfig()
        cfg.tlb = .none
        let r = try ModelEngine.run(spec: spec, config: cfg)
        #expect(r.counters[.tlbMisses] == 10_000)
        #expect(r.counters[.walkMemoryRefs] == 40_000)
    }

    @Test("The data read back is the same in every TLB configuration (the TLB is invisible to the guest)")
    func tlbInvisible() throws {
        let spec = WorkloadSpec(pattern: .uniform, footprint: .mib(4), accesses: 30_000, writeRatio: 0.5, seed: 9)
        var a = ModelConfig()
        var b = ModelConfig()
        b.tlb = .none
        a.tlb = .goldenCove
        let ra = try ModelEngine.run(spec: spec, config: a)
        let rb = try ModelEngine.run(spec: spec, config: b)
        #expect(ra.extra.first { $0.0 == "checksum" }!.1 == rb.extra.first { $0.0 == "checksum" }!.1)
    }

    @Test("The acceptance run: 64MiB uniform, 2M accesses, seed 1 gives 16,384 faults")
    func acceptance() throws {
        let spec = WorkloadSpec(pattern: .uniform, footprint: .mib(64), accesses: 2_000_000, seed: 1)
        let r = try ModelEngine.run(spec: spec, config: ModelConfig())
        #expect(r.counters[.guestPageFaults] == 16_384)
        #expect(r.counters[.walkMemoryRefs] <= 4 * r.counters[.tlbMisses])
        #expect((r.cycles ?? 0) > 0)
    }
}
