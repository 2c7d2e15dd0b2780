import MemVirtCore
import MemVirtExperiments
import MemVirtKVM
import Testing

let ksmPairReason = KSMPair.unavailableReason() ?? ""

@Suite("KSM pair benchmark: two VMs, ksmd, copy-on-write breaks", .serialized, .enabled(if: ksmPairReason.isEmpty, Comment(rawValue: ksmPairReason)))
struct KSMPairTests {
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
