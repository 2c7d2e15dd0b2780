import MemVirtCore
import MemVirtModel
import MemVirtReport

/// `log-dirty` (seed 004, xen-devel 2009): per harvest round, what dirty tracking costs a
/// realistic guest under Xen-style shadow (drop every shadow at each bitmap clean), KVM-style
/// shadow (re-protect through the rmap) and nested paging (EPT write-protect, EPT D bits,
/// PML): the fixup faults against the re-shadowing, and the harvest.
public struct LogDirty: Experiment {
    public static let name = "log-dirty"
    public static let summary = "Dirty-tracking cost per harvest round: fixup faults vs re-shadowing (Xen, KVM shadow) vs EPT write-protect, D bits, PML"
    let footprint: UInt64
    let rounds: Int
    let roundSeconds: Double

    public init(quick: Bool) {
        footprint = quick ? 16 << 20 : 256 << 20
        rounds = quick ? 3 : 6
        roundSeconds = quick ? 0.02 : 0.1
    }

    static let configs: [(DirtyTrackingMode, HarvestMethod)] = [
        (.shadowDropAll, .bitmap), (.shadowWriteProtect, .bitmap), (.shadowWriteProtect, .ring),
        (.nestedWriteProtect, .bitmap), (.nestedDirtyBits, .bitmap), (.nestedPML, .bitmap), (.nestedPML, .ring),
    ]

