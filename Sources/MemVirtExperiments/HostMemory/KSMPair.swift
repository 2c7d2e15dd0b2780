import MemVirtCore
import MemVirtGuest
import MemVirtKVM
#if canImport(Glibc)
import Glibc
#endif

/// Two VMs whose guests fill their RAM (marked MADV_MERGEABLE) with the same content, ksmd
/// merging them, then one guest writing merged pages: KSM's saving and its copy-on-write
/// faults, measured on the host's real KSM against an oracle computed from the content.
public struct KSMPairOptions: Sendable {
    /// 4 KiB pages of workload memory per VM.
    public var pagesPerVM = 16384
    /// Page p of every VM draws its kind from a hash of (seed, p): same content in both VMs
    /// and unique within one ("image" pages), one of `duplicateContents` contents (duplicated
    /// inside each VM and across), all zero, or private (this VM only).
    public var sharedFraction = 0.5
    public var duplicateFraction = 0.1
    public var duplicateContents = 64
    public var zeroFraction = 0.1
    public var seed: UInt64 = 3
    /// Pages VM 0 writes after merging (image pages, merged) and as many private pages
    /// (never merged) for the control.
    public var writePages = 1024
    public var tuning = KSMTuning()
    /// How long ksmd may take to merge (and to notice the breaks).
    public var timeoutSeconds = 30.0
    public init() {}
}

/// One timed write pass of VM 0 over a list of pages.
public struct KSMWritePass: Sendable {
    public var pages: Int
    /// Pages of the list mapped to a KSM page just before the writes (/proc/kpageflags), nil
    /// when the kernel does not say.
    public var ksmBefore: Int?
    public var ksmAfter: Int?
    public var nanoseconds: UInt64
    public var pfFixed: UInt64
    public var minorFaults: UInt64
    /// The vCPU's KVM stats over the pass (cumulative ones as deltas).
    public var vcpuStats: [String: UInt64] = [:]
    public var nanosecondsPerPage: Double { pages > 0 ? Double(nanoseconds) / Double(pages) : 0 }

    public var json: JSONValue {
        var kv: [(String, JSONValue)] = [("pages", .int(Int64(pages))), ("ns", .uint(nanoseconds)),
                                         ("ns_per_page", .double(nanosecondsPerPage.rounded())),
                                         ("pf_fixed", .uint(pfFixed)), ("minor_faults", .uint(minorFaults))]
        if let k = ksmBefore { kv.append(("ksm_pages_before", .int(Int64(k)))) }
        if let k = ksmAfter { kv.append(("ksm_pages_after", .int(Int64(k)))) }
        return .object(kv)
    }
}

public struct KSMPairReport: Sendable {
    public var options: KSMPairOptions
    public var oracle: KSMOracle
    public var settingsBefore: KSMSettings
    public var settingsDuring: KSMSettings
    /// Host counters before ksmd ran, once merged, and once the breaks were seen.
    public var countersBefore: KSMCounters
    public var countersMerged: KSMCounters
    public var countersAfterWrites: KSMCounters
    /// This process (both VMs): before, merged, after the writes. nil without /proc/self/ksm_stat.
    public var processBefore: KSMProcessStat?
    public var processMerged: KSMProcessStat?
    public var processAfterWrites: KSMProcessStat?
    public var mergeSeconds: Double
    public var mergeFullScans: Int
    /// True when the measured merging reached the oracle's count.
    public var mergeReachedExpected: Bool
    public var breakSeconds: Double
    public var fillNanosecondsPerPage: Double
    /// Same frame in both VMs for image pages (pagemap PFNs), of those sampled; nil when unreadable.
    public var sameFrameSampled: (Int, Int)?
    public var unmergedWrites: KSMWritePass
    public var mergedWrites: KSMWritePass
    /// ksmd's CPU time over the merge phase (ns, /proc/<ksmd>/schedstat) and pages scanned.
    public var ksmdCPUNanoseconds: UInt64?
    public var pagesScannedInMerge: UInt64?

    /// pages_sharing (host) gained by the merge; with other KSM users on the host, theirs too.
    public var pagesSharingGained: Int64 { Int64(countersMerged.pagesSharing) - Int64(countersBefore.pagesSharing) }
    public var pagesSharedGained: Int64 { Int64(countersMerged.pagesShared) - Int64(countersBefore.pagesShared) }
    /// This process's merged pages (shared + sharing), the measure tests rely on.
    public var mergingPages: Int64? {
        guard let a = processBefore, let b = processMerged else { return nil }
        return Int64(b.mergingPages) - Int64(a.mergingPages)
    }
    public var mergingDropAfterWrites: Int64? {
        guard let a = processMerged, let b = processAfterWrites else { return nil }
        return Int64(a.mergingPages) - Int64(b.mergingPages)
    }
    public var pagesSharingDropAfterWrites: Int64 { Int64(countersMerged.pagesSharing) - Int64(countersAfterWrites.pagesSharing) }
}

