import MemVirtCore

/// A swap device: positioning latency per request, transfer bandwidth, requests served in
/// parallel. Times in nanoseconds, bandwidth in bytes per nanosecond (= GB/s).
public struct SwapDeviceModel: Sendable, Hashable {
    public var name: String
    /// Time from the start of service of a 4 KiB read until its data can be transferred (ns).
    public var readLatency: Double
    /// The same for one 4 KiB write (ns): swap writes are clustered (see the presets).
    public var writeLatency: Double
    /// Transfer bandwidth, bytes per ns (1.0 = 1 GB/s).
    public var bandwidth: Double
    /// Requests in service at once (a disk has one actuator; an SSD has channels).
    public var queueDepth: Int

    public init(name: String, readLatency: Double, writeLatency: Double, bandwidth: Double, queueDepth: Int) {
        self.name = name
        self.readLatency = readLatency
        self.writeLatency = writeLatency
        self.bandwidth = bandwidth
        self.queueDepth = queueDepth
    }

    /// A 7,200 rpm SATA disk of the seed's time (2010). Seagate Barracuda 7200.12 data sheet
    /// (2009): average rotational latency 4.16 ms, track-to-track seek 0.8 ms, sustained
    /// 125 MB/s. The swap area is a small region of the disk, so seeks between swap slots are
    /// short: a random 4 KiB read costs about track-to-track + half a turn ≈ 5 ms. Writes:
    /// Linux allocates swap slots sequentially (scan_swap_map, SWAPFILE_CLUSTER = 256) and
    /// reclaim writes SWAP_CLUSTER_MAX = 32 pages at a time, which the block layer merges into
    /// one request: one positioning per 32 pages, 5 ms / 32 ≈ 0.16 ms per page. One actuator:
    /// queue depth 1 (NCQ reorders but does not overlap seeks).
    public static let hdd = SwapDeviceModel(name: "hdd-7200rpm", readLatency: 5_000_000, writeLatency: 160_000, bandwidth: 0.125, queueDepth: 1)

    /// A SATA SSD of 2009 (Intel X25-M G2 data sheet: read latency 65 us, write latency 85 us,
    /// 250 MB/s read; 10 flash channels, so about 10 requests in service at once).
    public static let sataSSD = SwapDeviceModel(name: "sata-ssd", readLatency: 65_000, writeLatency: 85_000, bandwidth: 0.25, queueDepth: 10)

    /// A PCIe 4 NVMe SSD (Samsung 980 PRO data sheet class: ~50-70 us 4 KiB random read at
    /// queue depth 1, 3.5 GB/s; deep internal parallelism, 32 requests in service).
    public static let nvme = SwapDeviceModel(name: "nvme", readLatency: 60_000, writeLatency: 20_000, bandwidth: 3.5, queueDepth: 32)

    /// The same device shape with another read latency (the sweep).
    public func withReadLatency(_ ns: Double) -> SwapDeviceModel {
        var m = self
        m.readLatency = ns
        m.name = "\(name)@\(formatFixed(ns / 1000, digits: 0))us"
        return m
    }
}

