import MemVirtCore
import MemVirtExperiments
import MemVirtKVM
import Testing

@Suite("Async-PF benchmark driver on /dev/kvm", .serialized, .enabled(if: KVM.isUsable, Comment(rawValue: KVM.unavailableReason ?? "")))
struct AsyncPFBenchmarkTests {
    @Test("async PF: 'page not present' parks the faulting thread, 'page ready' wakes it; every word read is the store's",
          arguments: [true, false])
    func asyncPF(on: Bool) throws {
        var c = AsyncPFCase()
        c.vcpus = 1
        c.seconds = 1.2
        c.residentLimit = 1 << 20
        c.storeDelayNanos = 2_000_000
        c.asyncPF = on
        let r = try AsyncPFBenchmark.run(c)
        print("async PF \(on ? "on" : "off"): \(r.json.rendered())")
        #expect(r.mismatches == 0)
        // Enough activity to check the rules below. How much fits in 1.2 s depends on the host's
        // load: ~600 reads quiet, 20-30 seen with a load average of 21 on 2 cores (75% of the
        // vCPU thread's time waiting for a CPU).
        #expect(r.faultingReads[0] >= 5)
        #expect(r.work[0] > 0)
        // The run starts with the limit's 256 pages resident (prefilled, not counted as store
        // reads), so every store read evicts exactly one page (FIFO).
        #expect(r.pager.storeReads >= 5)
        #expect(r.pager.evictions == r.pager.storeReads)
        #expect(r.pager.peakResidentPages == 256)
        if on {
            // How many faults overlap in 1.2 s depends on the host's speed (82 seen under load, ~500 quiet).
            #expect(r.notPresent >= 5)
            // Each parked thread is woken once; the wake-all after enabling comes on top.
            #expect(r.ready >= r.notPresent && r.ready <= r.notPresent + 2)
            #expect(r.schedulers[0].apfUnmatched == 0)
        } else {
            #expect(r.notPresent == 0 && r.ready == 0)
        }
    }
}
