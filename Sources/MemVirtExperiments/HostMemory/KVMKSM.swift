import MemVirtCore
import MemVirtKVM
import MemVirtModel
import MemVirtReport

/// `ksm` on the KVM engine (issue item 7, seed 003: "KSM merges identical pages copy-on-write
/// (and adds faults)"). Two real VMs whose guests fill MADV_MERGEABLE RAM with the same
/// content (half image pages, equal in both VMs; duplicates; zero pages; private pages), the
/// host's ksmd run fast for the experiment (settings restored after), pages_shared /
/// pages_sharing against the count the content itself predicts; then VM 0 writes merged pages
/// and as many unmerged ones: the copy-on-write breaks, their faults and their time.
public struct KVMKSM: Experiment {
    public static let name = "ksm"
    public static let summary = "KSM on /dev/kvm: two VMs with the same content merged by the host's ksmd, against the oracle; copy-on-write breaks"
    public var options = KSMPairOptions()

    public init(quick: Bool) {
        // 64 MiB per VM (16 MiB quick): 32,768 guest pages to merge, a few full scans at
        // pages_to_scan 5,000 / sleep 5 ms; the whole run stays well under a minute.
        options.pagesPerVM = quick ? 4096 : 16384
        options.writePages = quick ? 256 : 1024
    }

    public func run(progress: @Sendable (String) -> Void) throws -> ExperimentReport {
        if let why = KSMPair.unavailableReason() {
            return ExperimentReport(name: Self.name, title: Self.summary, tables: [], notes: ["skipped: \(why)"],
                                    json: .object([("schema", "memvirt.reproduce/1"), ("name", .string(Self.name)), ("engine", "kvm"), ("skipped", .string(why))]))
        }
        progress("ksm: 2 VMs x \(options.pagesPerVM) pages, ksmd pages_to_scan \(options.tuning.pagesToScan), sleep \(options.tuning.sleepMillisecs) ms")
        let r = try KSMPair.run(options)
        return Self.report(r)
    }

