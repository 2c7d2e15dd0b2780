import MemVirtCore
import MemVirtModel
import MemVirtReport

/// `migration`: pre-copy, post-copy and hybrid for an idle, a web-like and a write-heavy guest,
/// beside Clark et al. (NSDI 2005) and QEMU's defaults; a guest that does not converge, and
/// auto-converge rescuing it; a 1 GiB guest timed.
public struct MigrationReproduction: Experiment {
    public static let name = "migration"
    public static let summary = "Live migration: pre-copy, post-copy, hybrid; downtime and total time; non-convergence and auto-converge"
    let footprint: UInt64
    let quick: Bool

    public init(quick: Bool) {
        self.quick = quick
        footprint = quick ? 16 << 20 : 256 << 20
    }

    public func run(progress: @Sendable (String) -> Void) throws -> ExperimentReport {
        var t = TextTable(header: ["guest", "migration", "auto-converge", "rounds", "downtime ms", "total ms", "MiB sent", "resent", "post-copy faults", "blocked ms", "guest slowdown", "throttle", "converged", "hash"])
        var rows: [JSONValue] = []
        let guests: [(String, WorkloadSpec)] = [
            ("idle", WorkloadSpec(pattern: .zipf(theta: 0.99), footprint: ByteCount(footprint), accesses: .max, writeRatio: 0, seed: 4, computePerAccess: 300_000)),
            ("web (zipf writes)", WorkloadSpec(pattern: .zipf(theta: 0.99), footprint: ByteCount(footprint), accesses: .max, writeRatio: 0.2, seed: 4, computePerAccess: 30_000)),
            ("write-heavy", WorkloadSpec(pattern: .uniform, footprint: ByteCount(footprint), accesses: .max, writeRatio: 0.5, seed: 4, computePerAccess: 3_000)),
        ]
        var cases: [(String, WorkloadSpec, MigrationKind, Bool)] = []
        for (name, spec) in guests {
            for kind in [MigrationKind.preCopy, .postCopy, .hybrid(preCopyRounds: 1)] { cases.append((name, spec, kind, false)) }
        }
        cases.append(("write-heavy", guests[2].1, .preCopy, true))
        var capacity = ((footprint >> 30) + 1) << 30
        if !quick {
            // The speed case: a 1 GiB guest, zipf writer, pre-copy.
            cases.append(("1 GiB web (timed)", WorkloadSpec(pattern: .zipf(theta: 0.99), footprint: ByteCount((1 << 30) - (32 << 20)), accesses: .max, writeRatio: 0.2, seed: 4, computePerAccess: 30_000), .preCopy, false))
        }
        var timed: Double?
        for (name, spec, kind, ac) in cases {
            progress("\(Self.name): \(name), \(kind)\(ac ? ", auto-converge" : "")")
            capacity = spec.footprint.rawValue > (512 << 20) ? 1 << 30 : ((footprint >> 30) + 1) << 30
            let clock = WallClock()
            let guest = try MigrationGuest(tracking: .nestedPML, spec: spec, guestCapacity: capacity)
            var c = MigrationConfig()
            c.kind = kind
            c.autoConverge = ac
            c.maxRounds = 30
            // The quick guest (16 MiB) fits QEMU's 300 ms at once: scale the limit with it.
            if quick { c.downtimeLimit = 0.030 }
            let r = try MigrationSimulation(guest: guest, config: c).run()
            let wall = clock.seconds
            if name.hasPrefix("1 GiB") { timed = wall }
            t.add([name, "\(kind)", ac ? "yes" : "no", "\(r.rounds.count)", formatFixed(r.downtimeSeconds * 1e3, digits: 1), formatFixed(r.totalSeconds * 1e3, digits: 0),
                   formatFixed(r.bytes / 1_048_576, digits: 1), formatGrouped(UInt64(r.pagesResent)), formatGrouped(UInt64(r.postcopyFaults)),
                   formatFixed(r.postcopyBlockedSeconds * 1e3, digits: 1), formatFixed(100 * r.guestSlowdown, digits: 1) + "%",
                   formatFixed(100 * r.finalThrottle, digits: 0) + "%", r.converged ? "yes" : "NO", r.hashesMatch ? "equal" : "DIFFER"])
            rows.append(.object([
                ("guest", .string(name)), ("migration", .string("\(kind)")), ("auto_converge", .bool(ac)), ("rounds", .int(Int64(r.rounds.count))),
                ("downtime_ms", .double(r.downtimeSeconds * 1e3)), ("total_ms", .double(r.totalSeconds * 1e3)), ("bytes_sent", .double(r.bytes)),
                ("pages_sent", .int(Int64(r.pagesSent))), ("pages_resent", .int(Int64(r.pagesResent))), ("postcopy_faults", .int(Int64(r.postcopyFaults))),
                ("prepaged_pages", .int(Int64(r.prepagedPages))), ("postcopy_blocked_ms", .double(r.postcopyBlockedSeconds * 1e3)),
                ("guest_slowdown", .double(r.guestSlowdown)), ("final_throttle", .double(r.finalThrottle)), ("converged", .bool(r.converged)),
                ("hashes_match", .bool(r.hashesMatch)), ("wall_seconds", .double(wall)),
                ("per_round", .array(r.rounds.map { rd in .object([
                    ("round", .int(Int64(rd.index))), ("phase", .string(rd.phase)), ("dirty_pages", .int(Int64(rd.dirtyPages))),
                    ("pages_sent", .int(Int64(rd.pagesSent))), ("bytes", .double(rd.bytes)), ("ms", .double(rd.seconds * 1e3)),
                    ("throttle", .double(rd.throttle)), ("guest_accesses", .uint(rd.guestAccesses)),
                    ("hidden_faults", .uint(rd.tracking.writeFaults + rd.tracking.reshadowFaults)), ("log_full_exits", .uint(rd.tracking.logFullExits)),
                ]) })),
            ]))
        }
        var ref = TextTable(title: "Published figures", header: ["source", "what", "downtime", "total"])
        ref.add(["Clark et al., NSDI 2005 (Xen pre-copy)", "Quake 3 server", "60 ms", "-"])
        ref.add(["Clark et al., NSDI 2005 (Xen pre-copy)", "SPECweb99", "210 ms", "-"])
        ref.add(["QEMU defaults", "downtime-limit / max-bandwidth", "300 ms", "128 MiB/s"])
        ref.add(["QEMU auto-converge", "throttle", "20% then +10% steps to 99%", "when dirtying > 50% of transfer, twice"])
        var notes = [
            "Model: a \(ByteCount(footprint)) guest (every page touched first) under nested paging with PML dirty logging, over QEMU's defaults: 128 MiB/s, 300 ms downtime limit, 30 iterations at most; 0.25 ms one-way latency, 5 ms switch-over (device state), 8-byte page headers.",
            "Idle: zipf reads only, ~100 us apart. Web: zipf(0.99), 20% writes, ~10 us apart (20,000 writes/s). Write-heavy: uniform, 50% writes, ~1 us apart. Post-copy pre-pages the 15 following missing pages on each fault; hybrid = one bulk pre-copy pass, then post-copy.",
            "Guest slowdown: accesses completed during the migration against the guest's own rate without tracking over the same time (downtime, throttling, tracking faults and post-copy waits included).",
        ]
        if let w = timed { notes.append("Speed: the 1 GiB guest (zipf writer, pre-copy) simulated in \(formatFixed(w, digits: 2)) s of wall time (target < 10 s in a release build).") }
        return ExperimentReport(
            name: Self.name, title: Self.summary, tables: [t, ref], notes: notes,
            json: .object([("schema", "memvirt.reproduce/1"), ("name", .string(Self.name)), ("footprint_bytes", .uint(footprint)), ("rows", .array(rows))]))
    }
}
