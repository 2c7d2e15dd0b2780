import MemVirtCore
import MemVirtGuest
import MemVirtKVM
import MemVirtModel

/// The host-memory cases of `memvirt validate` (issue 11): guest RAM behind a resident limit
/// served by a userfaultfd pager, async page faults under that pager, KSM copy-on-write breaks.
public enum HostCase: Sendable, Hashable {
    /// The KVM engine's userfaultfd pager (MemVirtKVM/Memory/Pager.swift) with at most
    /// `residentPages` data pages resident, FIFO eviction by MADV_DONTNEED; the model's
    /// `ShadowResidentPager` with the same limit and order under its shadow MMU.
    case pager(residentPages: Int)
    /// KSM copy-on-write breaks: two VMs (`KSMPair`) fill `pagesPerVM` pages each with the
    /// same content mix, the host's ksmd merges them, then VM 0 writes `writePages` private
    /// pages and as many merged image pages (the measured pass). The model fills the same
    /// content into one shadow-paged guest's two halves, merges them with `ShadowKSM`, and
    /// runs the same two write passes.
    case ksm(pagesPerVM: Int, writePages: Int)
    /// Async page faults under the pager (`AsyncPFBenchmark`): one vCPU, the guest kernel with
    /// APF on, a faulting thread (uniform reads over 4x the resident limit, pages served by the
    /// pager from a store with a service time) and a working thread, for `seconds`; the model's
    /// `PagerAsyncPF` of the same case (shadow paging, the pager's FIFO, KVM's async PF, the
    /// guest kernel's round-robin on its timer).
    case asyncPF(seconds: Double, residentLimit: UInt64, storeDelayNanos: UInt64)
}

/// Counters the host cases add beside KVM's stats (the pager's own, named as in its report).
enum HostCaseStats {
    /// userfaultfd faults served (zero fills + store reads; the KVM pager's duplicate
    /// messages for one fault, which it only wakes, are not counted).
    static let served = "userfaultfd_served"
    /// Pages written to the store and dropped with MADV_DONTNEED.
    static let evictions = "evictions"
    /// Faults on evicted pages (store reads).
    static let refaults = "refaults"
    /// Pages of the written list mapped on a KSM page before the writes (KVM: /proc/kpageflags).
    static let ksmPagesWritten = "ksm_pages_written"
    /// Copy-on-write breaks (KVM: KSM pages among the written before the pass minus after).
    static let cowBreaks = "cow_breaks"
    /// pf_fixed of the control pass over unmerged pages (none expected: their sptes stay writable).
    static let unmergedPfFixed = "unmerged_pf_fixed"
    /// Async PF: "page not present" and "page ready" events, the faulting thread's reads.
    static let apfNotPresent = "apf_not_present"
    static let apfReady = "apf_ready"
    static let faultingReads = "faulting_reads"
    /// The pager thread's time (microseconds, sums over the phase): its pwrite of evicted
    /// pages to the store, their MADV_DONTNEED, its pread of stored pages; and the rest of the
    /// phase's time (the guest's elapsed time less those three: exits, userfaultfd round trips,
    /// UFFDIO_COPY, the guest). Model: the same costs as charged.
    static let storeWriteMicros = "pager_store_write_us"
    static let dontneedMicros = "pager_dontneed_us"
    static let storeReadMicros = "pager_store_read_us"
    static let restMicros = "pager_rest_us"
    /// Async PF (microseconds, sums): threads parked ("page not present" to "page ready"
    /// handled), a woken thread's run to its next "page not present", the faulting thread's
    /// time on the vCPU; timer ticks.
    static let parkedMicros = "apf_parked_us"
    static let runToFaultMicros = "apf_run_to_fault_us"
    static let faultingThreadMicros = "faulting_thread_us"
    static let timerTicks = "timer_ticks"
}

