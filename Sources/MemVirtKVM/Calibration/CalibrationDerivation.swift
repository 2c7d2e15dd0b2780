import MemVirtCore
#if canImport(Glibc)
import Glibc
#endif

/// From measurements to model parameters. Each parameter is the measurement whose charge in
/// the model equals it; where the model charges a sum for the event (an exit plus a handler),
/// the separately measured parts' medians are subtracted (median, p10 and p90 shift alike) and
/// `method` says so. Names are the model's "StructName.property" strings (MemVirtKVM does not
/// import MemVirtModel). A parameter whose path the counters did not confirm, or whose
/// derivation is not positive, is left out with the reason.
func derive(_ r: inout CalibrationReport, nested: Bool, pvm: Bool) {
    var costs: [CalibratedCost] = []
    var omitted: [(String, String)] = []
    func m(_ n: String) -> CalibrationMeasurement? { r.measurement(n) }
    func med(_ n: String) -> Double? { m(n)?.summary.medianNanos }

    var bounds: [CalibratedBound] = []
    /// The host's speed per round: on kvm_pvm the host is itself a VM, and each of its CPUs
    /// runs for a while in one of two states; in the slow one everything that exits to the
    /// hypervisor below or is emulated takes ~1.4x (CPL0 ~1.6x) as long while native code does
    /// not move. The state is per CPU (two `kvm probe`s at once on CPU 0 and CPU 1 saw one
    /// slow, the other fast) and changes within a round, so a round's CPL0 reference does not
    /// tell the state of the round's other benchmarks (session 5 classified by it: an exit's
    /// "slow" rounds came out at its base value, 30.31 vs 30.19 us). Each benchmark's rounds are
    /// classified by its own round medians: a round is slow when its median is above
    /// `hostStateThreshold` x the benchmark's fastest round's (the two states are ~1.4x apart,
    /// rounds of one state within a few per cent). Where both occur (at least 3 base-speed
    /// rounds), a parameter is its median over the base-speed rounds, its slow-round median
    /// and its slow share kept beside it (`CalibratedCost.slowStateNanos`,
    /// `slowRoundFraction`): the model's expected cost for a long run is the mix
    /// (`expectedNanos`). A benchmark the state does not move (a bitmap harvest, the native
    /// loop) has no round above the threshold: one speed, its median over all rounds.
    let hostStateThreshold = 1.25
    func baseRounds(_ rounds: [Double]) -> [Bool]? {
        guard rounds.count >= 3, let lo = rounds.min(), lo > 0 else { return nil }
        let base = rounds.map { $0 <= hostStateThreshold * lo }
        return base.filter { $0 }.count >= 3 && base.contains(false) ? base : nil
    }
    /// `values` (one per round) split by the state of `by`'s rounds.
    func split(_ values: [Double], by rounds: [Double]) -> (base: [Double], slow: [Double])? {
        guard let b = baseRounds(rounds), values.count == b.count else { return nil }
        return (zip(values, b).filter { $0.1 }.map(\.0), zip(values, b).filter { !$0.1 }.map(\.0))
    }
    func stateNote(_ name: String, _ base: Int, _ slow: Int) -> String {
        "; at the host's base speed: the \(base) rounds whose \(name) median was within \(formatFixed(hostStateThreshold, digits: 2))x of its fastest round's (\(slow) slow rounds kept beside it)"
    }
    /// A derived parameter is measured when it is at least this many standard errors (the
    /// usual limit of quantification, 10 sigma): then two runs agree on it within ~15% (the
    /// difference of two such estimates has a standard error of at most 14% of the value);
    /// below, its value is not resolved to a profile's precision and it is a bound.
    let limitOfQuantification = 10.0

    /// `parameter` := measurement `name` minus the medians of `minus` (name, weight). With 3
    /// rounds or more, the median of the per-round differences (each round's medians, taken
    /// within a second or two of each other): a drift of the host's speed during the run
    /// cancels in each round's difference.
    func add(_ parameter: String, _ name: String, minus: [(String, Double)] = [], _ how: String) {
        guard let x = m(name) else { omitted.append((parameter, "benchmark \(name) produced no samples")); return }
        if !x.pathConfirmed, let p = x.pathCounter {
            omitted.append((parameter, "\(name): \(p) moved \(formatFixed(x.counter(p), digits: 2)) per event, not once: not the intended path"))
            return
        }
        /// The standard error of a median, from the p10-p90 width as if normal:
        /// 1.253 sigma / sqrt(n), sigma = (p90 - p10) / 2.563.
        func se(_ c: CalibratedCost) -> Double { 1.253 * (c.p90Nanos - c.p10Nanos) / 2.563 / Double(max(1, c.samples)).squareRoot() }
        var variance = se(x.summary) * se(x.summary)
        var sub = 0.0
        var parts: [String] = []
        var partsRounds: [([Double], Double)] = []
        for (n, w) in minus {
            guard let pm = m(n) else { omitted.append((parameter, "benchmark \(n) (subtracted) produced no samples")); return }
            let v = pm.summary.medianNanos
            sub += w * v
            variance += w * w * se(pm.summary) * se(pm.summary)
            parts.append((w == 1 ? "" : "\(formatFixed(w, digits: 0)) x ") + "\(n) \(formatFixed(v / 1e3, digits: 3)) us")
            partsRounds.append((pm.roundMedians, w))
        }
        let c = x.summary
        var value = c.medianNanos - sub
        var method = "\(name): \(x.summary.method)"
        var resolution = 0.0
        var standardError = 0.0
        var slowValue: Double? = nil
        var slowFraction: Double? = nil
        if minus.isEmpty, let (b, sl) = split(x.roundMedians, by: x.roundMedians), !sl.isEmpty {
            value = medianOf(b)
            slowValue = medianOf(sl)
            slowFraction = Double(sl.count) / Double(b.count + sl.count)
            method += stateNote(name, b.count, sl.count)
        }
        if !minus.isEmpty {
            // Per-round differences where every part has a median in every round.
            let rounds = x.roundMedians.count
            var diffs: [Double] = []
            if rounds >= 3, partsRounds.allSatisfy({ $0.0.count == rounds }) {
                for r in 0..<rounds { diffs.append(x.roundMedians[r] - partsRounds.reduce(0) { $0 + $1.1 * $1.0[r] }) }
            }
            // Each round's state is that of the measurement the parts are taken from.
            if let (b, sl) = split(diffs, by: x.roundMedians), !sl.isEmpty {
                diffs = b
                slowValue = medianOf(sl)
                slowFraction = Double(sl.count) / Double(b.count + sl.count)
                method += stateNote(name, b.count, sl.count)
            }
            var seRounds = 0.0
            if !diffs.isEmpty {
                value = medianOf(diffs)
                // The rounds' scatter, robustly (1.4826 x the median absolute deviation: a
                // round the host slowed does not widen it), for the standard error of a median.
                let sd = 1.4826 * medianOf(diffs.map { abs($0 - value) })
                seRounds = 1.253 * sd / Double(diffs.count).squareRoot()
                method += "; minus " + parts.joined(separator: " + ") + " (overall medians): the median of the \(diffs.count) rounds' differences of medians"
            } else {
                method += "; minus medians of " + parts.joined(separator: " + ")
            }
            // The standard error of the difference: of the medians it comes from (from their
            // spreads) or of the per-round differences, whichever is larger.
            standardError = max(variance.squareRoot(), seRounds)
            resolution = 2 * standardError
        }
        // Below zero by more than half the measurement's own p10-p90 spread: the decomposition
        // does not hold here, left out.
        let halfSpread = (c.p90Nanos - c.p10Nanos) / 2
        guard value > -halfSpread else {
            omitted.append((parameter, "\(name) median \(formatFixed(c.medianNanos / 1e3, digits: 3)) us minus \(parts.joined(separator: " + ")) is \(formatFixed(value / 1e3, digits: 3)) us, below zero by more than half the p10-p90 spread"))
            return
        }
        if let p = x.pathCounter { method += "; \(p) \(formatFixed(x.counter(p), digits: 2)) per event" }
        if value < limitOfQuantification * standardError {
            // Not quantified: a bound, not a measured median (the profile says so and
            // `profile diff` checks the bounds).
            // Reported as "< LOQ": the bound is the limit of quantification (or the estimate + 2
            // standard errors where that is higher). Estimate + 2 standard errors alone was too
            // tight: two runs' estimates of shadowPTEWrite (174 and 437 ns) differed by more.
            let est = max(0, value)
            let loq = limitOfQuantification * standardError
            let upper = max(loq, est + resolution)
            method += "; the difference, \(formatFixed(value / 1e3, digits: 3)) us, is below its limit of quantification (\(formatFixed(limitOfQuantification, digits: 0)) standard errors, \(formatFixed(loq / 1e3, digits: 3)) us): at most \(formatFixed(upper / 1e3, digits: 3)) us. " + how
            bounds.append(CalibratedBound(parameter: parameter, estimateNanos: est, upperNanos: upper,
                                               resolutionNanos: upper - est, samples: c.samples, method: method))
            return
        }
        if resolution > 0 { method += "; standard error \(formatFixed(standardError / 1e3, digits: 3)) us" }
        method += ". " + how
        var cost = CalibratedCost(parameter: parameter, medianNanos: value, p10Nanos: min(max(0, c.p10Nanos - sub), value),
                                  p90Nanos: max(c.p90Nanos - sub, value), samples: c.samples, method: method)
        if let sv = slowValue, let f = slowFraction {
            cost.slowStateNanos = max(0, sv)
            cost.slowRoundFraction = f
        }
        costs.append(cost)
    }

    // Exits. The reference exit is the cheapest one KVM handles in the kernel that this host
    // shows: a guest write to a mapped page that a dirty-log harvest write-protected (KVM
    // makes the entry writable again and marks the page dirty). Its fix-up is what the model
    // charges as DirtyTrackingCosts.writeProtectFault: inside this figure, not separable, so
    // that parameter is not produced. (CPUID, the other in-kernel exit, goes through KVM's
    // instruction emulator and on kvm_pvm costs more than a whole first touch: reported as
    // exit_cpuid, not used.) Every "exit + handler" charge below subtracts this median.
    add("CostModel.vmExitRoundTrip", "wp_fault_after_harvest",
        "The cheapest in-kernel exit here, including KVM's write-protect fix-up (the model's writeProtectFault, not separable).")
    omitted.append(("DirtyTrackingCosts.writeProtectFault", "inside the reference exit (vmExitRoundTrip = wp_fault_after_harvest): not separable on this host"))
    add("CostModel.userspaceExitRoundTrip", "exit_pio", "Exit to the VMM process and back (PIO; exit_mmio is reported beside it).")
    let exit = [("wp_fault_after_harvest", 1.0)]
    let hostZero = [("host_first_touch", 1.0)]
    // First touch: the model charges vmExitRoundTrip + the handler + the host's demand-zero.
    if m("pair_touch_minus_wp") != nil {
        add(nested ? "CostModel.eptViolationHandler" : "CostModel.shadowFaultHandler", "pair_touch_minus_wp", minus: hostZero,
            "The model charges an exit, this handler and the host's page allocation for a first touch: the exit is the write-protect fault paired with each first touch in the same guest loop iteration.")
    } else {
        add(nested ? "CostModel.eptViolationHandler" : "CostModel.shadowFaultHandler", "first_touch", minus: exit + hostZero,
            "The model charges an exit, this handler and the host's page allocation for a first touch.")
    }
    if pvm || !nested {
        // CPL0 code is emulated on kvm_pvm; on VMX/SVM it runs natively (not an emulation cost).
        if pvm { add("CostModel.instructionEmulation", "cpl0_instruction", "kvm_pvm emulates every CPL0 guest instruction.") }
    }
    if nested {
        add("CostModel.invlpg", "invlpg", "With EPT/NPT INVLPG is not intercepted: a native instruction.")
        add("CostModel.cr3Write", "cr3_write", "With EPT/NPT CR3 writes are not intercepted: a native instruction.")
        add("CostModel.guestExceptionRoundTrip", "guest_pf", minus: [("cpl0_instruction", 2)],
            "With EPT/NPT a guest #PF does not exit: delivery and IRET (the handler's two other instructions subtracted).")
    } else {
        // Under kvm_pvm the CPL0 loop is already inside KVM's emulator: no exit per INVLPG or
        // CR3 write to subtract. Under VMX shadow paging each one exits.
        let e: [(String, Double)] = pvm ? [] : exit
        add("CostModel.invlpgHandler", "invlpg", minus: e, "The INVLPG's cost beyond a plain CPL0 instruction (model: exit + invlpgHandler).")
        add("CostModel.cr3SwitchHandler", "cr3_write", minus: e, "The CR3 write's cost beyond a plain CPL0 instruction (model: exit + cr3SwitchHandler).")
        if m("pair_pf_minus_wp") != nil {
            add("CostModel.faultInjection", "pair_pf_minus_wp", minus: [("cpl0_instruction", 2)],
                "KVM's walk of the guest tables, the #PF injection, delivery and IRET (model: exit + faultInjection): the exit is the write-protect fault paired with each #PF in the same guest loop iteration; the handler's add and mov subtracted.")
        } else {
            add("CostModel.faultInjection", "guest_pf", minus: exit + [("cpl0_instruction", 2)],
                "KVM's walk of the guest tables, the #PF injection, delivery and IRET (model: exit + faultInjection); the handler's add and mov subtracted.")
        }
        add("CostModel.shadowPTEWrite", "pt_write", minus: exit + [("cpl0_instruction", 1)],
            "KVM's handling of a write to a shadowed table beyond the exit and emulating the instruction (kvm_mmu_pte_write).")
        deriveStubCosts(pvm: pvm) { p, n, mi, h in add(p, n, minus: mi, h) }
    }
    // Host memory. A KSM copy-on-write break is two KVM faults (the write's, made stale by the
    // copy's mmu-notifier invalidation, and its retry: pf_taken 2, pf_fixed 1 per break) and the
    // host's copy; the model charges both faults (exit + handler each) and pageCopy. So
    // pageCopy = break - 2 faults = (break - first touch) + the host's demand-zero (a first
    // touch is a fault and a demand-zero) - a refault after a zap (a fault on a page the host
    // has: exit + handler). Until 2026-12-04 the second fault was not taken out, and the model
    // charged each break one fault too many (validate's ksm-cow-breaks +22-28%).
    if m("pair_ksm_minus_touch") != nil {
        add("HostCosts.pageCopy", "pair_ksm_minus_touch", minus: [("host_first_touch", -1), ("refault_after_zap", 1)],
            "The host's copy-on-write break beyond the two KVM faults it takes (the stale one and its retry): each break paired with a first touch in the same guest loop iteration, the host's demand-zero added back, a refault after a zap (the second fault) taken out.")
    } else if m("ksm_cow_break") != nil {
        add("HostCosts.pageCopy", "ksm_cow_break", minus: [("first_touch", 1), ("host_first_touch", -1), ("refault_after_zap", 1)],
            "The host's copy-on-write break beyond the two KVM faults it takes (a first touch less the host's demand-zero, and a refault after a zap).")
    }
    // The host's own demand-zero fault, charged wherever the model backs a guest frame with a
    // new host page (the figure the first-touch derivations above take out).
    add("CostModel.hostDemandZero4K", "host_first_touch", "The host kernel's demand-zero fault on a 4 KiB page (do_anonymous_page), as the hypervisor's GUP takes it.")
    // The zero page's copy-on-write inside a write fault (MemoryCalibration.swift): the model
    // charges two shadow faults (exit + handler each, as a first read) and this.
    if m(KVMCalibration.zeroPageCOWBenchmark) != nil {
        add("CostModel.hostZeroPageCopy", KVMCalibration.zeroPageCOWBenchmark, minus: [("first_touch_read", 2)],
            "The host's copy of its zero page inside a write fault beyond the two faults it costs (wp_page_copy, the mmu-notifier invalidation's zap and TLB flush, the stale fault's retry): the model charges two shadow faults (each as a first read: exit + handler) and this.")
    }
    // The pager's host operations: timed by the pager thread in its steady state
    // (PagerCalibration.swift), where the pages it evicts and reads back have left the CPU's
    // own caches; the single-thread store_write / store_read / dontneed (a hot page, a hot
    // store) are reported beside and stand in only when the pager phase gave no samples.
    let pagerHow = " (The single-thread hot-cache figure is reported beside it.)"
    if m("pager_dontneed") != nil {
        add("HostCosts.dontneedPerPage", "pager_dontneed", "The pager's MADV_DONTNEED per evicted page, as the engine's pager meets it." + pagerHow)
    } else {
        add("HostCosts.dontneedPerPage", "dontneed", "One page per madvise call.")
    }
    // The remote flush an unmap's invalidation makes when the vCPU is in guest mode
    // (RemoteFlushCalibration.swift): the kick and the wait, beyond the same DONTNEED with the
    // vCPU out of guest mode.
    if m("dontneed_guest_running") != nil {
        add("HostCosts.remoteFlushInitiator", "dontneed_guest_running", minus: [("dontneed", 1)],
            "kvm_flush_remote_tlbs from an mmu-notifier invalidation while the vCPU runs guest code: kicking it out of guest mode and waiting, beyond a DONTNEED with the vCPU out of guest mode (the async-PF pager's evictions pay it while the vCPU runs another thread).")
    }
    if m("pager_store_write") != nil, m("pager_store_read") != nil {
        add("HostCosts.storeWritePerPage", "pager_store_write", "The pager's write of an evicted page to its store, as the engine's pager meets it." + pagerHow)
        add("HostCosts.storeReadPerPage", "pager_store_read", "The pager's read of a page back from its store, as the engine's pager meets it." + pagerHow)
    } else if m("store_write") != nil, m("store_read") != nil {
        add("HostCosts.storeWritePerPage", "store_write", "The userfaultfd pager's write of an evicted page to its store (a 4 KiB pwrite into the page cache).")
        add("HostCosts.storeReadPerPage", "store_read", "The pager's read of a page back from its store (a 4 KiB pread from the page cache).")
    }
    // userfaultfd: charged as the KVM engine's pager runs, unpinned (the scheduler places the
    // handler's wake-up on either CPU; across CPUs it is also the wake-up of a halted CPU, an
    // exit to the hypervisor below on this host). The placements are reported beside it:
    // uffd_*_same_cpu (both threads pinned to one CPU) and uffd_*_cross_cpu. (calstab charged
    // the same-CPU figure for its steadiness; the pager case of `memvirt validate` then
    // predicted 35% under the pager's measured time, which pays the unpinned hand-off. On a
    // quiet host the unpinned medians of two full runs agreed within 6.6%, 2026-12-04 12:41.)
    let placement = " Timed unpinned, as the KVM engine's pager runs (uffd_*_same_cpu and uffd_*_cross_cpu, reported beside it, pin the two threads to one CPU or to different CPUs)."
    add("HostCosts.userfaultfdZeroPage", "uffd_zero_read", minus: [("first_touch_read", 1)],
        "What userfaultfd adds to a first read: the fault message, the handler's wake-up and UFFDIO_ZEROPAGE, the retry." + placement)
    add("HostCosts.userfaultfdCopy", "uffd_copy_write", minus: [("first_touch", 1)],
        "What userfaultfd adds to a first write: the fault message, the handler's wake-up and UFFDIO_COPY, the retry." + placement)
    // Dirty tracking (the write-protect fault is the reference exit above).
    add("DirtyTrackingCosts.bitmapPerGiB", "bitmap_empty_1gib", "Fixed part of a bitmap harvest per GiB of slot.")
    add("DirtyTrackingCosts.bitmapPerDirtyPage", "bitmap_per_dirty_page", "Per dirty page of a bitmap harvest (copy, scan, re-protect).")
    add("DirtyTrackingCosts.ringPerEntry", "ring_per_entry", "Per entry of a ring harvest plus KVM_RESET_DIRTY_RINGS.")
    add("DirtyTrackingCosts.ringFixed", "ring_empty", "Fixed part of a ring harvest (one vCPU).")
    // Async PF. The guest kernel's handlers run in the VMM here (CPL0 code is emulated), so
    // the model's guest-side handlers are the VMM's handling; the "page ready" latency is what
    // remains of apf_page_ready once the model's own charges on delivery are taken out.
    if m("apf_not_present") != nil {
        add("GuestSchedulingCosts.apfNotPresentHandler", "apf_not_present",
            "The guest kernel's \"page not present\" handler (park the thread on its token, load the next): here the VMM-side scheduler, from the #PF stub's exit to the next thread's entry. The exception delivery before it stays CostModel.guestExceptionRoundTrip, KVM's queueing of the work stays apfSetup (both inherited).")
        add("GuestSchedulingCosts.apfReadyHandler", "apf_ready_handling",
            "The guest kernel's \"page ready\" handler (token, EOI, ACK, wake; the woken thread loaded): here the VMM-side scheduler, from the interrupt stub's exit to the woken thread's entry.")
        if m("wp_fault_after_harvest") != nil {
            add("GuestSchedulingCosts.pageReadyDelay", "apf_ready_to_exit", minus: [("wp_fault_after_harvest", 1)],
                "The page's arrival (UFFDIO_COPY returned) to \"page ready\" reaching the guest kernel, less the exit the model charges on delivery (CostModel.vmExitRoundTrip, the write-protect fault): the model's pageReadyDelay + vmExitRoundTrip + apfReadyHandler then add up to apf_page_ready.")
            add("GuestSchedulingCosts.tickDeliveryDelay", "apf_tick_delivery", minus: [("wp_fault_after_harvest", 1)],
                "A tick's due time to its reaching the guest kernel (hrtimer, the vCPU's exit, the injection, the stub's exit), less the exit the model charges on delivery (CostModel.vmExitRoundTrip): a \"page ready\" that becomes pending in that span is injected first (the higher vector).")
            add("GuestSchedulingCosts.apfFaultLegs", "apf_kvm_legs", minus: [("wp_fault_after_harvest", 1)],
                "The faulting read's own path inside KVM_RUN beyond the shadow fault's exit (CostModel.vmExitRoundTrip, the write-protect fault): the async-PF injection, the #PF stub's exit to the VMM-side guest kernel and the woken thread's entry back to its read (PagerAsyncPF charges it on the faulting thread).")
        }
    }
    // The pager's own lateness in the async-PF phase where there is one (its CPU beside the
    // busy vCPU thread's, as in the async-pf case); else the calibrating thread's ppoll
    // (timer_overshoot, reported beside it: on this host 32-75 us against the pager's ~110 us).
    if m("apf_pager_late") != nil || m("timer_overshoot") != nil {
        let lateName = m("apf_pager_late") != nil ? "apf_pager_late" : "timer_overshoot"
        add("HostCosts.timerWakeLatency", lateName,
            "How late a thread sleeping on a timeout wakes (timer slack, the wake-up of a CPU that may have halted): the userfaultfd pager sleeps so until a page's store delay is over.")
        // Its spread, from the same samples: the model draws each wake-up over median +- half
        // of it (a fixed lateness would lock the model's fault cycle to the guest's timer).
        if let c = costs.last, c.parameter == "HostCosts.timerWakeLatency" {
            costs.append(CalibratedCost(parameter: "HostCosts.timerWakeSpread", medianNanos: c.p90Nanos - c.p10Nanos, p10Nanos: c.p90Nanos - c.p10Nanos,
                                        p90Nanos: c.p90Nanos - c.p10Nanos, samples: c.samples,
                                        method: "\(lateName): its p90 - p10 (\(formatFixed(c.p90Nanos / 1e3, digits: 1)) - \(formatFixed(c.p10Nanos / 1e3, digits: 1)) us) over \(c.samples) samples. How much the wake-up's lateness varies: a model that sleeps so draws each lateness uniformly over timerWakeLatency +- half of it."))
        }
    }
    r.costs = costs
    r.bounds = bounds
    r.omitted = omitted
}

