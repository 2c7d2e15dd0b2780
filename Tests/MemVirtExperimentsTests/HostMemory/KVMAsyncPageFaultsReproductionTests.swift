import MemVirtCore
import MemVirtExperiments
import MemVirtKVM
import Testing

/// `memvirt reproduce apf --engine kvm`, shortened: both cases run, every word the faulting
/// threads read is the store's, each "page not present" has its "page ready", and the JSON
/// carries the ratio, the model's ratio and the work shares. The ratio's size depends on the
/// host's load (the report says how busy it was): it is the reproduction's, not a test's.
@Suite("KVM async-PF reproduction", .serialized, .enabled(if: KVM.isUsable, Comment(rawValue: KVM.unavailableReason ?? "")))
struct KVMAsyncPageFaultsReproductionTests {
    func number(_ v: JSONValue, _ key: String) -> Double? {
        guard case .object(let kv) = v, let x = kv.first(where: { $0.0 == key })?.1 else { return nil }
        switch x {
        case .double(let d): return d
        case .uint(let u): return Double(u)
        case .int(let i): return Double(i)
        default: return nil
        }
    }

    @Test("both cases run; reads match the store; not-present and ready pair up; ratio, model ratio and shares reported")
    func shortRun() throws {
        var e = KVMAsyncPageFaults(quick: true, sweep: false, seconds: 1.5)
        e.base.residentLimit = 8 << 20
        let r = try e.run(progress: { _ in })
        print(r.text)
        #expect(number(r.json, "mismatches") == 0)
        let np = try #require(number(r.json, "apf_not_present")), ready = try #require(number(r.json, "apf_ready"))
        #expect(np > 10)
        #expect(ready >= np && ready <= np + 2 * Double(e.base.vcpus))
        let model = try #require(number(r.json, "model_ratio"))
        #expect(model > 1.5 && model < 2.5)
        // The measured ratio against the model's prediction for the same case, within a factor
        // of two either way, on a host whose vCPU threads waited for a CPU at most 5% of the
        // time (the report's own threshold). A loaded host lowers the ratio below 1 (measured
        // x0.62 at 74% host wait): there the band would test the load, not APF.
        let ratio = try #require(number(r.json, "apf_work_ratio"))
        let hostWait = try #require(number(r.json, "host_runqueue_wait_share_max"))
        if hostWait <= 0.05 {
            #expect(ratio > model / 2 && ratio < model * 2, "measured x\(ratio) against the model's x\(model)")
        } else {
            #expect(ratio > 0, "host busy (\(hostWait) host wait): ratio x\(ratio) not compared with the model")
        }
        for k in ["work_share_without_apf", "work_share_with_apf"] {
            let s = try #require(number(r.json, k))
            #expect(s > 0 && s < 1.3, "\(k) \(s)")
        }
    }
}