    static func report(_ r: KSMPairReport) -> ExperimentReport {
        let o = r.oracle
        func g(_ v: Int64?) -> String { v.map { $0 < 0 ? "-" + formatGrouped(UInt64(-$0)) : formatGrouped(UInt64($0)) } ?? "n/a" }
        let sharedGain = r.pagesSharedGained, sharingGain = r.pagesSharingGained
        let zeroGain: Int64? = r.countersMerged.ksmZeroPages.flatMap { a in r.countersBefore.ksmZeroPages.map { Int64(a) - Int64($0) } }
        var merge = TextTable(title: "Merging (2 VMs x \(formatGrouped(UInt64(r.options.pagesPerVM))) pages; host counters as deltas)",
                              header: ["", "measured", "expected (oracle)"])
        merge.add(["pages_shared", g(sharedGain), formatGrouped(o.expectedShared)])
        merge.add(["pages_sharing", g(sharingGain), formatGrouped(o.expectedSharing)])
        if o.expectedZeroPages > 0 || (zeroGain ?? 0) != 0 { merge.add(["ksm_zero_pages", g(zeroGain), formatGrouped(o.expectedZeroPages)]) }
        merge.add(["this process's ksm_merging_pages", g(r.mergingPages), formatGrouped(o.expectedMerging)])
        merge.add(["memory saved", ByteCount(UInt64(max(0, sharingGain + (zeroGain ?? 0))) * 4096).description,
                   ByteCount((o.expectedSharing + o.expectedZeroPages) * 4096).description])
        merge.add(["resident guest pages / distinct contents", formatGrouped(o.pages), formatGrouped(o.distinctContents)])
        merge.add(["zero pages / duplicated contents", formatGrouped(o.zeroPages), formatGrouped(o.duplicatedContents)])
        if let (same, n) = r.sameFrameSampled { merge.add(["image pages on one frame in both VMs (pagemap)", "\(same) of \(n)", "\(n)"]) }
        merge.add(["full scans / seconds to merge", "\(r.mergeFullScans) / \(formatFixed(r.mergeSeconds, digits: 2))", r.mergeReachedExpected ? "reached" : "NOT reached"])
        if let cpu = r.ksmdCPUNanoseconds, let scanned = r.pagesScannedInMerge, scanned > 0 {
            merge.add(["ksmd CPU per page scanned", formatFixed(Double(cpu) / Double(scanned) / 1000, digits: 2) + " us",
                       "model: " + formatFixed(Reproductions.thisHost.host.ksmScanPerPage / Reproductions.thisHost.costs.clockGHz / 1000, digits: 2) + " us"])
        }

        let u = r.unmergedWrites, m = r.mergedWrites
        // The model's price of one copy-on-write break on this host's preset: the exit, KVM's
        // shadow fault handler, the host page copy (this host's profile: `reproduce --profile`,
        // pvm-shadow by default).
        let model = Reproductions.thisHost.costs
        let modelCOWus = (model.vmExitRoundTrip + model.shadowFaultHandler + Reproductions.thisHost.host.pageCopy) / model.clockGHz / 1000
        var cow = TextTable(title: "Copy-on-write: VM 0 writes one word in each page", header: ["", "unmerged pages", "merged pages"])
        cow.add(["pages written", formatGrouped(UInt64(u.pages)), formatGrouped(UInt64(m.pages))])
        cow.add(["KSM pages among them before / after (kpageflags)", "\(u.ksmBefore.map(String.init) ?? "n/a") / \(u.ksmAfter.map(String.init) ?? "n/a")",
                 "\(m.ksmBefore.map(String.init) ?? "n/a") / \(m.ksmAfter.map(String.init) ?? "n/a")"])
        cow.add(["pf_fixed (KVM)", formatGrouped(u.pfFixed), formatGrouped(m.pfFixed)])
        cow.add(["VMM minor faults (getrusage)", formatGrouped(u.minorFaults), formatGrouped(m.minorFaults)])
        cow.add(["time per write", formatFixed(u.nanosecondsPerPage / 1000, digits: 2) + " us", formatFixed(m.nanosecondsPerPage / 1000, digits: 2) + " us"])
        cow.add(["model: one COW break (\(model.name))", "", formatFixed(modelCOWus, digits: 2) + " us"])
        cow.add(["pages_sharing drop (host) after ksmd saw the writes", "", g(r.pagesSharingDropAfterWrites)])
        cow.add(["ksm_merging_pages drop (this process)", "", g(r.mergingDropAfterWrites)])
        cow.add(["seconds until ksmd counted the breaks", "", formatFixed(r.breakSeconds, digits: 2)])

        let o2 = r.options
        let notes = [
            "Content per page from a hash of (seed \(o2.seed), page): \(Int(o2.sharedFraction * 100))% image (same in both VMs), \(Int(o2.duplicateFraction * 100))% one of \(o2.duplicateContents) duplicated contents, \(Int(o2.zeroFraction * 100))% zero, the rest private. The guests write it (FILL_PAGES); the oracle reads it back from the VMM's mapping and groups equal pages.",
            "Oracle (mm/ksm.c): c equal pages make ceil-ish c/max_page_sharing (\(r.settingsBefore.maxPageSharing ?? 256)) KSM pages, one in pages_shared each and the other mappings in pages_sharing; a lone leftover page never merges; with use_zero_pages (\(r.settingsBefore.useZeroPages ?? 0)) empty pages go to ksm_zero_pages.",
            "ksmd during the run: pages_to_scan \(r.settingsDuring.pagesToScan), sleep_millisecs \(r.settingsDuring.sleepMillisecs) (defaults 100 and 20, ksm.rst), smart_scan \(r.settingsDuring.smartScan.map(String.init) ?? "n/a") (it would delay pages seen before their twin was written); restored to run \(r.settingsBefore.run), pages_to_scan \(r.settingsBefore.pagesToScan), sleep_millisecs \(r.settingsBefore.sleepMillisecs).",
            "A write to a merged page: KSM mapped it read-only and KVM's mmu notifier dropped the shadow entry, so the guest write exits, KVM's fault asks for the page writable (GUP), the host copies it (do_wp_page): one pf_fixed and one VMM minor fault per page. Writes to unmerged resident pages do not exit.",
            "Host counters are host-wide (deltas here; another KSM user would show in them); this process's ksm_merging_pages counts only these VMs. The model reproduction `ksm` (4 guests, 100 pages/20 ms, writes throughout) prices a break with the parameters shown.",
        ]
        var kv: [(String, JSONValue)] = [
            ("schema", "memvirt.reproduce/1"), ("name", .string(KVMKSM.name)), ("engine", "kvm"),
            ("vms", 2), ("pages_per_vm", .int(Int64(o2.pagesPerVM))),
            ("pages_shared", .int(sharedGain)), ("pages_sharing", .int(sharingGain)),
            ("expected_shared", .uint(o.expectedShared)), ("expected_sharing", .uint(o.expectedSharing)),
            ("expected_zero_pages", .uint(o.expectedZeroPages)),
            ("saved_bytes", .int(max(0, sharingGain + (zeroGain ?? 0)) * 4096)),
            ("expected_saved_bytes", .uint((o.expectedSharing + o.expectedZeroPages) * 4096)),
            ("merge_reached_expected", .bool(r.mergeReachedExpected)), ("merge_seconds", .double(r.mergeSeconds)),
            ("merge_full_scans", .int(Int64(r.mergeFullScans))),
            ("cow_pages", .int(Int64(m.pages))), ("cow_faults", .uint(m.pfFixed)), ("cow_minor_faults", .uint(m.minorFaults)),
            ("cow_ns_per_write", .double(m.nanosecondsPerPage.rounded())), ("unmerged_ns_per_write", .double(u.nanosecondsPerPage.rounded())),
            ("unmerged_faults", .uint(u.pfFixed)), ("model_cow_break_us", .double(modelCOWus)),
            ("pages_sharing_drop_after_writes", .int(r.pagesSharingDropAfterWrites)),
            ("break_seconds", .double(r.breakSeconds)),
            ("oracle", o.json),
            ("writes", .object([("unmerged", u.json), ("merged", m.json)])),
            ("host_counters", .object([("before", r.countersBefore.json), ("merged", r.countersMerged.json), ("after_writes", r.countersAfterWrites.json)])),
            ("settings", .object([("before", r.settingsBefore.json), ("during", r.settingsDuring.json)])),
        ]
        if let v = zeroGain { kv.append(("ksm_zero_pages", .int(v))) }
        if let v = r.mergingPages { kv.append(("ksm_merging_pages", .int(v))) }
        if let v = r.mergingDropAfterWrites { kv.append(("ksm_merging_pages_drop_after_writes", .int(v))) }
        if let p = r.processMerged { kv.append(("process_merged", p.json)) }
        if let (same, n) = r.sameFrameSampled { kv.append(("same_frame_sampled", .object([("same", .int(Int64(same))), ("of", .int(Int64(n)))]))) }
        if let cpu = r.ksmdCPUNanoseconds { kv.append(("ksmd_cpu_ns", .uint(cpu))) }
        if let s = r.pagesScannedInMerge { kv.append(("pages_scanned", .uint(s))) }
        return ExperimentReport(name: KVMKSM.name, title: KVMKSM.summary, tables: [merge, cow], notes: notes, json: .object(kv))
    }
}
