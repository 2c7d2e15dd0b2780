import MemVirtCore
import Testing

@testable import MemVirtModel

/// `PagerAsyncPF` (the KVM async-PF case's mechanism: FIFO pager, store delay, async PF,
/// round-robin on the guest timer) against closed forms.
@Suite("Async page faults under the FIFO pager (PagerAsyncPF)")
struct PagerAsyncPFTests {
    /// A config whose every cost is zero but `readCycles` (cycles at 3 GHz).
    func zeroCost(pages: Int, resident: Int, delay: Double, slice: Double, duration: Double) -> PagerAsyncPFConfig {
        var k = CostModel.pvmShadow
        k.clockGHz = 3
        k.vmExitRoundTrip = 0
        k.shadowFaultHandler = 0
        k.guestExceptionRoundTrip = 0
        var c = PagerAsyncPFConfig(pages: pages, residentPages: resident, storeDelay: delay, timeSlice: slice, duration: duration, costs: k)
        var g = GuestSchedulingCosts()
        g.tickHandler = 0; g.tickExits = 0; g.apfSetup = 0; g.apfNotPresentHandler = 0; g.apfReadyHandler = 0; g.pageReadyDelay = 0
        g.apfFaultLegs = 0; g.tickDeliveryDelay = 0
        c.guestCosts = g
        var h = HostCosts()
        h.storeWritePerPage = 0; h.storeReadPerPage = 0; h.dontneedPerPage = 0
        h.remoteFlushInitiator = 0; h.timerWakeLatency = 0
        c.hostCosts = h
        c.readCycles = 300  // 100 ns
        return c
    }

    @Test("Everything resident: no fault; the faulting thread holds every other slice (round-robin on the tick)")
    func allResident() throws {
        let c = zeroCost(pages: 64, resident: 64, delay: 1e6, slice: 1e6, duration: 10e6)
        let r = try PagerAsyncPF.run(c)
        #expect(r.notPresent == 0 && r.evictions == 0 && r.storeReads == 0)
        #expect(r.shadowFaults <= 64)
        // Slices 0, 2, 4, 6, 8 are the faulting thread's: 5 ms at 100 ns per read.
        #expect(abs(Double(r.reads) - 50_000) <= 5, "reads \(r.reads)")
        #expect(r.ticks == 10 && r.faultingPreempted == 5, "ticks \(r.ticks), preempted \(r.faultingPreempted)")
        #expect(abs(r.workingNanos - 5e6) <= 1_000, "working \(r.workingNanos)")
    }

    @Test("One resident page: every read misses; period = not-present path + store delay + wake-up + pager work + ready delay + ready + read")
    func everyReadMisses() throws {
        var c = zeroCost(pages: 1 << 20, resident: 1, delay: 1e6, slice: 1e12, duration: 1e9)
        c.costs.vmExitRoundTrip = 3_000      // 1 us
        c.guestCosts.apfNotPresentHandler = 30_000  // 10 us
        c.guestCosts.apfReadyHandler = 60_000       // 20 us
        c.guestCosts.pageReadyDelay = 50_000        // ns
        c.guestCosts.apfFaultLegs = 15_000          // 5 us
        c.hostCosts.storeWritePerPage = 3_000       // 1 us
        c.hostCosts.storeReadPerPage = 6_000        // 2 us
        c.hostCosts.dontneedPerPage = 9_000         // 3 us
        c.hostCosts.remoteFlushInitiator = 12_000   // 4 us
        c.hostCosts.timerWakeLatency = 70_000       // ns
        let r = try PagerAsyncPF.run(c)
        // A miss at t0: the exit (1 us) and the stub's legs (5 us) reach the VMM, where the
        // pager gets the fault; the page is ready 1 ms + 70 us (the pager's late wake-up) +
        // (1 + 2 + 3 + 4) us of pager work + 50 us later; the ready interrupt (1 us exit + 20 us
        // handler), the read again (0.1 us), the next miss.
        let period = 6_000 + 1e6 + 70_000 + 10_000 + 50_000 + 21_000 + 100
        let expected = 1e9 / period
        #expect(abs(Double(r.notPresent) - expected) <= 2, "misses \(r.notPresent), expected \(expected)")
        #expect(r.reads + 2 >= r.notPresent && r.reads <= r.notPresent, "reads \(r.reads)")
        #expect(r.evictions == r.notPresent, "evictions \(r.evictions)")
        // Parked, as the guest kernel clocks it: from its #PF handler's start (after the exit
        // and the legs) to its "page ready" handler's start (after the 1 us exit): the store
        // delay, the wake-up, the pager's work, the ready delay and the ready's exit.
        let parked = 1e6 + 70_000 + 10_000 + 50_000 + 1_000.0
        // Woken to the next not-present handler: the ready handler (20 us), the read again
        // (0.1 us), the next miss's exit (1 us) and legs (5 us).
        #expect(abs(r.runToFaultNanos / Double(r.notPresent - 1) - 26_100) < 1, "run to fault \(r.runToFaultNanos / Double(r.notPresent - 1))")
        #expect(abs(r.parkedNanos / Double(r.ready) - parked) < 1, "parked per fault \(r.parkedNanos / Double(r.ready)), expected \(parked)")
        #expect(r.ticks == 0)
    }

