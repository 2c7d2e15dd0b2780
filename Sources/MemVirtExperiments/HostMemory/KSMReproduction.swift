import MemVirtCore
import MemVirtModel
import MemVirtReport

/// `ksm`: several guests booted from the same image share most of their memory's content
/// (the OSDev thread and the KVM literature: KSM merges identical pages copy-on-write and adds
/// faults). Four VMs on one host: each guest's memory is part image pages (the same content in
/// every guest), part zero pages, part private pages; ksmd scans at its default rate
/// (100 pages per 20 ms) while every guest keeps writing to random pages of its memory. What
/// KSM saves (pages_sharing) against the copy-on-write faults the writes then take.
public struct KSMReproduction: Experiment {
    public static let name = "ksm"
    public static let summary = "KSM: memory saved across guests with shared content, against the copy-on-write faults"

    let vms: Int
    let pagesPerVM: UInt64
    let seconds: Int
    let imageShare: Double
    let zeroShare: Double
    /// Pages each guest writes per second (random pages of its memory).
    let writesPerSecond: Double

    public init(quick: Bool) {
        vms = 4
        pagesPerVM = quick ? 1024 : 8192
        seconds = quick ? 6 : 60
        imageShare = 0.6
        zeroShare = 0.2
        writesPerSecond = quick ? 50 : 100
    }