/// The median of `xs` (mean of the middle two for an even count); 0 for none.
func medianOf(_ xs: [Double]) -> Double {
    guard !xs.isEmpty else { return 0 }
    let s = xs.sorted()
    return s.count % 2 == 1 ? s[s.count / 2] : (s[s.count / 2 - 1] + s[s.count / 2]) / 2
}

/// The host while a calibration ran: a reference figure timed in every round (one emulated
/// CPL0 instruction: guest work that no other process's memory traffic touches, so a change
/// of it between runs is a change of the host's speed), steal time, load. Recorded, not used to
/// scale anything.
public struct CalibrationHostConditions: Sendable, Hashable {
    /// The VMM thread's native loop (`host_loop`, ns for the loop): median, lowest and highest
    /// round medians (-1: not measured). Slower with the CPL0 reference in the same rounds:
    /// the host CPU itself was slower, not only the virtualization path.
    public var hostLoopNanos: Double
    public var hostLoopRoundMinNanos: Double
    public var hostLoopRoundMaxNanos: Double
    public var reference: String
    public var referenceNanos: Double
    public var roundMinNanos: Double
    public var roundMaxNanos: Double
    /// Steal time over the run as a percentage of all CPU time (/proc/stat); -1 unreadable.
    public var stealPercent: Double
    /// The 1-minute load average at the start; -1 unreadable.
    public var loadAverage: Double
    public var runSeconds: Double