extension ValidationCase {
    /// The host-memory cases. `quick`: 4 MiB behind a 2 MiB limit; else 16 MiB behind 8 MiB.
    public static func hostCases(quick: Bool) -> [ValidationCase] {
        let footprint: ByteCount = quick ? .mib(4) : .mib(16)
        let accesses: UInt64 = quick ? 20_000 : 200_000
        let pagerSpec = WorkloadSpec(pattern: .uniform, footprint: footprint, accesses: accesses, writeRatio: 0.3, seed: 11)
        return [
            ValidationCase(name: "pager-resident-limit", spec: pagerSpec, kind: .host(.pager(residentPages: Int(footprint.rawValue / 4096 / 2)))),
            // The spec only names the case's size (both VMs' memory); the passes are KSMPair's.
            ValidationCase(name: "ksm-cow-breaks", spec: WorkloadSpec(pattern: .sequential, footprint: .kib(quick ? 8 * 1024 : 32 * 1024), accesses: quick ? 256 : 1024, writeRatio: 1, seed: 3),
                           kind: .host(.ksm(pagesPerVM: quick ? 1024 : 4096, writePages: quick ? 128 : 512))),
            // The spec names the case's memory (4x the limit); the threads are AsyncPFBenchmark's.
            ValidationCase(name: "async-pf-pager", spec: WorkloadSpec(pattern: .uniform, footprint: .mib(quick ? 4 : 8), accesses: 1, seed: 1),
                           kind: .host(.asyncPF(seconds: quick ? 2 : 5, residentLimit: quick ? 1 << 20 : 2 << 20, storeDelayNanos: 1_000_000))),
        ]
    }

    /// Counters of this case that are shown and not judged, with the reason.
    var timingDependent: [String: String] {
        switch kind {
        case .host(.pager), .host(.ksm): [:]
        case .host(.asyncPF):
            Dictionary(uniqueKeysWithValues: Validation.deterministic.map {
                ($0, "the case runs for a fixed time: how many faults happen in it depends on the store's service time, when KVM's async worker and the pager thread get a core, and the guest timer")
            })
        default: [:]
        }
    }

    /// The case's own counters (beyond KVM's stats) that are judged.
    var judgedExtras: Set<String> {
        switch kind {
        case .host(.pager): [HostCaseStats.served, HostCaseStats.evictions, HostCaseStats.refaults]
        case .host(.ksm): [HostCaseStats.ksmPagesWritten, HostCaseStats.cowBreaks]
        default: []
        }
    }
}