public enum KSMPair {
    /// Why the experiment cannot run here, or nil.
    public static func unavailableReason() -> String? {
        if access("/dev/kvm", R_OK | W_OK) != 0 { return "/dev/kvm is not usable: \(Errno(rawValue: errno))" }
        return KSM.unavailableReason()
    }

    /// Page p's content id in VM `vm` (0: zero page) and its kind (0 image, 1 duplicate, 2 zero, 3 private).
    public static func content(page p: Int, vm: Int, options o: KSMPairOptions) -> (id: UInt64, kind: Int) {
        var g = SplitMix64(seed: SplitMix64.derive(seed: o.seed, stream: UInt64(p)))
        let u = g.unitDouble()
        func id(_ stream: UInt64, _ x: UInt64) -> UInt64 {
            var h = SplitMix64(seed: SplitMix64.derive(seed: o.seed ^ (stream << 40), stream: x))
            return h.next() | 1
        }
        if u < o.sharedFraction { return (id(1, UInt64(p)), 0) }
        if u < o.sharedFraction + o.duplicateFraction { return (id(2, g.bounded(UInt64(max(1, o.duplicateContents)))), 1) }
        if u < o.sharedFraction + o.duplicateFraction + o.zeroFraction { return (0, 2) }
        return (id(3 + UInt64(vm), UInt64(p)), 3)
    }

    public static func run(_ o: KSMPairOptions) throws(KVMError) -> KSMPairReport {
        try onDedicatedThread(name: "memvirt-ksm") { () throws(KVMError) in try runHere(o) }
    }

    static func runHere(_ o: KSMPairOptions) throws(KVMError) -> KSMPairReport {
        if let why = unavailableReason() { throw KVMError.unavailable(why) }
        guard o.pagesPerVM >= 16, o.writePages >= 1 else { throw KVMError.invalid("KSM pair: at least 16 pages per VM and 1 page written") }
        let pages = o.pagesPerVM
        let kinds = (0..<pages).map { content(page: $0, vm: 0, options: o).kind }
        let image = (0..<pages).filter { kinds[$0] == 0 }
        let privatePages = (0..<pages).filter { kinds[$0] == 3 }
        guard image.count >= o.writePages, privatePages.count >= o.writePages else {
            throw KVMError.invalid("KSM pair: \(o.writePages) pages to write, but only \(image.count) image and \(privatePages.count) private pages")
        }
        let before = try KSM.settings()
        return try KSM.withSession(o.tuning) { (s) throws(KVMError) -> KSMPairReport in
            let r = try measure(o, session: s, settings: before, image: image, privatePages: privatePages)
            // The VMs are gone: let ksmd drop their pages from its counters (it does so when it
            // next visits this process), so the next user's baseline is clean. Best effort:
            // once this process has no mergeable memory left ksmd stops counting full scans.
            let floor = r.processBefore.map { $0.rmapItems ?? $0.mergingPages } ?? 0
            s.waitUntil(timeoutSeconds: 3) { KSM.processStat().map { $0.rmapItems ?? $0.mergingPages } ?? 0 <= floor }
            return r
        }
    }