    public var json: JSONValue {
        .object([("reference", .string(reference)), ("reference_ns", .double((referenceNanos * 10).rounded() / 10)),
                 ("reference_round_min_ns", .double((roundMinNanos * 10).rounded() / 10)),
                 ("reference_round_max_ns", .double((roundMaxNanos * 10).rounded() / 10)),
                 ("steal_percent", .double((stealPercent * 1000).rounded() / 1000)), ("load_average", .double(loadAverage)),
                 ("run_seconds", .double((runSeconds * 10).rounded() / 10)),
                 ("host_loop_ns", .double((hostLoopNanos * 1000).rounded() / 1000)),
                 ("host_loop_round_min_ns", .double((hostLoopRoundMinNanos * 1000).rounded() / 1000)),
                 ("host_loop_round_max_ns", .double((hostLoopRoundMaxNanos * 1000).rounded() / 1000))])
    }

    public var text: String {
        "reference \(reference) \(formatFixed(referenceNanos, digits: 1)) ns (rounds \(formatFixed(roundMinNanos, digits: 1))-\(formatFixed(roundMaxNanos, digits: 1)) ns), host loop \(formatFixed(hostLoopNanos / 1e3, digits: 1)) us (rounds \(formatFixed(hostLoopRoundMinNanos / 1e3, digits: 1))-\(formatFixed(hostLoopRoundMaxNanos / 1e3, digits: 1))), steal \(formatFixed(stealPercent, digits: 2))% of CPU time, load average \(formatFixed(loadAverage, digits: 2)) at the start"
    }
}

/// The "cpu" line of /proc/stat: steal ticks (8th value) and the sum of all.
struct HostStealTime {
    var steal: UInt64
    var total: UInt64

    static func read() -> HostStealTime? {
        guard let f = fopen("/proc/stat", "r") else { return nil }
        defer { fclose(f) }
        var buf = [CChar](repeating: 0, count: 512)
        guard fgets(&buf, Int32(buf.count), f) != nil else { return nil }
        let line = String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        let fields = line.split(separator: " ")
        guard fields.first == "cpu", fields.count >= 9 else { return nil }
        let v = fields.dropFirst().compactMap { UInt64(String($0.filter(\.isNumber))) }
        guard v.count >= 8 else { return nil }
        return HostStealTime(steal: v[7], total: v.prefix(8).reduce(0, +))
    }

    func percent(since a: HostStealTime) -> Double {
        total > a.total ? 100 * Double(steal &- a.steal) / Double(total - a.total) : 0
    }
}