enum ValidationHostCases {
    /// Runs `c` on both engines.
    /// `states`: the round's calibration at the host's two speeds; the KSM case (one short pass,
    /// priced like the workload cases) is bracketed by the CPL0 reference and priced at its
    /// share of the slow state between them.
    static func run(_ c: ValidationCase, _ h: HostCase, machine: ReproductionMachine, states: HostStateMachines? = nil) throws -> (ModelSide, KVMSide) {
        switch h {
        case .pager(let resident):
            var o = KVMRunOptions()
            o.residentLimit = UInt64(resident) * 4096
            let r = try kvmRun(c) { try KVMRunner.run(c.spec, options: o) }
            var kvm = ValidationEngines.kvmSide(r)
            // Measured: the guest's elapsed time of the phase (wall), what the model's
            // latencies add up to (see `note`), not the process's CPU time.
            kvm.seconds = kvm.wallSeconds
            guard let p = r.pager else { throw InputError("validate: case \(c.name): the KVM run reported no pager") }
            let ph = p.phases
            let pagerMicros = (ph.storeWriteNanos + ph.dontneedNanos + ph.storeReadNanos) / 1000
            kvm.extra = [HostCaseStats.served: p.zeroFills + p.storeReads, HostCaseStats.evictions: p.evictions, HostCaseStats.refaults: p.storeReads,
                         HostCaseStats.storeWriteMicros: ph.storeWriteNanos / 1000, HostCaseStats.dontneedMicros: ph.dontneedNanos / 1000,
                         HostCaseStats.storeReadMicros: ph.storeReadNanos / 1000,
                         HostCaseStats.restMicros: UInt64(max(0, kvm.wallSeconds * 1e6 - Double(pagerMicros)))]
            let model = try runPagerModel(c, residentPages: resident, machine: machine)
            return (model, kvm)
        case .ksm(let pages, let writes):
            var o = KSMPairOptions()
            o.pagesPerVM = pages
            o.writePages = writes
            if let why = KSMPair.unavailableReason() { throw InputError("validate: case \(c.name): \(why)") }
            let (r, bracket) = try kvmRun(c) { try HostSpeedBracket.around { try KSMPair.run(o) } }
            let pass = r.mergedWrites
            var kvm = KVMSide(counters: pass.vcpuStats, seconds: Double(pass.nanoseconds) / 1e9, wallSeconds: Double(pass.nanoseconds) / 1e9,
                              readSum: 0, dirtyPages: nil, userspaceExits: 0)
            kvm.counters[Counter.hostMinorFaults.name] = pass.minorFaults
            kvm.extra[HostCaseStats.unmergedPfFixed] = r.unmergedWrites.pfFixed
            if let before = pass.ksmBefore, let after = pass.ksmAfter {
                kvm.extra[HostCaseStats.ksmPagesWritten] = UInt64(before)
                kvm.extra[HostCaseStats.cowBreaks] = UInt64(max(0, before - after))
            }
            kvm.hostSpeed = bracket
            let sharing = r.settingsBefore.maxPageSharing ?? 256
            if let st = states, let b = bracket {
                let share = st.slowShare(b)
                kvm.slowShare = share
                return (try st.priced(share: share) { try runKSMModel(c, options: o, maxPageSharing: sharing, machine: $0) }, kvm)
            }
            let model = try runKSMModel(c, options: o, maxPageSharing: sharing, machine: machine)
            return (model, kvm)
        case .asyncPF(let seconds, let limit, let delay):
            var a = AsyncPFCase()
            a.vcpus = 1
            a.seconds = seconds
            a.residentLimit = limit
            a.memoryMultiple = max(1, c.spec.footprint.rawValue / limit)
            a.storeDelayNanos = delay
            a.asyncPF = true
            let r = try kvmRun(c) { try AsyncPFBenchmark.run(a) }
            guard r.mismatches == 0 else { throw InputError("validate: case \(c.name): the faulting thread read \(r.mismatches) words that differ from the store's") }
            let kvmReads = r.faultingReads.reduce(0, +)
            var kvm = KVMSide(counters: r.vcpuStats.values, seconds: r.wallSeconds, wallSeconds: r.wallSeconds, readSum: 0, dirtyPages: nil, userspaceExits: 0)
            let sched = r.schedulers[0]
            kvm.extra = [HostCaseStats.apfNotPresent: r.notPresent, HostCaseStats.apfReady: r.ready, HostCaseStats.refaults: r.pager.storeReads,
                         HostCaseStats.faultingReads: kvmReads, HostCaseStats.evictions: r.pager.evictions,
                         HostCaseStats.parkedMicros: sched.parkedNanos / 1000, HostCaseStats.runToFaultMicros: sched.runToFaultNanos / 1000,
                         HostCaseStats.faultingThreadMicros: (sched.threadNanos[1] ?? 0) / 1000, HostCaseStats.timerTicks: sched.timerTicks]
            let m = try PagerAsyncPF.run(pagerAsyncPFConfig(a, machine: machine, seconds: seconds))
            // The prediction: the simulated time the model's faulting thread needs for KVM's
            // count of faulting reads, at the model's rate over the case's fixed time.
            let predicted = m.reads > 0 ? Double(kvmReads) / Double(m.reads) * m.simulatedNanos / 1e9 : 0
            var counters = CounterSet(applicable: [.pfFixed, .pfTaken, .apfNotPresent, .apfReady])
            // pf_taken: the faults that went async and the shadow faults on resident pages;
            // pf_fixed: the prefaults of "page ready" (kvm_arch_async_page_ready) and those.
            counters[.pfTaken] = m.notPresent + m.shadowFaults
            counters[.pfFixed] = m.ready + m.shadowFaults
            counters[.apfNotPresent] = m.notPresent
            counters[.apfReady] = m.ready
            let ghz = machine.costs.clockGHz
            let model = ModelSide(counters: counters, cycles: predicted * ghz * 1e9, seconds: predicted, readSum: 0, dirtyPages: nil,
                                  breakdown: [("faulting_thread", m.faultingNanos * ghz), ("working_thread", m.workingNanos * ghz),
                                              ("hypervisor", m.hypervisorNanos * ghz), ("guest_kernel", m.guestKernelNanos * ghz)],
                                  extra: [(HostCaseStats.apfNotPresent, m.notPresent), (HostCaseStats.apfReady, m.ready), (HostCaseStats.refaults, m.storeReads),
                                          (HostCaseStats.faultingReads, m.reads), (HostCaseStats.evictions, m.evictions),
                                          (HostCaseStats.parkedMicros, UInt64(m.parkedNanos / 1000)), (HostCaseStats.runToFaultMicros, UInt64(m.runToFaultNanos / 1000)),
                                          (HostCaseStats.faultingThreadMicros, UInt64(m.faultingNanos / 1000)), (HostCaseStats.timerTicks, m.ticks)])
            return (model, kvm)
        }
    }