/// What the host kernel and KVM spend on host-memory events, in cycles of the core clock of
/// the `CostModel` in use. Every number is a named parameter with its source or derivation.
public struct HostCosts: Sendable, Hashable {
    /// Mapping a page found in the swap cache (lookup_swap_cache + do_swap_page without I/O,
    /// then the EPT entry): ~1,500 cycles, the same order as a minor anonymous fault without
    /// the clear (will-it-scale page_fault2-style numbers, ~0.5 us).
    public var swapCacheHit: Double = 1_500
    /// Starting a swap-in: get_user_pages slow path, swap_readpage, bio submission: ~5,000
    /// cycles (~1.7 us; blktrace Q-to-D on a quiet disk is a few us).
    public var swapInSubmit: Double = 5_000
    /// Reclaim work per page scanned by the clock (page_referenced through the rmap and the
    /// mmu notifier's clear_young into KVM's kvm_age_gfn): ~1,000 cycles.
    public var reclaimScan: Double = 1_000
    /// Evicting one page: try_to_unmap (mmu notifier invalidate into KVM's zap), add_to_swap,
    /// pageout submission: ~4,000 cycles.
    public var reclaimEvict: Double = 4_000
    /// kvm_flush_remote_tlbs from the initiator: IPIs to the vCPUs in guest mode and waiting for
    /// them: ~6,000 cycles (~2 us; x86 IPI round trips are 1-2 us on servers).
    public var remoteFlushInitiator: Double = 6_000
    /// A vCPU interrupted by that flush: one exit and INVEPT on re-entry, ~1,500 cycles.
    public var remoteFlushTarget: Double = 1_500
    /// Copying a 4 KiB page in the host (KSM copy-on-write break): ~400 cycles at ~30 GB/s.
    public var pageCopy: Double = 400
    /// Serving a missing page with UFFDIO_ZEROPAGE, from the fault's wake-up of the handler
    /// thread to the faulting thread's resumption: ~3 us ≈ 9,000 cycles (estimate; a
    /// userfaultfd round trip is a context switch each way plus the ioctl). Not yet charged.
    public var userfaultfdZeroPage: Double = 9_000
    /// The same with UFFDIO_COPY of 4 KiB: the zero-page path plus the copy, ~10,000 cycles
    /// (estimate). Not yet charged.
    public var userfaultfdCopy: Double = 10_000
    /// Evicting one page with MADV_DONTNEED (zap the PTE, the mmu notifier's zap of KVM's spte,
    /// free the page, the TLB flush amortized over a batch): ~1,000 cycles (estimate). Not
    /// yet charged.
    public var dontneedPerPage: Double = 1_000
    /// The userfaultfd pager's write of one evicted 4 KiB page to its store (pwrite into an
    /// O_TMPFILE's page cache): ~3,800 cycles (1.24-1.30 us median at 3 GHz: measured on this
    /// host, 2026-12-04, 8,192 random-offset 4 KiB pwrite(2) rewrites of an O_TMPFILE in /tmp
    /// (ext4), CLOCK_MONOTONIC around each call; `memvirt validate`'s pager case reports the
    /// pager's own time per write beside it). `kvm calibrate` measures it (store_write).
    public var storeWritePerPage: Double = 3_800
    /// The pager's read of one 4 KiB page back from its store (pread from the page cache):
    /// ~2,500 cycles (0.72-0.94 us median at 3 GHz, the same measurement). `kvm calibrate`
    /// measures it (store_read).
    public var storeReadPerPage: Double = 2_500
    /// How late a thread sleeping on a timeout wakes (ppoll/nanosleep: hrtimer expiry plus the
    /// thread's timer slack, 50 us by default for SCHED_OTHER (prctl(2) PR_SET_TIMERSLACK), plus
    /// its wake-up on a CPU that may have halted), nanoseconds. The pager sleeps on one until
    /// a page's store delay is over. Default: the default slack, 50,000 ns. `kvm calibrate`
    /// measures it (timer_overshoot).
    public var timerWakeLatency: Double = 50_000
    /// How much that lateness varies, nanoseconds: the width between its 10th and 90th
    /// percentiles. A model that sleeps so draws each lateness uniformly over
    /// `timerWakeLatency` +- half of it (0: always the median). Default 0. `kvm calibrate`
    /// measures it (timer_overshoot's p90 - p10).
    public var timerWakeSpread: Double = 0

    // KSM (Documentation/admin-guide/mm/ksm.rst defaults: pages_to_scan 100, sleep_millisecs 20).
    /// Pages ksmd looks at per wake-up.
    public var ksmPagesToScan: Int = 100
    /// ksmd sleep between scans, ns.
    public var ksmSleep: Double = 20_000_000
    /// ksmd per page scanned: jhash2 over 4 KiB (~1 us) plus tree look-ups: ~3,500 cycles.
    public var ksmScanPerPage: Double = 3_500
    /// ksmd per merge: memcmp against the candidate, write-protect, replace the mapping, free a
    /// page: ~6,000 cycles.
    public var ksmMerge: Double = 6_000

    public init() {}
}

