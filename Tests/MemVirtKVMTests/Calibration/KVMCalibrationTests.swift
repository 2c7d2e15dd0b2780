import MemVirtCore
import Testing
@testable import MemVirtKVM

/// The parameter names `kvm calibrate` may hand to machine profiles: the model's cost structs'
/// properties (MemVirtModel's CostModel, HostCosts, DirtyTrackingCosts), spelled out here as
/// the oracle a misspelling would fail against.
let calibratableParameters: Set<String> = [
    "CostModel.vmExitRoundTrip", "CostModel.userspaceExitRoundTrip", "CostModel.shadowFaultHandler",
    "CostModel.eptViolationHandler", "CostModel.instructionEmulation", "CostModel.invlpgHandler",
    "CostModel.cr3SwitchHandler", "CostModel.faultInjection", "CostModel.shadowPTEWrite", "CostModel.invlpg",
    "CostModel.cr3Write", "CostModel.guestExceptionRoundTrip",
    "CostModel.invlpgStub", "CostModel.cr3Stub", "CostModel.cr3SwitchStub", "CostModel.stringStoreElement",
    "HostCosts.dontneedPerPage", "HostCosts.remoteFlushInitiator", "HostCosts.storeWritePerPage", "HostCosts.storeReadPerPage", "HostCosts.userfaultfdZeroPage", "HostCosts.userfaultfdCopy",
    "DirtyTrackingCosts.writeProtectFault", "DirtyTrackingCosts.bitmapPerGiB", "DirtyTrackingCosts.bitmapPerDirtyPage",
    "DirtyTrackingCosts.ringPerEntry", "DirtyTrackingCosts.ringFixed", "HostCosts.pageCopy",
    "GuestSchedulingCosts.apfNotPresentHandler", "GuestSchedulingCosts.apfReadyHandler", "GuestSchedulingCosts.pageReadyDelay",
    "CostModel.hostDemandZero4K", "CostModel.hostZeroPageCopy",
    "GuestSchedulingCosts.apfFaultLegs", "GuestSchedulingCosts.tickDeliveryDelay", "HostCosts.timerWakeLatency", "HostCosts.timerWakeSpread",
]

/// The async-PF phase's measurements, in order.
let apfMeasurements = ["apf_not_present", "apf_page_ready", "apf_ready_to_exit", "apf_ready_handling", "apf_fault_total", "apf_kvm_legs", "apf_pager_late", "apf_tick_delivery"]