    /// Runs a KVM engine's case, its failure named with the case.
    static func kvmRun<T>(_ c: ValidationCase, _ body: () throws -> T) throws -> T {
        do { return try body() } catch { throw InputError("validate: case \(c.name): the KVM run failed: \(error)") }
    }

    /// The model's shadow-paged machine of the host cases (the profile's costs and TLBs).
    static func shadowConfig(_ machine: ReproductionMachine, hostZeroPage: Bool) -> ModelConfig {
        var config = ModelConfig()
        config.paging = .shadow
        config.costs = machine.costs
        config.tlb = machine.tlb
        config.shadow.hostZeroPage = hostZeroPage
        return config
    }

    /// `body` on a shadow-paged model machine of `config`.
    static func withShadowMachine(_ config: ModelConfig, capacity: UInt64, _ body: @escaping (Machine<ShadowPaging>) throws -> ModelSide) throws -> ModelSide {
        try ModelEngine.withMachine(config: config, capacity: capacity, MachineBody { r in
            guard let m = r as? Machine<ShadowPaging> else { throw InputError("validate: the model machine is not shadow-paged") }
            return try body(m)
        })
    }

    /// The model's side of a case from its machine's ledger (cycles at the profile's clock).
    static func modelSide(_ m: Machine<ShadowPaging>, _ counters: CounterSet, readSum: UInt64, extra: [(String, UInt64)]) -> ModelSide {
        let cycles = m.cpu.ledger.total
        return ModelSide(counters: counters, cycles: cycles, seconds: cycles / (m.cpu.costs.clockGHz * 1e9), readSum: readSum,
                         dirtyPages: nil, breakdown: m.cpu.ledger.breakdown, extra: extra)
    }

    /// The async-PF case for `PagerAsyncPF`: the KVM case's memory, limit (full from the
    /// start), store delay, time slice and the faulting thread's PRNG (the guest's
    /// memvirt_bounded from the same state: the model reads the same words); the profile's costs.
    static func pagerAsyncPFConfig(_ a: AsyncPFCase, machine: ReproductionMachine, seconds: Double) -> PagerAsyncPFConfig {
        var mc = PagerAsyncPFConfig(pages: Int(a.residentLimit * a.memoryMultiple / 4096), residentPages: Int(a.residentLimit / 4096),
                                    storeDelay: Double(a.storeDelayNanos), timeSlice: Double(a.timeSliceNanos), duration: seconds * 1e9, costs: machine.costs)
        mc.startFull = a.startFull
        mc.rngState = SplitMix64.derive(seed: a.seed, stream: 0)
        mc.bounded = { s, n in memvirt_bounded(&s, n) }
        mc.guestCosts = machine.scheduling
        mc.hostCosts = machine.host
        return mc
    }