/// The guest kernel's costs beyond `CostModel`, for scheduling and async page faults (cycles).
public struct GuestSchedulingCosts: Sendable, Hashable {
    /// A guest context switch (schedule(), switch_to, no CR3 write between threads of one
    /// process): ~3,000 cycles (~1 us; lmbench lat_ctx 2p/0K reports 1-2 us on Linux).
    public var contextSwitch: Double = 3_000
    /// One guest timer tick: the LAPIC timer interrupt is injected by KVM (an exit to re-arm the
    /// hrtimer and one for the EOI before APICv/posted timers: 2 x vmExitRoundTrip, charged as
    /// hypervisor time) plus ~1,500 cycles of tick handler (update_process_times, scheduler_tick).
    public var tickHandler: Double = 1_500
    public var tickExits: Double = 2
    /// "Page not present": the #PF is injected on the re-entry that ends the EPT-violation exit;
    /// kvm_setup_async_pf queues the work item (~2,000 cycles of hypervisor time).
    public var apfSetup: Double = 2_000
    /// The guest's APF handler (do_async_page_fault: read the reason from the shared area,
    /// insert the token in the sleep hash, schedule away): exception delivery (CostModel's
    /// guestExceptionRoundTrip) plus ~1,500 cycles.
    public var apfNotPresentHandler: Double = 1_500
    /// "Page ready": injecting it costs a kick of the vCPU (an exit, vmExitRoundTrip) and the
    /// guest's handler (find the token, wake the sleeper): ~2,000 cycles.
    public var apfReadyHandler: Double = 2_000
    /// Time from the end of the swap-in I/O until "page ready" is injected: KVM's async worker
    /// wakes (workqueue), finishes get_user_pages, kvm_arch_async_page_ready prefaults the
    /// EPT entry and kicks the vCPU: ~20 us on bare-metal VMX. (On our kvm_pvm hosts the
    /// measured delay is 100-190 us, docs/references.md, Measured on our hosts, because CPL0
    /// guest code is emulated there.)
    public var pageReadyDelay: Double = 20_000
    /// The faulting read's own path inside KVM_RUN beyond the shadow fault's exit
    /// (vmExitRoundTrip + shadowFaultHandler), apfSetup and the exception's delivery: with a
    /// guest kernel whose handlers run in the VMM (this project's `GuestKernel`, because
    /// kvm_pvm emulates CPL0 code) the #PF stub's emulated instructions, its `out` to the VMM
    /// and the woken thread's entry back to its read. 0 for a guest kernel whose #PF handler
    /// runs in the guest (no further exit). `kvm calibrate` measures it (apf_kvm_legs minus
    /// wp_fault_after_harvest).
    public var apfFaultLegs: Double = 0
    /// From a guest timer tick's due time until it reaches the guest kernel, beyond the exit
    /// charged on delivery (vmExitRoundTrip): the hrtimer, the kick out of guest mode, the
    /// injection, nanoseconds. A "page ready" that becomes pending in that span is injected
    /// first (vector 33 above the timer's 32), so the tick lands after it. Default 0 (the tick
    /// at its due time). `kvm calibrate` measures it (apf_tick_delivery minus
    /// wp_fault_after_harvest).
    public var tickDeliveryDelay: Double = 0
    /// A vCPU that halts with nothing to run (HLT exit) and is woken by an interrupt:
    /// ~2 x vmExitRoundTrip of hypervisor time (charged on wake-up).
    public var haltWakeExits: Double = 2
    public init() {}
}

/// Linux CFS as in 2.6.32-2.6.36 (kernel/sched_fair.c), the guest kernels of the seed's time.
public struct GuestSchedulerParameters: Sendable, Hashable {
    /// sysctl_sched_latency: 6 ms x (1 + ilog2(ncpus)) = 18 ms for 4 CPUs, in ns.
    public var latency: Double = 18_000_000
    /// sysctl_sched_min_granularity: 0.75 ms x 3 = 2.25 ms.
    public var minGranularity: Double = 2_250_000
    /// sysctl_sched_wakeup_granularity: 1 ms x 3 = 3 ms.
    public var wakeupGranularity: Double = 3_000_000
    /// The tick: CONFIG_HZ=1000 (Fedora/RHEL kernels of 2010), NOHZ when idle.
    public var tickPeriod: Double = 1_000_000
    public init() {}

    /// Scales the CFS tunables for `cpus` CPUs as the kernel does (factor 1 + ilog2(min(n, 8))).
    public static func forCPUs(_ cpus: Int) -> GuestSchedulerParameters {
        var p = GuestSchedulerParameters()
        var l = 0
        var n = min(max(cpus, 1), 8)
        while n > 1 { n >>= 1; l += 1 }
        let f = Double(1 + l)
        p.latency = 6_000_000 * f
        p.minGranularity = 750_000 * f
        p.wakeupGranularity = 1_000_000 * f
        return p
    }
}
