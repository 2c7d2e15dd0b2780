import MemVirtCore
import Testing
#if canImport(Glibc)
import Glibc
#endif
@testable import MemVirtKVM

/// Why the KSM tests cannot run here ("" when they can).
let ksmReason = KVM.unavailableReason ?? KSM.unavailableReason() ?? ""

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
}