    /// The model's KSM case: VM 0's and VM 1's memory as the two halves of one shadow-paged
    /// guest's data (the host merges across VMs; its pages are the same), prebuilt tables, each
    /// page written once (its first touch, as FILL_PAGES) and filled with KSMPair's content
    /// (`memvirt_fill_word`, the guest's own function), one ksmd merge over all of it, then VM
    /// 0's two write passes (one word per page, as WRITE_LIST_MARKED): private pages, then
    /// merged image pages, the measured one.
    static func runKSMModel(_ c: ValidationCase, options o: KSMPairOptions, maxPageSharing: Int, machine: ReproductionMachine) throws -> ModelSide {
        let config = shadowConfig(machine, hostZeroPage: true)
        let pages = o.pagesPerVM
        var vc = c
        vc.spec = WorkloadSpec(pattern: .sequential, footprint: ByteCount(UInt64(2 * pages) * 4096), accesses: 1, seed: o.seed)
        let capacity = modelCapacity(vc.spec)
        let kinds = (0..<pages).map { KSMPair.content(page: $0, vm: 0, options: o).kind }
        let image = Array((0..<pages).filter { kinds[$0] == 0 }.prefix(o.writePages))
        let privatePages = Array((0..<pages).filter { kinds[$0] == 3 }.prefix(o.writePages))
        return try withShadowMachine(config, capacity: capacity) { m in
            let gfns = try buildPrebuiltTables(m, vc)
            let base = vc.spec.base.rawValue
            func va(_ vm: Int, _ p: Int) -> GuestVirtualAddress { GuestVirtualAddress(base + UInt64(vm * pages + p) * 4096) }
            for vm in 0..<2 {
                for p in 0..<pages {
                    try m.step(Access(address: va(vm, p), kind: .write))
                    guard let page = m.mode.hostPage(gfn: gfns[vm * pages + p]) else { throw InputError("validate: case \(c.name): page \(p) of VM \(vm) not backed after its write") }
                    let id = KSMPair.content(page: p, vm: vm, options: o).id
                    for k in 0..<UInt64(512) { m.mode.host.write64(page + k * 8, id == 0 ? 0 : memvirt_fill_word(id, k)) }
                }
            }
            let ksm = try ShadowKSM(costs: machine.host, maxPageSharing: maxPageSharing)
            m.mode.attach(ksm: ksm)
            ksm.merge(gfns: gfns, mode: m.mode, cpu: m.cpu)
            m.mode.settle(cpu: m.cpu)
            m.resetStatistics()
            for p in privatePages { try m.step(Access(address: va(0, p), kind: .write)) }
            let unmergedFixed = m.finish()[.pfFixed]
            let sharedBefore = UInt64(image.filter { ksm.isMerged(gfn: gfns[$0]) }.count)
            let breaksBefore = ksm.stats.cowBreaks
            m.mode.settle(cpu: m.cpu)
            m.resetStatistics()
            for p in image { try m.step(Access(address: va(0, p), kind: .write)) }
            let counters = m.finish()
            return modelSide(m, counters, readSum: 0, extra: [(HostCaseStats.ksmPagesWritten, sharedBefore), (HostCaseStats.cowBreaks, ksm.stats.cowBreaks - breaksBefore),
                                     (HostCaseStats.unmergedPfFixed, unmergedFixed)])
        }
    }