    @Test("The pager's wake-up drawn over timerWakeLatency +- spread / 2: the mean parked time keeps the closed form, single faults vary")
    func wakeSpread() throws {
        var c = zeroCost(pages: 1 << 20, resident: 1, delay: 1e6, slice: 1e12, duration: 1e9)
        c.hostCosts.timerWakeLatency = 70_000
        c.hostCosts.timerWakeSpread = 40_000
        let r = try PagerAsyncPF.run(c)
        // Every read misses: parked = delay + lateness; the lateness is uniform on [50, 90] us,
        // mean 70 us, standard deviation 40 / sqrt(12) = 11.5 us, so the mean of ~900 draws is
        // within 2 us of 70 us (5 standard errors).
        let meanParked = r.parkedNanos / Double(r.ready)
        #expect(r.ready > 800)
        #expect(abs(meanParked - 1_070_000) < 2_000, "parked per fault \(meanParked)")
        // The period varies: the count differs from the fixed lateness's by less than the
        // draws' spread allows, but the run is not the fixed one's exactly.
        var fixed = c
        fixed.hostCosts.timerWakeSpread = 0
        let f = try PagerAsyncPF.run(fixed)
        #expect(abs(f.parkedNanos / Double(f.ready) - 1_070_000) < 1)
        #expect(abs(Double(r.notPresent) - Double(f.notPresent)) <= 3, "\(r.notPresent) vs \(f.notPresent)")
    }

    @Test("A tick due while page ready is on its way (or that reaches the guest then), or while it is handled, takes the vCPU from the woken thread: probability (tick delivery + ready delay + handler + read) / slice")
    func tickBehindPageReady() throws {
        var c = zeroCost(pages: 1 << 20, resident: 1, delay: 1e6, slice: 1e6, duration: 10e9)
        c.guestCosts.pageReadyDelay = 100_000      // ns
        c.guestCosts.apfReadyHandler = 300_000     // 100 us
        c.guestCosts.tickDeliveryDelay = 50_000    // ns
        // The pager's lateness uniform over [0, 2 ms]: two whole slices, so each fault's page
        // arrives at a phase of the timer that is uniform whatever came before (a fault right
        // after a preemption starts on a tick).
        c.hostCosts.timerWakeLatency = 1_000_000
        c.hostCosts.timerWakeSpread = 2_000_000
        let r = try PagerAsyncPF.run(c)
        // Per fault the woken thread is exposed to a tick due in [arrival - 50 us tick delivery,
        // arrival + 100 us ready delay + 100 us handler + 0.1 us read): probability 250.1 us /
        // 1 ms. Binomial over r.ready faults; 4 standard deviations.
        let p = 250_100.0 / 1e6
        let n = Double(r.ready)
        let expected = n * p
        let sd = (n * p * (1 - p)).squareRoot()
        #expect(n > 3_000)
        #expect(abs(Double(r.faultingPreempted) - expected) < 4 * sd, "preempted \(r.faultingPreempted) of \(r.ready), expected \(expected) +- \(4 * sd)")
    }

    @Test("Uniform reads over 4x the limit: a quarter of the reads hit (independent references: any demand policy)")
    func hitRatio() throws {
        let c = zeroCost(pages: 4096, resident: 1024, delay: 10_000, slice: 1e12, duration: 2e9)
        let r = try PagerAsyncPF.run(c)
        let hits = Double(r.reads - r.notPresent) / Double(r.reads)
        #expect(r.reads > 100_000)
        #expect(abs(hits - 0.25) < 0.01, "hit ratio \(hits)")
        #expect(r.evictions == r.notPresent, "start full: every miss evicts")
    }

    @Test("Bad sizes are refused with what and the allowed range")
    func refused() {
        let c = zeroCost(pages: 16, resident: 32, delay: 0, slice: 1e6, duration: 1e6)
        #expect(throws: InputError.self) { try PagerAsyncPF.run(c) }
    }
}