    static func measure(_ o: KSMPairOptions, session s: KSMSession, settings before: KSMSettings,
                        image: [Int], privatePages: [Int]) throws(KVMError) -> KSMPairReport {
        let kvm = try KVM()
        let pages = o.pagesPerVM
        var c = GuestConfig(dataSize: UInt64(pages) * 4096)
        c.mergeable = true
        c.tableBytesPerVCPU = UInt64(pages) * 8
        c.listCapacity = o.writePages
        let vms = [try GuestVM(kvm: kvm, config: c), try GuestVM(kvm: kvm, config: c)]
        // ksmd now has this process to scan (empty so far): two full scans settle what a
        // process that ended left in the host counters (ksmd drops it only when it next runs).
        _ = try? s.waitForFullScans(2, timeoutSeconds: 5)
        let countersBefore = try KSM.counters()
        let processBefore = KSM.processStat()
        let during = try KSM.settings()

        // The guests fill their memory (first touch of every page: host faults through KVM).
        var fillNs: UInt64 = 0
        for (v, g) in vms.enumerated() {
            let ids = (0..<pages).map { content(page: $0, vm: v, options: o).id }
            try g.runtime.write(array: ids, at: GuestPhysicalAddress(rawValue: g.layout.tables))
            var m = GuestVM.command(MEMVIRT_CMD_FILL_PAGES)
            m.base = g.layout.dataVirtual.rawValue
            m.footprint = UInt64(pages) * 4096
            m.table = g.layout.tables
            m.table_len = UInt64(pages)
            try g.setMailbox(0, m)
            let out = try g.execute(vcpu: 0)
            fillNs += out.endNanos - out.startNanos
        }
        let oracle = try KSMOracle.compute(regions: vms.map { $0.data }, maxPageSharing: before.maxPageSharing ?? 256,
                                           useZeroPages: (before.useZeroPages ?? 0) != 0)

        func merged() -> UInt64 {
            guard let s = KSM.processStat() else { return (try? KSM.counters()).map { $0.pagesShared + $0.pagesSharing } ?? 0 }
            return s.mergingPages + (s.zeroPages ?? 0)
        }
        let base0 = processBefore.map { $0.mergingPages + ($0.zeroPages ?? 0) } ?? (countersBefore.pagesShared + countersBefore.pagesSharing)
        let expectedMerged = oracle.expectedMerging + oracle.expectedZeroPages

        let ksmd = KSMDaemon.find()
        let cpu0 = ksmd?.cpuNanoseconds()
        let wait = try s.waitForMerging(stableScans: 3, timeoutSeconds: o.timeoutSeconds, value: { merged() &- base0 }, done: { $0 >= expectedMerged })
        let cpu1 = ksmd?.cpuNanoseconds()
        let countersMerged = try KSM.counters()
        let processMerged = KSM.processStat()

        // Both VMs map the same frame for image pages (a sample): KSM's merge, seen in pagemap.
        let sample = Array(image.prefix(256))
        var same: (Int, Int)? = nil
        if let a = PageMap.frames(vms[0].data, pages: sample), let b = PageMap.frames(vms[1].data, pages: sample) {
            same = (zip(a, b).filter { $0 != 0 && $0 == $1 }.count, sample.count)
        }

        // VM 0 writes private (unmerged) pages, then merged image pages: the copy-on-write breaks.
        let g = vms[0]
        let unmerged = try writePass(g, pages: Array(privatePages.prefix(o.writePages)))
        let mergedPass = try writePass(g, pages: Array(image.prefix(o.writePages)))
        let t0 = monotonicNanoseconds()
        let mergedAtBreak = merged() &- base0
        let target = mergedAtBreak >= UInt64(o.writePages) ? mergedAtBreak - UInt64(o.writePages) : 0
        _ = try s.waitForMerging(timeoutSeconds: o.timeoutSeconds, value: { merged() &- base0 }, done: { $0 <= target })
        let breakSeconds = Double(monotonicNanoseconds() - t0) / 1e9
        let countersAfter = try KSM.counters()
        let processAfter = KSM.processStat()
        var pagesScanned: UInt64? = nil
        if let a = countersBefore.pagesScanned, let b = countersMerged.pagesScanned { pagesScanned = b &- a }
        return KSMPairReport(
            options: o, oracle: oracle, settingsBefore: before, settingsDuring: during,
            countersBefore: countersBefore, countersMerged: countersMerged, countersAfterWrites: countersAfter,
            processBefore: processBefore, processMerged: processMerged, processAfterWrites: processAfter,
            mergeSeconds: wait.seconds, mergeFullScans: wait.scans, mergeReachedExpected: wait.done,
            breakSeconds: breakSeconds, fillNanosecondsPerPage: Double(fillNs) / Double(2 * pages),
            sameFrameSampled: same, unmergedWrites: unmerged, mergedWrites: mergedPass,
            ksmdCPUNanoseconds: cpu0.flatMap { a in cpu1.map { $0 &- a } }, pagesScannedInMerge: pagesScanned)
    }

    /// VM 0's guest writes word 0 of each page (WRITE_LIST_MARKED): the time between its two
    /// marks, the vCPU's pf_fixed and the process's minor faults over the pass.
    static func writePass(_ g: GuestVM, pages: [Int]) throws(KVMError) -> KSMWritePass {
        let gvas = pages.map { g.layout.dataVirtual.rawValue + UInt64($0) * 4096 }
        try g.runtime.write(array: gvas, at: GuestPhysicalAddress(rawValue: g.layout.list))
        var m = GuestVM.command(MEMVIRT_CMD_WRITE_LIST_MARKED)
        m.list = g.layout.list
        m.list_len = UInt64(gvas.count)
        m.salt = 0x5EED_0000_0000_0000
        try g.setMailbox(0, m)
        let ksmBefore = PageMap.ksmCount(g.data, pages: pages)
        let stats = try g.vcpus[0].stats()
        let s0 = try stats.read()
        let u0 = ProcessUsage.now()
        let out = try g.execute(vcpu: 0)
        let u1 = ProcessUsage.now()
        let s1 = try stats.read()
        guard out.marks.count == 2 else { throw KVMError.invalid("write pass: expected 2 marks, got \(out.marks.count)") }
        return KSMWritePass(pages: pages.count, ksmBefore: ksmBefore, ksmAfter: PageMap.ksmCount(g.data, pages: pages),
                            nanoseconds: out.marks[1] - out.marks[0], pfFixed: s1["pf_fixed"] &- s0["pf_fixed"],
                            minorFaults: u1.minorFaults &- u0.minorFaults, vcpuStats: s1.delta(since: s0, descriptors: stats.descriptors).values)
    }
}