    /// The model's pager case: the prebuilt guest tables of the other cases, then every data
    /// frame put under a `ShadowResidentPager` with the KVM run's limit (the KVM pager
    /// registers the data region with userfaultfd before the guest touches it). No host zero
    /// page: a missing page is served by UFFDIO_COPY, read fault or not.
    static func runPagerModel(_ c: ValidationCase, residentPages: Int, machine: ReproductionMachine) throws -> ModelSide {
        let config = shadowConfig(machine, hostZeroPage: false)
        let spec = c.spec
        let capacity = modelCapacity(spec)
        return try withShadowMachine(config, capacity: capacity) { m in
            let dataGfns = try buildPrebuiltTables(m, c)
            let pager = try ShadowResidentPager(guestFrames: Int(capacity >> 12), limitPages: residentPages, costs: machine.host)
            for g in dataGfns { pager.manage(gfn: g) }
            m.mode.attach(pager: pager)
            m.mode.settle(cpu: m.cpu)
            m.resetStatistics()
            var source = GeneratedAccesses(try AccessGenerator(spec: spec, thread: 0), count: spec.accesses)
            try m.run(&source)
            let counters = m.finish()
            let s = pager.stats
            let h = machine.host, us = 1 / (config.costs.clockGHz * 1e3)
            let write = Double(s.evictions) * h.storeWritePerPage * us, dontneed = Double(s.evictions) * h.dontneedPerPage * us
            let read = Double(s.storeReads) * h.storeReadPerPage * us
            let seconds = m.cpu.ledger.total / (config.costs.clockGHz * 1e9)
            return modelSide(m, counters, readSum: m.checksum, extra: [(HostCaseStats.served, s.served), (HostCaseStats.evictions, s.evictions), (HostCaseStats.refaults, s.storeReads),
                                     (HostCaseStats.storeWriteMicros, UInt64(write)), (HostCaseStats.dontneedMicros, UInt64(dontneed)),
                                     (HostCaseStats.storeReadMicros, UInt64(read)),
                                     (HostCaseStats.restMicros, UInt64(max(0, seconds * 1e6 - write - dontneed - read)))])
        }
    }

    /// What the model reproduces for a host case (the mechanisms tried).
    static func modelled(_ h: HostCase) -> String {
        switch h {
        case .pager:
            "ShadowResidentPager: the pager's FIFO resident limit over the data frames, eviction zapping the frame's sptes through the rmap and flushing (kvm_unmap_gfn_range), a re-touch as a new userfaultfd fault and pf_fixed, the fault that evicted retried as stale (is_page_fault_stale), UFFDIO_COPY pages (no host zero page), userfaultfdCopy / dontneedPerPage / storeWritePerPage / storeReadPerPage from the profile, all on the guest's clock (the vCPU waits through each)"
        case .asyncPF:
            "PagerAsyncPF: one vCPU under shadow paging, the faulting thread's reads drawn with the guest's own memvirt_bounded from the same state, the pager's FIFO resident limit (full from the start) evicting one page per fault (storeWritePerPage + dontneedPerPage, and remoteFlushInitiator: the zap's kvm_flush_remote_tlbs kicks the vCPU, which runs the working thread) and reading it back (storeReadPerPage) after the store delay and its late wake-up (timerWakeLatency, drawn over timerWakeSpread), KVM's async PF (kvm_arch_setup_async_pf: apfSetup; kvm_arch_async_page_not_present: exit + guestExceptionRoundTrip + apfNotPresentHandler, and the #PF stub's exit to the VMM-side guest kernel and the woken thread's entry back to its read: apfFaultLegs, the fault reaching the pager at the not-present exit; kvm_arch_async_page_ready prefaulting the spte, pageReadyDelay; kvm_arch_async_page_present: exit + apfReadyHandler, the woken thread run first), and GuestKernel's round-robin on the periodic timer (a tick that takes the vCPU from the faulting thread costs it a whole slice)"
        case .ksm:
            "ShadowKSM: pages of equal content (the guest's own fill function) merged onto read-only KSM pages in groups of at most max_page_sharing, the merge's invalidation zapping their sptes, a write breaking the copy-on-write in the host (wp_page_copy, pageCopy from the profile) and retried as stale, the second fault fixed"
        }
    }

