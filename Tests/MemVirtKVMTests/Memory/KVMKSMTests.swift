import MemVirtCore
import Testing
#if canImport(Glibc)
import Glibc
#endif
@testable import MemVirtKVM

/// Why the KSM tests cannot run here ("" when they can).
let ksmReason = KSMPair.unavailableReason() ?? ""

/// The oracle's rules on memory the test writes itself (no KVM, no ksmd needed).
@Suite("KSM oracle")
struct KSMOracleTests {
    @Test("equal pages group by content; max_page_sharing splits big groups; a lone leftover never merges")
    func rules() throws {
        // 600 zero pages, 257 pages of content A, 2 of B, 5 unique pages.
        let pages = 600 + 257 + 2 + 5
        let r = try GuestMemoryRegion(guestPhysical: GuestPhysicalAddress(rawValue: 0), size: UInt64(pages) * 4096)
        func fill(_ page: Int, _ id: UInt64) throws {
            let words = (0..<512).map { id == 0 ? 0 : (id &* 0x9E37_79B9_7F4A_7C15) ^ UInt64($0) }
            try r.write(array: words, at: GuestPhysicalAddress(rawValue: UInt64(page) * 4096))
        }
        var p = 0
        for _ in 0..<600 { try fill(p, 0); p += 1 }
        for _ in 0..<257 { try fill(p, 1); p += 1 }
        for _ in 0..<2 { try fill(p, 2); p += 1 }
        for i in 0..<5 { try fill(p, 100 + UInt64(i)); p += 1 }
        let o = try KSMOracle.compute(regions: [r], maxPageSharing: 256, useZeroPages: false)
        #expect(o.pages == UInt64(pages))
        #expect(o.distinctContents == 1 + 1 + 1 + 5)
        #expect(o.zeroPages == 600)
        // Zero: 256 + 256 + 88 -> 3 KSM pages, 597 sharing. A: 256 + a lone one -> 1, 255. B: 1, 1.
        #expect(o.expectedShared == 3 + 1 + 1)
        #expect(o.expectedSharing == 597 + 255 + 1)
        let z = try KSMOracle.compute(regions: [r], maxPageSharing: 256, useZeroPages: true)
        #expect(z.expectedZeroPages == 600)
        #expect(z.expectedShared == 2 && z.expectedSharing == 256)
    }
}

/// The host's real KSM on two small VMs. Serialized: ksmd and its counters are host-wide, so
/// the checks use this process's ksm_merging_pages (only these VMs are mergeable here) and
/// per-vCPU KVM stats; sessions of all processes take turns on a lock.
@Suite("KVM engine: KSM", .serialized, .enabled(if: ksmReason.isEmpty, Comment(rawValue: ksmReason)))
struct KVMKSMTests {
    @Test("a session restores ksmd's settings, also when the body throws")
    func restoresSettings() throws {
        let before = try KSM.settings()
        var t = KSMTuning()
        t.pagesToScan = before.pagesToScan + 17
        t.sleepMillisecs = 3
        #expect(throws: KVMError.self) {
            try KSM.withSession(t) { (s) throws(KVMError) -> Void in
                let now = try KSM.settings()
                #expect(now.run == 1 && now.pagesToScan == before.pagesToScan + 17 && now.sleepMillisecs == 3)
                #expect(s.saved == before)
                throw KVMError.invalid("the body failed")
            }
        }
        #expect(try KSM.settings() == before)
    }

    @Test("two 16 MiB VMs with the same content merge to the oracle's count; writes break exactly those pages")
    func mergeAndBreak() throws {
        let before = try KSM.settings()
        var o = KSMPairOptions()
        o.pagesPerVM = 4096
        o.writePages = 256
        o.timeoutSeconds = 15
        let r = try KSMPair.run(o)
        #expect(try KSM.settings() == before)
        let expected = Int64(r.oracle.expectedMerging + r.oracle.expectedZeroPages)
        print("ksm: oracle \(r.oracle.json.rendered()); merged \(r.mergingPages.map(String.init) ?? "n/a") in \(r.mergeFullScans) full scans, \(r.mergeSeconds) s; host shared/sharing +\(r.pagesSharedGained)/+\(r.pagesSharingGained)")
        print("ksm: writes unmerged \(r.unmergedWrites.json.rendered()), merged \(r.mergedWrites.json.rendered()); merging drop \(r.mergingDropAfterWrites.map(String.init) ?? "n/a")")
        // The content has image pages in both VMs, duplicates and zero pages: lots to merge.
        #expect(expected > 4096)
        #expect(r.mergeReachedExpected)
        if let m = r.mergingPages {
            #expect(m == expected)
        } else {
            // No per-process counter on this kernel: the host's, as deltas (host-wide, so within 1%).
            #expect(abs(r.pagesSharedGained + r.pagesSharingGained - expected) <= expected / 100)
        }
        // Both VMs map the same frames for image pages.
        if let (same, n) = r.sameFrameSampled { #expect(same == n) }
        // Writes to merged pages: each one a KVM fault and a host copy-on-write fault.
        let w = r.mergedWrites
        if let k = w.ksmBefore { #expect(k == o.writePages) }
        if let k = w.ksmAfter { #expect(k == 0) }
        #expect(w.pfFixed >= UInt64(o.writePages) && w.pfFixed <= UInt64(o.writePages) + 16)
        #expect(w.minorFaults >= UInt64(o.writePages))  // process-wide: other tests' threads add theirs
        // Unmerged resident pages: no exit.
        #expect(r.unmergedWrites.pfFixed < 16)
        #expect(r.unmergedWrites.nanosecondsPerPage * 10 < w.nanosecondsPerPage)
        // ksmd then drops exactly the broken pages from this process's merged pages.
        if let d = r.mergingDropAfterWrites { #expect(d == Int64(o.writePages)) }
    }
}