    public func run(progress: @Sendable (String) -> Void) throws -> ExperimentReport {
        var hostCosts = HostCosts()
        // Scan fast enough in the quick run that a few passes complete.
        if pagesPerVM < 4096 { hostCosts.ksmPagesToScan = 100 }
        let guest = ByteCount.mib(max(64, pagesPerVM * 4096 / (1 << 20) + 64))
        let host = try HostMemory(capacity: UInt64(vms) * ((guest.rawValue + (1 << 30) - 1) & ~((1 << 30) - 1)) + (1 << 30), costs: hostCosts)
        var sims: [VMSimulation] = []
        progress("\(Self.name): filling \(vms) guests of \(pagesPerVM) pages")
        for i in 0..<vms {
            var c = VMSimulationConfig()
            c.vcpus = 1
            c.guestMemory = guest
            c.hostLimit = nil
            c.faultThreads = 1
            c.workThreads = 0
            c.faultBuffer = ByteCount(pagesPerVM * 4096)
            c.seed = UInt64(i + 1)
            c.hostCosts = hostCosts
            let sim = try VMSimulation(config: c, host: host)
            let (base, pages) = sim.faultBuffers[0]
            // Page p's content: one word at offset 0 (the rest zero). Image pages have the same
            // word in every guest; zero pages stay zero; private pages differ per guest.
            for p in 0..<pages {
                let kind = Self.kind(page: p, image: imageShare, zero: zeroShare)
                let value: UInt64 = kind == 0 ? 0xA5A5_0000_0000_0000 | p : kind == 1 ? 0 : (UInt64(i + 1) << 48) | p
                try sim.directAccess(va: base + p * 4096, write: true, value: value)
            }
            sims.append(sim)
        }
        let residentBefore = host.residentFrames
        var series = TextTable(title: "Over time (\(vms) guests x \(pagesPerVM) pages, each writing \(formatFixed(writesPerSecond, digits: 0)) random pages/s)",
                               header: ["t (s)", "pages_shared", "pages_sharing", "saved", "resident pages", "cow breaks", "full scans"])
        var points: [JSONValue] = []
        let step = hostCosts.ksmSleep
        let steps = Int(Double(seconds) * 1e9 / step)
        var rng = SplitMix64(seed: 7)
        var writeCredit = 0.0
        var peakSharing: UInt64 = 0
        for s in 1...steps {
            let t = Double(s) * step
            writeCredit += writesPerSecond * step / 1e9
            while writeCredit >= 1 {
                writeCredit -= 1
                for (i, sim) in sims.enumerated() {
                    let (base, pages) = sim.faultBuffers[0]
                    let p = rng.bounded(pages)
                    sim.setClock(vcpu: 0, t)
                    try sim.directAccess(va: base + p * 4096 + 8 * (1 + rng.bounded(511)), write: true, value: rng.next() | UInt64(i + 1))
                }
            }
            host.ksmScan()
            let k = host.ksmStats
            peakSharing = max(peakSharing, k.pagesSharing)
            if s % max(steps / 12, 1) == 0 || s == steps {
                let cow = sims.reduce(0) { $0 + host.stats(owner: $1.nested.ownerIndex).cowBreaks }
                series.add([formatFixed(t / 1e9, digits: 1), formatGrouped(k.pagesShared), formatGrouped(k.pagesSharing),
                            ByteCount(k.pagesSharing * 4096).description, formatGrouped(host.residentFrames), formatGrouped(cow), "\(k.fullScans)"])
                points.append(.object([
                    ("t_seconds", .double(t / 1e9)), ("pages_shared", .uint(k.pagesShared)), ("pages_sharing", .uint(k.pagesSharing)),
                    ("resident_pages", .uint(host.residentFrames)), ("cow_breaks", .uint(cow)), ("full_scans", .uint(k.fullScans)),
                ]))
            }
        }
        let k = host.ksmStats
        let cow = sims.reduce(0) { $0 + host.stats(owner: $1.nested.ownerIndex).cowBreaks }
        // The copy-on-write faults' cost on the vCPUs: hypervisor time of the write phase.
        let hypervisorNs = sims.reduce(0.0) { $0 + $1.timeBuckets(vcpu: 0)[VCPUTime.hypervisor.rawValue] }
        let totalPages = UInt64(vms) * pagesPerVM
        // The most KSM could save: every image page merged across the guests, every zero page into one.
        let images = UInt64((0..<pagesPerVM).filter { Self.kind(page: $0, image: imageShare, zero: zeroShare) == 0 }.count)
        let zeros = UInt64((0..<pagesPerVM).filter { Self.kind(page: $0, image: imageShare, zero: zeroShare) == 1 }.count)
        let ideal = images * UInt64(vms - 1) + (zeros * UInt64(vms) > 0 ? zeros * UInt64(vms) - 1 : 0)
        var summary = TextTable(header: ["", "value"])
        summary.add(["guest pages (all VMs)", formatGrouped(totalPages)])
        summary.add(["resident before KSM", formatGrouped(residentBefore)])
        summary.add(["resident at the end", formatGrouped(host.residentFrames)])
        summary.add(["pages_shared / pages_sharing at the end", "\(formatGrouped(k.pagesShared)) / \(formatGrouped(k.pagesSharing))"])
        summary.add(["saved at the end / at the peak", "\(ByteCount(k.pagesSharing * 4096)) / \(ByteCount(peakSharing * 4096))"])
        summary.add(["upper bound of pages_sharing (all image and zero pages merged)", formatGrouped(ideal)])
        summary.add(["copy-on-write breaks (extra faults)", formatGrouped(cow)])
        summary.add(["ksmd CPU (host thread)", formatFixed(k.cycles / 3e9, digits: 3) + " s over \(seconds) s"])
        summary.add(["vCPU hypervisor time in the write phase", formatFixed(hypervisorNs / 1e6, digits: 2) + " ms"])
        summary.add(["pages scanned / merges / full scans", "\(formatGrouped(k.pagesScanned)) / \(formatGrouped(k.merges)) / \(k.fullScans)"])
        return ExperimentReport(
            name: Self.name, title: Self.summary, tables: [summary, series],
            notes: [
                "Content: \(Int(imageShare * 100))% image pages (same in every guest), \(Int(zeroShare * 100))% zero pages, the rest private. A page is merged only after two looks with the same checksum (ksmd's volatility check), so nothing merges before the second pass.",
                "ksmd defaults (Documentation/admin-guide/mm/ksm.rst): pages_to_scan \(hostCosts.ksmPagesToScan), sleep_millisecs \(Int(hostCosts.ksmSleep / 1e6)): \(Int(Double(hostCosts.ksmPagesToScan) * 1e9 / hostCosts.ksmSleep)) pages/s.",
                "Every write to a merged page is an EPT violation (the KSM page is mapped read-only) and a copy: the extra faults KSM costs. Written pages change content and stay volatile for a pass.",
                "pages_shared / pages_sharing are KSM's sysfs names (not yet MemVirtCore counters).",
            ],
            json: .object([
                ("schema", "memvirt.reproduce/1"), ("name", .string(Self.name)),
                ("vms", .int(Int64(vms))), ("pages_per_vm", .uint(pagesPerVM)), ("simulated_seconds", .int(Int64(seconds))),
                ("pages_shared", .uint(k.pagesShared)), ("pages_sharing", .uint(k.pagesSharing)),
                ("saved_bytes", .uint(k.pagesSharing * 4096)), ("peak_saved_bytes", .uint(peakSharing * 4096)),
                ("resident_pages_before", .uint(residentBefore)), ("resident_pages_after", .uint(host.residentFrames)),
                ("pages_sharing_upper_bound", .uint(ideal)), ("cow_breaks", .uint(cow)), ("ksmd_cycles", .double(k.cycles)), ("full_scans", .uint(k.fullScans)),
                ("series", .array(points)),
            ]))
    }

    /// 0: image page, 1: zero page, 2: private page (by a hash of the page index).
    static func kind(page p: UInt64, image: Double, zero: Double) -> Int {
        var g = SplitMix64(seed: p &* 0x9E37_79B9_7F4A_7C15)
        let u = g.unitDouble()
        return u < image ? 0 : u < image + zero ? 1 : 2
    }
}