@Suite("kvm calibrate on /dev/kvm", .serialized, .enabled(if: KVM.isUsable, Comment(rawValue: kvmReason)))
struct KVMCalibrationTests {
    @Test("--quick: every benchmark sampled, spreads ordered, counters show the intended paths, first touch near the probe's")
    func quick() throws {
        let t0 = monotonicNanoseconds()
        let r = try KVMCalibration.run(KVMCalibrationOptions(quick: true))
        let probe = try KVMProbe.run(pages: 1024)
        let seconds = Double(monotonicNanoseconds() - t0) / 1e9
        #expect(seconds < 60, "quick calibration plus probe took \(seconds) s")

        let expected = ["first_touch", "first_touch_read", "zero_page_cow_write", "host_first_touch", "store_write", "store_read", "pager_store_write", "pager_dontneed", "pager_store_read", "pager_fault", "dontneed"] + (r.measurement("dontneed_guest_running") != nil ? ["dontneed_guest_running"] : []) + ["refault_after_zap", "timer_overshoot", "host_loop", "exit_pio",
                        "exit_mmio", "pair_touch_minus_wp", "pair_pf_minus_wp"] + stubBenchmarks(r) + ["exit_cpuid", "cpl0_instruction", "invlpg"] + (r.measurement("exit_hlt") != nil ? ["exit_hlt"] : []) + ["cr3_write", "guest_pf", "pt_write",
                        "uffd_zero_read", "uffd_copy_write", "uffd_service"]
                        + (r.measurement("uffd_zero_read_same_cpu") != nil ? ["uffd_zero_read_same_cpu", "uffd_copy_write_same_cpu"] : [])
                        + (r.measurement("uffd_zero_read_cross_cpu") != nil ? ["uffd_zero_read_cross_cpu", "uffd_copy_write_cross_cpu"] : [])
                        + ["wp_fault_after_harvest", "bitmap_empty_1gib", "bitmap_per_dirty_page", "ring_per_entry",
                           "bitmap_slope_per_page", "bitmap_dirty_fixed", "ring_slope_per_entry", "ring_dirty_fixed", "ring_empty"] + (r.measurement("ksm_cow_break") != nil ? ["ksm_cow_break", "pair_ksm_minus_touch"] : [])
                        + (r.measurement("apf_not_present") != nil ? apfMeasurements : [])
                        + (r.measurement("exit_hypercall") != nil ? ["exit_hypercall"] : [])
                        + (r.measurement("vmcall_below_kvm") != nil ? ["vmcall_below_kvm"] : [])
        #expect(r.measurements.map(\.name) == expected)
        for m in r.measurements {
            let c = m.summary
            #expect(c.samples >= 30, "\(m.name): \(c.samples) samples")
            // Per-pair differences may be near 0 or below; every other figure is a time.
            // So may the slopes between two harvests and what remains of them (64 pages in --quick).
            let difference = m.name.hasPrefix("pair_") || m.name.contains("_slope_") || m.name.hasSuffix("_dirty_fixed")
            #expect(difference || c.medianNanos > 0, "\(m.name): median \(c.medianNanos)")
            #expect(c.p10Nanos <= c.medianNanos && c.medianNanos <= c.p90Nanos, "\(m.name): p10 \(c.p10Nanos) median \(c.medianNanos) p90 \(c.p90Nanos)")
        }
        func per(_ name: String, _ counter: String) -> Double { r.measurement(name)?.counter(counter) ?? -1 }
        // The intended paths, from KVM's own counters (per timed event).
        #expect(abs(per("first_touch", "pf_fixed") - 1) < 0.1, "first_touch pf_fixed/event \(per("first_touch", "pf_fixed"))")
        #expect(abs(per("refault_after_zap", "pf_fixed") - 1) < 0.1)
        // The zero page's copy-on-write: a stale fault retried, then fixed (MemoryCalibration.swift).
        #expect(abs(per("zero_page_cow_write", "pf_fixed") - 1) < 0.1, "zero_page_cow_write pf_fixed/event \(per("zero_page_cow_write", "pf_fixed"))")
        #expect(abs(per("zero_page_cow_write", "pf_taken") - 2) < 0.2, "zero_page_cow_write pf_taken/event \(per("zero_page_cow_write", "pf_taken"))")
        #expect(per("exit_pio", "vmm_io_exits") == 1)
        #expect(per("exit_mmio", "vmm_mmio_exits") == 1)
        #expect(abs(per("exit_mmio", "mmio_exits") - 1) < 0.1)
        #expect(abs(per("cpl0_instruction", "insn_emulation") - 1) < 0.1 || r.platform != .pvm)
        #expect(abs(per("guest_pf", "pf_guest") - 1) < 0.1, "guest_pf pf_guest/event \(per("guest_pf", "pf_guest"))")
        // Pairs: one guest #PF and one KVM fault (the write-protect fault) per #PF pair; two
        // KVM faults (write-protect, first touch) per touch pair.
        #expect(abs(per("pair_pf_minus_wp", "pf_guest") - 1) < 0.1)
        #expect(abs(per("pair_pf_minus_wp", "pf_fixed") + max(0, per("pair_pf_minus_wp", "pf_fast")) - 1) < 0.2)
        #expect(abs(per("pair_touch_minus_wp", "pf_fixed") + max(0, per("pair_touch_minus_wp", "pf_fast")) - 2) < 0.2)
        #expect(per("guest_pf", "pf_fixed") < 0.1)
        #expect(abs(per("invlpg", "invlpg") - 1) < 0.1, "invlpg/event \(per("invlpg", "invlpg"))")
        #expect(abs(per("pt_write", "mmu_pte_write") - 1) < 0.2, "pt_write mmu_pte_write/event \(per("pt_write", "mmu_pte_write"))")
        #expect(abs(per("uffd_copy_write", "pf_fixed") - 1) < 0.2)
        // A DONTNEED under a running guest: one remote TLB flush per page (the kick), and the
        // parameter is the difference from a DONTNEED with the vCPU out of guest mode (quick:
        // overall medians); measured wherever this process may use two CPUs.
        if allowedCPUs().count >= 2 {
            #expect(abs(per("dontneed_guest_running", "remote_tlb_flush") - 1) < 0.1, "remote_tlb_flush/event \(per("dontneed_guest_running", "remote_tlb_flush"))")
            let d = r.measurement("dontneed_guest_running")!.summary.medianNanos - r.measurement("dontneed")!.summary.medianNanos
            if let c = r.cost("HostCosts.remoteFlushInitiator") {
                #expect(abs(c.medianNanos - d) < 1e-6)
            } else {
                #expect(r.bounds.contains { $0.parameter == "HostCosts.remoteFlushInitiator" }, "\(d)")
            }
        } else {
            #expect(r.omitted.contains { $0.0 == "HostCosts.remoteFlushInitiator" })
        }
        // The pager phase in its steady state: every guest write faulted once (pf_fixed 1) and
        // was retried once as stale (the eviction's invalidation ran while it waited: pf_taken
        // 2); each fault evicted exactly one page and read exactly one back (the pager's own
        // operation counts equal the faults: 15 a round, 2 rounds); the pager's figures are
        // the charged ones.
        #expect(abs(per("pager_fault", "pf_fixed") - 1) < 0.1, "pager_fault pf_fixed/event \(per("pager_fault", "pf_fixed"))")
        #expect(abs(per("pager_fault", "pf_taken") - 2) < 0.2, "pager_fault pf_taken/event \(per("pager_fault", "pf_taken"))")
        for name in ["pager_store_write", "pager_dontneed", "pager_store_read", "pager_fault"] {
            #expect(r.measurement(name)?.summary.samples == 30, "\(name): \(r.measurement(name)?.summary.samples ?? -1) samples")
        }
        for (param, bench) in [("HostCosts.storeWritePerPage", "pager_store_write"), ("HostCosts.dontneedPerPage", "pager_dontneed"), ("HostCosts.storeReadPerPage", "pager_store_read")] {
            #expect(r.cost(param)?.method.hasPrefix(bench + ":") == true, "\(param): \(r.cost(param)?.method ?? "missing")")
            #expect(r.cost(param)?.medianNanos == r.measurement(bench)!.summary.medianNanos)
        }
        // KSM: measured, or left out with the reason (no KSM here, or ksmd did not merge in time).
        if r.measurement("ksm_cow_break") != nil {
            #expect(abs(per("ksm_cow_break", "pf_fixed") - 1) < 0.2)
        } else {
            #expect(r.omitted.contains { $0.0 == "HostCosts.pageCopy" })
        }
        #expect(abs(per("wp_fault_after_harvest", "pf_fixed") - 1) < 0.2 || abs(per("wp_fault_after_harvest", "pf_fast") - 1) < 0.2)
        for m in r.measurements where m.pathCounter != nil {
            #expect(m.pathConfirmed, "\(m.name): \(m.pathCounter!) \(m.counter(m.pathCounter!)) per event")
        }
        // The hypercall exit: measured (KVM's hypercall counter once per event), or left out
        // with what happened.
        if r.measurement("exit_hypercall") != nil {
            #expect(abs(per("exit_hypercall", "hypercalls") - 1) < 0.1)
        } else if r.measurement("vmcall_below_kvm") != nil {
            // Answered below KVM: KVM saw no hypercall and (almost) no exit per event.
            #expect(per("vmcall_below_kvm", "hypercalls") <= 0 && per("vmcall_below_kvm", "exits") < 0.5)
            #expect(r.omitted.contains { $0.0.hasPrefix("exit_hypercall") })
        } else {
            #expect(r.omitted.contains { $0.0.hasPrefix("exit_hypercall") })
        }
        // The HLT exit (no in-kernel irqchip in the calibration VMs): KVM counted one per event.
        #expect(abs(per("exit_hlt", "halt_exits") - 1) < 0.1, "exit_hlt halt_exits/event \(per("exit_hlt", "halt_exits"))")
        // Every round of every benchmark has a median (the per-round pairing needs them).
        // (The async-PF phase too: one VM per round.)
        for m in r.measurements {
            #expect(m.roundMedians.count == 2, "\(m.name): \(m.roundMedians.count) round medians")
        }
        // Every cost handed to profiles names a model parameter, once, and is positive; a
        // derived part below its resolution is a bound instead, never both.
        for c in r.costs {
            #expect(calibratableParameters.contains(c.parameter), "unknown parameter \(c.parameter)")
            #expect(c.medianNanos > 0 && c.p10Nanos <= c.medianNanos && c.medianNanos <= c.p90Nanos, "\(c.parameter)")
        }
        for b in r.bounds {
            #expect(calibratableParameters.contains(b.parameter), "unknown parameter \(b.parameter)")
            #expect(b.estimateNanos >= 0 && b.resolutionNanos > 0 && abs(b.upperNanos - b.estimateNanos - b.resolutionNanos) < 1e-6, "\(b.parameter)")
            // Below the limit of quantification, which is the bound (at least).
            #expect(b.estimateNanos < b.upperNanos, "\(b.parameter): estimate \(b.estimateNanos), upper \(b.upperNanos)")
        }
        let named = r.costs.map(\.parameter) + r.bounds.map(\.parameter)
        #expect(Set(named).count == named.count)
        // The host's conditions: the reference is the CPL0 instruction's median, inside its rounds'.
        let cond = try #require(r.conditions)
        #expect(cond.referenceNanos == r.measurement("cpl0_instruction")!.summary.medianNanos)
        #expect(cond.roundMinNanos <= cond.roundMaxNanos && cond.stealPercent >= 0 && cond.stealPercent <= 100)
        #expect(r.cost("CostModel.userspaceExitRoundTrip") != nil && r.cost("CostModel.vmExitRoundTrip") != nil)
        // Derived parameters add back up to their measurements: with 2 rounds (quick) the
        // difference of the overall medians, recomputed here.
        let handler = r.pagingMode == "nested" ? "CostModel.eptViolationHandler" : "CostModel.shadowFaultHandler"
        // (The first touch's exit is the write-protect fault paired with it in the same VM.)
        let ftMinus = r.measurement("pair_touch_minus_wp")!.summary.medianNanos - r.measurement("host_first_touch")!.summary.medianNanos
        if let h = r.cost(handler) {
            #expect(abs(h.medianNanos - ftMinus) < 1e-6)
        } else if let b = r.bounds.first(where: { $0.parameter == handler }) {
            #expect(abs(b.estimateNanos - max(0, ftMinus)) < 1e-6)
        } else {
            #expect(r.omitted.contains { $0.0 == handler })
        }
        // userfaultfd: the unpinned placement (as the KVM engine's pager runs) is the charged
        // one (quick: 2 rounds, the difference of overall medians); every placement's faults
        // went through KVM's fault path once.
        do {
            for (param, fault, plain) in [("HostCosts.userfaultfdZeroPage", "uffd_zero_read", "first_touch_read"),
                                          ("HostCosts.userfaultfdCopy", "uffd_copy_write", "first_touch")] {
                let d = r.measurement(fault)!.summary.medianNanos - r.measurement(plain)!.summary.medianNanos
                if let c = r.cost(param) {
                    #expect(abs(c.medianNanos - d) < 1e-6, "\(param) \(c.medianNanos) vs \(d)")
                    #expect(c.method.contains(fault))
                } else {
                    #expect(r.bounds.contains { $0.parameter == param } || r.omitted.contains { $0.0 == param })
                }
            }
            #expect(abs(per("uffd_zero_read", "pf_fixed") - 1) < 0.2)
            if r.measurement("uffd_zero_read_same_cpu") != nil { #expect(abs(per("uffd_zero_read_same_cpu", "pf_fixed") - 1) < 0.2) }
        }
        // The first touch agrees with the probe's (same method, another VM): a generous band here,
        // the 10% check is the full run's (docs/calibrate.md).
        let ft = r.measurement("first_touch")!.summary.medianNanos
        #expect(ft > 0.5 * probe.firstTouchNanos && ft < 2 * probe.firstTouchNanos, "calibrate \(ft) ns vs probe \(probe.firstTouchNanos) ns")
        // The probe's figure is the median of its batches' medians (1,024 pages: 16 batches of
        // 64), each batch with its CPL0 reference; the mean of the middle two of 16 (even).
        #expect(probe.firstTouchBatchMedians.count == 16 && probe.referenceBatchNanos.count == 16)
        let sortedBatches = probe.firstTouchBatchMedians.sorted()
        #expect(abs(probe.firstTouchNanos - (sortedBatches[7] + sortedBatches[8]) / 2) < 1e-6)
        #expect(probe.referenceBatchNanos.allSatisfy { $0 > 0 })
        // At base speed: the median of the batches whose reference was within 1.25x of the
        // fastest (recomputed here), or the overall figure with fewer than 3 such batches.
        let lo = probe.referenceBatchNanos.min()!
        let base = zip(probe.firstTouchBatchMedians, probe.referenceBatchNanos).filter { $0.1 <= 1.25 * lo }.map(\.0).sorted()
        let want = base.count >= 3 ? (base.count % 2 == 1 ? base[base.count / 2] : (base[base.count / 2 - 1] + base[base.count / 2]) / 2) : probe.firstTouchNanos
        #expect(abs(probe.firstTouchBaseNanos - want) < 1e-6, "base-speed first touch \(probe.firstTouchBaseNanos) vs \(want)")
        #expect(probe.slowBatches == 16 - base.count)
        // Async PF: every faulting read went async (one "page not present" and one matched
        // "page ready" per read, the scheduler's own counts), every recorded read has its
        // timestamps, the parameters are there; the guest's own clock says a fault lasted at
        // least the store's service time and longer than its "page ready" part.
        if r.measurement("apf_not_present") != nil {
            for name in apfMeasurements where name != "apf_tick_delivery" {
                let c = r.measurement(name)!.summary
                #expect(c.samples == 30, "\(name): \(c.samples) samples")
            }
            // One sample per timer tick that interrupted the counting thread: as many as the
            // phase lasted 4 ms slices, each due before the tick's exit.
            #expect(r.measurement("apf_tick_delivery")!.summary.p10Nanos >= 0)
            #expect(per("apf_not_present", "apf_not_present") == 1, "apf_not_present/read \(per("apf_not_present", "apf_not_present"))")
            #expect(per("apf_page_ready", "apf_ready") == 1, "apf_ready/read \(per("apf_page_ready", "apf_ready"))")
            #expect(per("apf_page_ready", "apf_unmatched") <= 0)
            let total = r.measurement("apf_fault_total")!.summary.medianNanos
            #expect(total >= Double(Session.apfStoreDelayNanos), "apf_fault_total \(total) ns")
            #expect(total > r.measurement("apf_page_ready")!.summary.medianNanos)
            #expect(r.cost("GuestSchedulingCosts.apfNotPresentHandler")?.medianNanos == r.measurement("apf_not_present")!.summary.medianNanos)
            #expect(r.cost("GuestSchedulingCosts.apfReadyHandler")?.medianNanos == r.measurement("apf_ready_handling")!.summary.medianNanos)
            // pageReadyDelay = ready-to-exit minus the model's exit (quick: overall medians).
            let delay = r.measurement("apf_ready_to_exit")!.summary.medianNanos - r.measurement("wp_fault_after_harvest")!.summary.medianNanos
            if let d = r.cost("GuestSchedulingCosts.pageReadyDelay") {
                #expect(abs(d.medianNanos - delay) < 1e-6)
            } else if let b = r.bounds.first(where: { $0.parameter == "GuestSchedulingCosts.pageReadyDelay" }) {
                #expect(abs(b.estimateNanos - max(0, delay)) < 1e-6)
            } else {
                #expect(r.omitted.contains { $0.0 == "GuestSchedulingCosts.pageReadyDelay" })
            }
        } else {
            // Only where KVM lacks async PF (the phase's own reason otherwise fails the test).
            let kvm = try KVM()
            #expect(kvm.check(.asyncPF) <= 0 || kvm.check(.asyncPFInt) <= 0, "async PF available but not measured: \(r.omitted)")
            #expect(r.omitted.contains { $0.0.hasPrefix("async PF") })
        }
        // The JSON carries the costs and the counters.
        let json = r.json.rendered()
        #expect(json.contains("\"counters_per_event\"") && json.contains("\"CostModel.userspaceExitRoundTrip\""))
        #expect(json.contains("\"bounds\"") && json.contains("\"round_medians_ns\"") && json.contains("\"steal_percent\""))
    }

    @Test("derived parameters: the median of per-round differences, a bound where below the resolution")
    func perRoundDerivation() {
        // Three rounds; first touch - exit - host zero is 0.1 us in each round (its samples'
        // spread, +-10 us, leaves it far below 10 standard errors): a bound. guest_pf - exit -
        // 2 CPL0 is 4,000, 3,980 and 3,990 ns: measured, the median of the rounds' differences.
        func meas(_ name: String, _ rounds: [Double], spread: Double, path: String? = nil) -> CalibrationMeasurement {
            let all = rounds.flatMap { m in [m - spread, m, m + spread] }
            return CalibrationMeasurement(name: name, summary: CalibratedCost.summarize(parameter: name, nanos: all, method: name)!,
                                          countersPerEvent: path.map { [($0, 1.0)] } ?? [], pathCounter: path, pathConfirmed: true,
                                          roundMedians: rounds)
        }
        var r = CalibrationReport(platform: .pvm, pagingMode: "shadow", tscKHz: 1, quick: false, date: "", seconds: 0, measurements: [
            meas("wp_fault_after_harvest", [29_000, 29_020, 29_010], spread: 200, path: "pf_fixed"),
            meas("host_first_touch", [1_700, 1_800, 1_750], spread: 300),
            meas("first_touch", [30_800, 30_920, 30_860], spread: 10_000, path: "pf_fixed"),
            meas("cpl0_instruction", [350, 360, 355], spread: 20),
            meas("guest_pf", [33_700, 33_720, 33_710], spread: 200, path: "pf_guest"),
        ], costs: [], omitted: [], realtime: true)
        derive(&r, nested: false, pvm: true)
        let b = r.bounds.first { $0.parameter == "CostModel.shadowFaultHandler" }
        #expect(b != nil && abs(b!.estimateNanos - 100) < 1e-9 && b!.upperNanos > b!.estimateNanos)
        #expect(r.cost("CostModel.shadowFaultHandler") == nil)
        let fi = r.cost("CostModel.faultInjection")
        #expect(fi != nil && abs(fi!.medianNanos - 3_990) < 1e-9, "\(String(describing: fi))")
        #expect(r.bounds.first { $0.parameter == "CostModel.faultInjection" } == nil)
    }

    @Test("two host speeds: a parameter at the base speed, the slow rounds and their share kept beside it")
    func hostSpeedStates() {
        // Six rounds; the CPL0 reference shows rounds 1 and 4 slow (> 1.25x the fastest). 150
        // samples a round (the pooled spread, both speeds, still leaves faultInjection above
        // its limit of quantification).
        func meas(_ name: String, _ rounds: [Double], path: String? = nil) -> CalibrationMeasurement {
            let all = rounds.flatMap { m in (0..<50).flatMap { _ in [m - 50, m, m + 50] } }
            return CalibrationMeasurement(name: name, summary: CalibratedCost.summarize(parameter: name, nanos: all, method: name)!,
                                          countersPerEvent: path.map { [($0, 1.0)] } ?? [], pathCounter: path, pathConfirmed: true,
                                          roundMedians: rounds)
        }
        let reference: [Double] = [390, 600, 392, 391, 610, 389]
        let slow = reference.map { $0 > 1.25 * 389 }
        let exit: [Double] = [30_000, 42_000, 30_100, 29_900, 42_500, 30_050]
        // guest #PF = exit + 2 CPL0 instructions + the injection: 4,000 ns at base speed, 5,600 slow.
        let pf = (0..<6).map { exit[$0] + 2 * reference[$0] + (slow[$0] ? 5_600 : 4_000) }
        var r = CalibrationReport(platform: .pvm, pagingMode: "shadow", tscKHz: 1, quick: false, date: "", seconds: 0, measurements: [
            meas("wp_fault_after_harvest", exit, path: "pf_fixed"), meas("cpl0_instruction", reference), meas("guest_pf", pf, path: "pf_guest"),
            meas("host_first_touch", Array(repeating: 1_700, count: 6)), meas("first_touch", exit.map { $0 + 1_700 }, path: "pf_fixed"),
        ], costs: [], omitted: [], realtime: true)
        derive(&r, nested: false, pvm: true)
        let e = r.cost("CostModel.vmExitRoundTrip")
        #expect(e?.medianNanos == 30_025)  // median of 30,000, 30,100, 29,900, 30,050
        #expect(e?.slowStateNanos == 42_250)
        #expect(e?.slowRoundFraction == 2.0 / 6)
        #expect(abs((e?.expectedNanos ?? 0) - (30_025 * 4 + 42_250 * 2) / 6) < 1e-9)
        let fi = r.cost("CostModel.faultInjection")
        #expect(abs((fi?.medianNanos ?? 0) - 4_000) < 1e-9, "\(String(describing: fi))")
        #expect(abs((fi?.slowStateNanos ?? 0) - 5_600) < 1e-9)
        // One speed: no state kept, the parameter as before (the median over all rounds).
        let flat: [Double] = [30_000, 30_400, 30_100, 29_900, 30_300, 30_050]
        var one = CalibrationReport(platform: .pvm, pagingMode: "shadow", tscKHz: 1, quick: false, date: "", seconds: 0, measurements: [
            meas("wp_fault_after_harvest", flat, path: "pf_fixed"), meas("cpl0_instruction", [390, 391, 392, 389, 390, 391]),
        ], costs: [], omitted: [], realtime: true)
        derive(&one, nested: false, pvm: true)
        #expect(one.cost("CostModel.vmExitRoundTrip")?.slowStateNanos == nil)
        #expect(one.cost("CostModel.vmExitRoundTrip")?.medianNanos == one.measurement("wp_fault_after_harvest")?.summary.medianNanos)
        // The state is per benchmark: the CPL0 reference fast in every round while the exit's
        // own rounds 2 and 5 are slow (the state changed between the two within the rounds).
        let exitLate: [Double] = [30_000, 30_100, 42_000, 29_900, 30_050, 42_500]
        var apart = CalibrationReport(platform: .pvm, pagingMode: "shadow", tscKHz: 1, quick: false, date: "", seconds: 0, measurements: [
            meas("wp_fault_after_harvest", exitLate, path: "pf_fixed"), meas("cpl0_instruction", reference),
        ], costs: [], omitted: [], realtime: true)
        derive(&apart, nested: false, pvm: true)
        let ea = apart.cost("CostModel.vmExitRoundTrip")
        #expect(ea?.medianNanos == 30_025 && ea?.slowStateNanos == 42_250 && ea?.slowRoundFraction == 2.0 / 6, "\(String(describing: ea))")
        let ia = apart.cost("CostModel.instructionEmulation")
        #expect(ia?.medianNanos == 390.5 && ia?.slowStateNanos == 605, "\(String(describing: ia))")
    }

    @Test("bad options are refused with a message naming them")
    func badOptions() {
        var o = KVMCalibrationOptions(quick: true)
        o.rounds = 0
        #expect(throws: KVMError.self) { try KVMCalibration.run(o) }
    }
}
