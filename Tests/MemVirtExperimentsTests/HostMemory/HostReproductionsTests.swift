import Testing
import MemVirtCore
@testable import MemVirtExperiments

@Suite("Host reproductions (APF, KSM)")
struct HostReproductionsTests {
    @Test("apf --quick: APF about doubles the counter threads' work, and time moves to them")
    func apfQuick() throws {
        let r = try AsyncPageFaults(quick: true).run { _ in }
        guard case .double(let ratio)? = r.json["apf_work_ratio"],
              case .double(let on)? = r.json["work_share_with_apf"],
              case .double(let off)? = r.json["work_share_without_apf"] else {
            Issue.record("missing keys")
            return
        }
        #expect(ratio >= 1.8)
        #expect(on > 0.95)
        #expect(off < 0.6)
    }

    @Test("ksm --quick: pages merge across guests, within the bound, and writes break shares")
    func ksmQuick() throws {
        let r = try KSMReproduction(quick: true).run { _ in }
        guard case .uint(let sharing)? = r.json["pages_sharing"], case .uint(let bound)? = r.json["pages_sharing_upper_bound"],
              case .uint(let cow)? = r.json["cow_breaks"], case .uint(let peak)? = r.json["peak_saved_bytes"],
              case .uint(let before)? = r.json["resident_pages_before"], case .uint(let after)? = r.json["resident_pages_after"] else {
            Issue.record("missing keys")
            return
        }
        #expect(sharing > 0)
        #expect(peak / 4096 <= bound)
        #expect(cow > 0)
        #expect(after + sharing <= before)
    }
}
