import MemVirtCore
import Testing

@testable import MemVirtModel

/// KSM under the shadow MMU against closed forms: which frames merge follows from their
/// content alone, and each guest write to a merged frame is one copy-on-write break, a stale
/// fault retried, and one fixed fault.
@Suite("KSM under shadow paging (merge by content, copy-on-write breaks)")
struct ShadowKSMTests {
    static let base: UInt64 = 0x4000_0000

    /// `contents[p]`: the word every 8 bytes of page p hold (0: an empty page). The pages are
    /// mapped before the run (A/D clear), each written once (its host page backed and its spte
    /// writable), filled with its content, then `body` runs.
    func withFilledMachine<R>(_ contents: [UInt64], _ body: @escaping (Machine<ShadowPaging>, [UInt64]) throws -> R) throws -> R {
        var config = ModelConfig()
        config.paging = .shadow
        config.costs = .pvmShadow
        return try ModelEngine.withMachine(config: config, capacity: 1 << 30, MachineBody { r in
            let m = r as! Machine<ShadowPaging>
            let n = UInt64(contents.count)
            try m.kernel.map(VirtualMemoryArea(start: Self.base, end: Self.base + n * 4096, pageSize: .size4K, writable: true), in: m.space)
            var gfns: [UInt64] = []
            for p in 0..<n {
                guard let frame = m.kernel.frames.allocate(.size4K) else { throw InputError("guest memory exhausted") }
                #expect(m.kernel.installLeaf(Self.base + p * 4096, frame: frame, size: .size4K, flags: [.present, .writable, .user], space: m.space))
                gfns.append(frame >> 12)
            }
            for p in 0..<Int(n) {
                try m.step(Access(address: GuestVirtualAddress(Self.base + UInt64(p) * 4096), kind: .write))
                let page = try #require(m.mode.hostPage(gfn: gfns[p]))
                for w in 0..<UInt64(512) { m.mode.host.write64(page + w * 8, contents[p]) }
            }
            m.mode.settle(cpu: m.cpu)
            m.resetStatistics()
            return try body(m, gfns)
        })
    }

    @Test("Equal pages merge, unique ones do not; every write to a merged page is one break: 2 pf_taken, 1 pf_fixed, content kept")
    func mergeAndBreak() throws {
        // Groups: A x4, B x2, empty x2, C and D alone.
        let contents: [UInt64] = [0xA, 0xA, 0xB, 0xC, 0xA, 0, 0xB, 0xA, 0, 0xD]
        try withFilledMachine(contents) { m, gfns in
            let ksm = try ShadowKSM(costs: HostCosts())
            m.mode.attach(ksm: ksm)
            let merged = ksm.merge(gfns: gfns, mode: m.mode, cpu: m.cpu)
            #expect(merged == 8)
            #expect(ksm.stats.pagesShared == 3 && ksm.stats.pagesSharing == 5)
            // Every merged frame had a writable spte from the fill: each was zapped.
            #expect(ksm.stats.zappedMappings == 8)
            for (p, c) in contents.enumerated() {
                let expectMerged = contents.filter { $0 == c }.count >= 2
                #expect(ksm.isMerged(gfn: gfns[p]) == expectMerged, "page \(p)")
            }
            m.resetStatistics()
            for p in 0..<contents.count { try m.step(Access(address: GuestVirtualAddress(Self.base + UInt64(p) * 4096 + 8), kind: .write)) }
            let c = m.finish()
            #expect(ksm.stats.cowBreaks == 8)
            #expect(c[.pfFixed] == 8)
            #expect(c[.pfTaken] == 16)
            #expect(c[.hostMinorFaults] == 8)
            // Each page kept its content beside the word written (the write's value is the
            // model's, at offset 8): word 0 and the last word are the fill.
            for (p, want) in contents.enumerated() {
                let page = try #require(m.mode.hostPage(gfn: gfns[p]))
                #expect(m.mode.host.read64(page) == want && m.mode.host.read64(page + 4088) == want, "page \(p)")
                #expect(!ksm.isMerged(gfn: gfns[p]))
            }
        }
    }

    @Test("max_page_sharing 2: a group of 5 makes two KSM pages and leaves one page alone")
    func pageSharingLimit() throws {
        try withFilledMachine([7, 7, 7, 7, 7]) { m, gfns in
            let ksm = try ShadowKSM(costs: HostCosts(), maxPageSharing: 2)
            m.mode.attach(ksm: ksm)
            #expect(ksm.merge(gfns: gfns, mode: m.mode, cpu: m.cpu) == 4)
            #expect(ksm.stats.pagesShared == 2 && ksm.stats.pagesSharing == 2)
        }
    }

    @Test("A read of a merged page maps it read-only; the write after it breaks, retries and is fixed")
    func readThenWrite() throws {
        try withFilledMachine([5, 5]) { m, gfns in
            let ksm = try ShadowKSM(costs: HostCosts())
            m.mode.attach(ksm: ksm)
            ksm.merge(gfns: gfns, mode: m.mode, cpu: m.cpu)
            m.resetStatistics()
            let va = GuestVirtualAddress(Self.base)
            try m.step(Access(address: va, kind: .read))
            #expect(m.finish()[.pfFixed] == 1 && ksm.stats.cowBreaks == 0)
            try m.step(Access(address: va, kind: .write))
            let c = m.finish()
            #expect(ksm.stats.cowBreaks == 1)
            #expect(c[.pfFixed] == 2 && c[.pfTaken] == 3)
            #expect(ksm.isMerged(gfn: gfns[1]) && !ksm.isMerged(gfn: gfns[0]))
        }
    }
}