    /// What the case's own rows say about a time miss (nil: nothing beyond the general line).
    static func timeExplanation(_ h: HostCase, _ r: Validation.CaseResult) -> String? {
        func row(_ s: String) -> Validation.Row? { r.rows.first { $0.stat == s } }
        switch h {
        case .pager:
            guard let served = row(HostCaseStats.served), served.kvm > 0 else { return nil }
            var parts: [String] = []
            for (stat, what) in [(HostCaseStats.storeWriteMicros, "store pwrite"), (HostCaseStats.dontneedMicros, "MADV_DONTNEED"),
                                 (HostCaseStats.storeReadMicros, "store pread"), (HostCaseStats.restMicros, "the rest (exits, userfaultfd round trips, UFFDIO_COPY, guest)")] {
                if let x = row(stat) { parts.append("\(what) \(formatFixed(Double(x.kvm) / Double(served.kvm), digits: 2)) us vs \(formatFixed(Double(x.model) / Double(max(served.model, 1)), digits: 2)) us") }
            }
            return "per userfaultfd fault, KVM's elapsed time \(formatFixed(r.measuredSeconds / Double(served.kvm) * 1e6, digits: 1)) us against the model's \(formatFixed(r.predictedSeconds / Double(max(served.model, 1)) * 1e6, digits: 1)) us; by part (KVM: the pager thread's own clock around each call; model: its charges): " + parts.joined(separator: ", ")
        case .ksm:
            guard let breaks = row(HostCaseStats.cowBreaks), breaks.kvm > 0 else { return nil }
            return "KVM's measured time per copy-on-write break \(formatFixed(r.measuredSeconds / Double(breaks.kvm) * 1e6, digits: 1)) us against the model's \(formatFixed(r.predictedSeconds / Double(max(breaks.model, 1)) * 1e6, digits: 1)) us (two exits, two shadow faults and pageCopy each)"
        case .asyncPF(_, _, let delay):
            guard let np = row(HostCaseStats.apfNotPresent), np.kvm > 0, let reads = row(HostCaseStats.faultingReads) else { return nil }
            func perFault(_ stat: String) -> String {
                guard let x = row(stat) else { return "n/a" }
                return "\(formatFixed(Double(x.kvm) / Double(np.kvm) / 1e3, digits: 3)) ms vs \(formatFixed(Double(x.model) / Double(max(np.model, 1)) / 1e3, digits: 3)) ms"
            }
            return "KVM's faulting thread completed \(formatGrouped(reads.kvm)) reads (\(formatGrouped(np.kvm)) page-not-present) against the model's \(formatGrouped(reads.model)) in the same time, store \(formatFixed(Double(delay) / 1e6, digits: 2)) ms; per fault (KVM vs model): parked \(perFault(HostCaseStats.parkedMicros)), run to the next fault \(perFault(HostCaseStats.runToFaultMicros)); the parked time beyond the store's is the page's way back (KVM's async worker, the page-ready interrupt through kvm_pvm's emulated CPL0, the VMM-side handler), which the model charges as pageReadyDelay + exit + apfReadyHandler, and the pager's own path (late wake-up from its store-delay sleep, eviction with the running vCPU's remote TLB flush); a tick due while page ready is being delivered waits behind it (the higher vector) and takes the vCPU from the woken thread for a whole slice: KVM's woken thread is preempted so more often than the model's (docs/validate.md, async PF per fault); when the pager shares the vCPU thread's CPU the kicks are not waited for and some page-ready interrupts wait for the next exit; under host load the pager thread, KVM's worker and the vCPU thread wait for a core"
        }
    }