    public func run(progress: @Sendable (String) -> Void) throws -> ExperimentReport {
        // A web-like guest: zipf(0.99) over its memory, 30% writes, ~1 us of work per access.
        let spec = WorkloadSpec(pattern: .zipf(theta: 0.99), footprint: ByteCount(footprint), accesses: .max, writeRatio: 0.3, seed: 4, computePerAccess: 3_000)
        let ghz = CostModel.vmxEPT.clockGHz * 1e9
        let ms = { (c: Double) in c / ghz * 1e3 }
        var perRound = TextTable(title: "Per harvest round (round 1 follows the enable; \(formatFixed(roundSeconds * 1e3, digits: 0)) ms of guest time each)", header: [
            "mode", "harvest", "round", "dirty pages", "fixup faults", "fixup ms", "re-shadow faults", "re-shadow ms", "log-full exits", "harvest ms", "tracking ms", "of round"])
        var summary = TextTable(title: "Steady state (mean of rounds 2..\(rounds))", header: [
            "mode", "harvest", "dirty/round", "fixup ms", "re-shadow ms", "re-shadow / fixup", "exits ms", "harvest ms", "tracking ms/round", "guest overhead"])
        var rows: [JSONValue] = []
        var means: [String: (fixup: Double, reshadow: Double, total: Double)] = [:]
        for (mode, method) in Self.configs {
            progress("\(Self.name): \(mode.rawValue) / \(method.rawValue)")
            let guest = try MigrationGuest(tracking: mode, spec: spec, guestCapacity: ((footprint >> 30) + 1) << 30)
            _ = try guest.measureBaseline(seconds: roundSeconds / 4)
            let cpu = guest.cpu
            guest.tracker.startLogging(cpu: cpu, method: method, groupSize: 1, costs: DirtyTrackingCosts())
            var mark = guest.tracker.trackingStats
            var roundRows: [JSONValue] = []
            var acc = (fixup: 0.0, reshadow: 0.0, exits: 0.0, harvest: 0.0, total: 0.0, dirty: 0.0, n: 0.0)
            for r in 1...rounds {
                try guest.runWorkload(seconds: roundSeconds)
                let dirty = guest.tracker.harvest(cpu: cpu)
                let s = guest.tracker.trackingStats
                let d = s - mark
                mark = s
                let reshadow = d.reshadowCycles + d.dropCycles
                let share = d.totalCycles / (roundSeconds * ghz)
                perRound.add([mode.rawValue, method.rawValue, "\(r)", formatGrouped(UInt64(dirty.count)), formatGrouped(d.writeFaults), formatFixed(ms(d.writeFaultCycles), digits: 3),
                              formatGrouped(d.reshadowFaults), formatFixed(ms(reshadow), digits: 3), formatGrouped(d.logFullExits),
                              formatFixed(ms(d.harvestCycles), digits: 3), formatFixed(ms(d.totalCycles), digits: 3), formatFixed(100 * share, digits: 1) + "%"])
                roundRows.append(.object([
                    ("round", .int(Int64(r))), ("dirty_pages", .int(Int64(dirty.count))), ("fixup_faults", .uint(d.writeFaults)),
                    ("fixup_ms", .double(ms(d.writeFaultCycles))), ("reshadow_faults", .uint(d.reshadowFaults)),
                    ("shadow_pages_dropped", .uint(d.shadowPagesDropped)), ("reshadow_ms", .double(ms(reshadow))),
                    ("log_full_exits", .uint(d.logFullExits)), ("log_full_ms", .double(ms(d.logFullCycles))),
                    ("harvest_ms", .double(ms(d.harvestCycles))), ("tracking_ms", .double(ms(d.totalCycles))), ("share_of_round", .double(share)),
                ]))
                if r >= 2 {
                    acc.fixup += d.writeFaultCycles; acc.reshadow += reshadow; acc.exits += d.logFullCycles
                    acc.harvest += d.harvestCycles; acc.total += d.totalCycles; acc.dirty += Double(dirty.count); acc.n += 1
                }
            }
            guest.tracker.stopLogging(cpu: cpu)
            let n = max(acc.n, 1)
            let ratio = acc.fixup > 0 ? acc.reshadow / acc.fixup : 0
            let overhead = (acc.total / n) / (roundSeconds * ghz)
            summary.add([mode.rawValue, method.rawValue, formatGrouped(UInt64(acc.dirty / n)), formatFixed(ms(acc.fixup / n), digits: 3),
                         formatFixed(ms(acc.reshadow / n), digits: 3), acc.reshadow > 0 ? formatFixed(ratio, digits: 1) + "x" : "-",
                         formatFixed(ms(acc.exits / n), digits: 3), formatFixed(ms(acc.harvest / n), digits: 3),
                         formatFixed(ms(acc.total / n), digits: 3), formatFixed(100 * overhead, digits: 2) + "%"])
            means["\(mode.rawValue)/\(method.rawValue)"] = (acc.fixup / n, acc.reshadow / n, acc.total / n)
            rows.append(.object([
                ("mode", .string(mode.rawValue)), ("harvest", .string(method.rawValue)), ("rounds", .array(roundRows)),
                ("steady_fixup_ms", .double(ms(acc.fixup / n))), ("steady_reshadow_ms", .double(ms(acc.reshadow / n))),
                ("steady_reshadow_over_fixup", .double(ratio)), ("steady_harvest_ms", .double(ms(acc.harvest / n))),
                ("steady_tracking_ms", .double(ms(acc.total / n))), ("steady_guest_overhead", .double(overhead)),
            ]))
        }
        let xen = means["shadow-xen/bitmap"]!
        let kvm = means["shadow-wp/bitmap"]!
        let lowest = means.min { $0.value.total < $1.value.total }!
        var notes = [
            "Guest: \(ByteCount(footprint)), zipf(0.99), 30% writes, ~1 us of work per access (about 1 M accesses per guest second), every page touched before logging starts; cost model vmx-ept plus the sourced DirtyTrackingCosts.",
            "Xen style: re-shadowing (drop + rebuild faults) costs \(formatFixed(ms(xen.reshadow), digits: 2)) ms per round against \(formatFixed(ms(xen.fixup), digits: 2)) ms of fixup faults: \(formatFixed(xen.fixup > 0 ? xen.reshadow / xen.fixup : 0, digits: 1))x (xen-devel 2009: the shadows blown away at every clean dominate).",
            "Against KVM-style shadow (rmap re-protect, fast-path fixups): Xen's total \(formatFixed(ms(xen.total), digits: 2)) ms/round vs KVM's \(formatFixed(ms(kvm.total), digits: 2)) ms/round (\(formatFixed(kvm.total > 0 ? xen.total / kvm.total : 0, digits: 1))x).",
            "Lowest tracking cost: \(lowest.key) at \(formatFixed(ms(lowest.value.total), digits: 3)) ms/round.",
            "Nested tracking happens where the hardware does it, on the guest's clock: ept-wp write-protects "
                + "the EPT leaves at enable and after each harvest, and each first write of a round is an EPT "
                + "violation fixed on KVM's fast path then; ept-pml logs each EPT D-flag 0->1 in a 512-entry log "
                + "per vCPU and exits when it is full; a dirty ring exits when it reaches its soft limit. Bitmap "
                + "harvest: 9 us per GiB + 45 cycles per dirty page; ring: 59 cycles per entry (docs/references.md, "
                + "Measured on our hosts).",
        ]
        if lowest.key.hasPrefix("ept-pml") { notes.append("As expected, nested paging with PML has the lowest tracking cost.") }
        return ExperimentReport(
            name: Self.name, title: Self.summary, tables: [summary, perRound], notes: notes,
            json: .object([("schema", "memvirt.reproduce/1"), ("name", .string(Self.name)), ("footprint_bytes", .uint(footprint)),
                           ("round_ms", .double(roundSeconds * 1e3)), ("modes", .array(rows))]))
    }
}