    /// What is known about a host case, and why.
    static func note(_ h: HostCase, _ c: ValidationCase) -> String {
        switch h {
        case .pager(let resident):
            "Guest data (\(c.spec.footprint)) behind the userfaultfd pager with \(resident) pages (\(ByteCount(UInt64(resident) * 4096))) resident, FIFO, no read-ahead; tables prebuilt as in the other cases (outside the pager). Each eviction's mmu-notifier invalidation runs while the faulting vCPU waits on the pager, so that fault is stale and retried (one more pf_taken and exit than pf_fixed per evicting fault). userfaultfd_served counts zero fills and store reads (the pager's duplicate messages for one fault are only woken, not counted). Time: the guest's elapsed time of the phase (wall, around KVM_RUN), not the process's CPU time: the faulting vCPU sleeps in handle_userfault while the pager thread works, and the calibrated userfaultfd costs (uffd_copy_write) are latencies on the guest's clock that include both threads' wake-ups, which CPU time leaves out while it adds the pager's work to the vCPU's; a user of the VM waits for the elapsed time. pager_*_us: the pager thread's own clock around each pwrite, madvise and pread (summed) beside the model's charges for them; pager_rest_us: the rest of the elapsed time."
        case .asyncPF(let seconds, let limit, let delay):
            "AsyncPFBenchmark: 1 vCPU, the guest kernel with APF on, a faulting thread reading uniformly over \(c.spec.footprint) behind a \(ByteCount(limit)) resident limit (full from the start), the pager's store serving each page after \(formatFixed(Double(delay) / 1e6, digits: 2)) ms, and a working thread, \(formatFixed(seconds, digits: 0)) s. Nothing here is deterministic: the case lasts a fixed time, so every count depends on timing (shown, not judged). Time: the measured phase's wall time beside the simulated time the model needs for KVM's count of faulting reads (the model's rate over the same fixed time). apf_parked_us, apf_run_to_fault_us, faulting_thread_us, timer_ticks: the guest kernel's (VMM-side) scheduler clocks beside the model's."
        case .ksm(let pages, let writes):
            "KSMPair: 2 VMs x \(pages) pages (50% image pages equal in both VMs, 10% duplicates, 10% zero, 30% private), the host's ksmd tuned and run until the oracle's count merged; then VM 0 writes \(writes) private pages (control: unmerged_pf_fixed) and \(writes) merged image pages, the counters and time of that pass. A break: the write exits on the spte the merge zapped, KVM's GUP for write copies the page (wp_page_copy), whose invalidation makes the fault stale (RET_PF_RETRY), and the re-executed write is fixed: pf_taken and exits 2, pf_fixed 1 per page. Measured time: the guest's TSC marks around the pass (wall time, not CPU time). cow_breaks and ksm_pages_written from /proc/kpageflags (missing where unreadable)."
        }
    }

    /// Guest-physical capacity of the model machine for `spec` (whole GiB plus 2 GiB).
    static func modelCapacity(_ spec: WorkloadSpec) -> UInt64 {
        let oneG = PageSize.size1G.bytes
        return ((spec.footprint.rawValue + oneG - 1) / oneG) * oneG + 2 * oneG
    }

    /// The KVM guest runtime's tables, built as `ValidationEngines.runModel` builds them (every
    /// data page mapped P|W|U to its own frame, A and D clear, data frames never touched).
    /// Returns the data gfns.
    static func buildPrebuiltTables(_ m: Machine<ShadowPaging>, _ c: ValidationCase) throws -> [UInt64] {
        let spec = c.spec
        guard spec.threads == 1 else { throw InputError("validate: the model side runs one vCPU (case \(c.name) has \(spec.threads) threads)") }
        let ps = c.pageSize
        guard spec.footprint.rawValue % ps.bytes == 0 else { throw InputError("validate: case \(c.name): footprint is not a multiple of \(ps)") }
        let area = VirtualMemoryArea(start: spec.base.rawValue, end: spec.base.rawValue + spec.footprint.rawValue, pageSize: ps, writable: true)
        try m.kernel.map(area, in: m.space)
        var dataGfns: [UInt64] = []
        var va = area.start
        while va < area.end {
            guard let frame = m.kernel.frames.allocate(ps),
                  m.kernel.installLeaf(va, frame: frame, size: ps, flags: [.present, .writable, .user], space: m.space) else {
                throw InputError("validate: case \(c.name): guest memory exhausted building tables")
            }
            for i in 0..<ps.frames { dataGfns.append((frame >> 12) + i) }
            va += ps.bytes
        }
        return dataGfns
    }
}
