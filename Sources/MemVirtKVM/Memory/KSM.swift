import MemVirtCore
#if canImport(Glibc)
import Glibc
#endif

// The host's kernel samepage merging (mm/ksm.c; Documentation/admin-guide/mm/ksm.rst): read
// its counters, run and tune ksmd for an experiment and put the host's settings back after,
// wait for full scans, and say what KSM should find in guest RAM (the oracle).
//
// Names are the kernel's: `pages_shared` (KSM pages in use), `pages_sharing` (further mappings
// of them: the pages saved), `pages_unshared` (unique pages scanned over and over),
// `pages_volatile` (changing too fast to be put in a tree), `full_scans`, `ksm_zero_pages`
// (with use_zero_pages: empty pages merged with the kernel's zero page instead). Per process:
// /proc/<pid>/ksm_stat (ksm_rmap_items, ksm_zero_pages, ksm_merging_pages, ksm_process_profit)
// and /proc/<pid>/ksm_merging_pages (merged pages of this process: shared and sharing alike).

/// The host-wide KSM counters (/sys/kernel/mm/ksm). Optional fields are missing on older kernels.
public struct KSMCounters: Sendable, Equatable {
    public var pagesShared: UInt64
    public var pagesSharing: UInt64
    public var pagesUnshared: UInt64
    public var pagesVolatile: UInt64
    public var fullScans: UInt64
    public var pagesScanned: UInt64?
    public var pagesSkipped: UInt64?
    /// Empty pages merged with the zero page (use_zero_pages=1); Linux 6.10+.
    public var ksmZeroPages: UInt64?
    public var stableNodeChains: UInt64?
    public var stableNodeDups: UInt64?
    public var generalProfit: Int64?

    public var json: JSONValue {
        var kv: [(String, JSONValue)] = [
            ("pages_shared", .uint(pagesShared)), ("pages_sharing", .uint(pagesSharing)),
            ("pages_unshared", .uint(pagesUnshared)), ("pages_volatile", .uint(pagesVolatile)),
            ("full_scans", .uint(fullScans)),
        ]
        if let v = pagesScanned { kv.append(("pages_scanned", .uint(v))) }
        if let v = pagesSkipped { kv.append(("pages_skipped", .uint(v))) }
        if let v = ksmZeroPages { kv.append(("ksm_zero_pages", .uint(v))) }
        if let v = stableNodeChains { kv.append(("stable_node_chains", .uint(v))) }
        if let v = stableNodeDups { kv.append(("stable_node_dups", .uint(v))) }
        if let v = generalProfit { kv.append(("general_profit", .int(v))) }
        return .object(kv)
    }
}

/// The ksmd knobs an experiment changes (and puts back).
public struct KSMSettings: Sendable, Equatable {
    /// 0 stop, 1 run, 2 unmerge everything (never written here).
    public var run: Int
    public var pagesToScan: Int
    public var sleepMillisecs: Int
    /// 1: empty pages go to the zero page (counted in ksm_zero_pages, not pages_shared/sharing).
    public var useZeroPages: Int?
    /// "none" or "scan-time" (the advisor, Linux 6.7+, overrides pages_to_scan when on).
    public var advisorMode: String?
    /// Read only here (the kernel refuses changes while pages are shared).
    public var maxPageSharing: Int?
    /// 1: ksmd skips pages that did not merge in earlier scans, longer each time (Linux 6.7+).
    public var smartScan: Int? = nil

    public var json: JSONValue {
        var kv: [(String, JSONValue)] = [("run", .int(Int64(run))), ("pages_to_scan", .int(Int64(pagesToScan))),
                                         ("sleep_millisecs", .int(Int64(sleepMillisecs)))]
        if let v = useZeroPages { kv.append(("use_zero_pages", .int(Int64(v)))) }
        if let v = advisorMode { kv.append(("advisor_mode", .string(v))) }
        if let v = maxPageSharing { kv.append(("max_page_sharing", .int(Int64(v)))) }
        if let v = smartScan { kv.append(("smart_scan", .int(Int64(v)))) }
        return .object(kv)
    }
}

/// This process's KSM state (/proc/self/ksm_stat, else /proc/self/ksm_merging_pages).
public struct KSMProcessStat: Sendable, Equatable {
    /// Pages of this process that are merged (mapped to a KSM page), shared or sharing.
    public var mergingPages: UInt64
    public var rmapItems: UInt64?
    public var zeroPages: UInt64?
    public var processProfit: Int64?

    public var json: JSONValue {
        var kv: [(String, JSONValue)] = [("ksm_merging_pages", .uint(mergingPages))]
        if let v = rmapItems { kv.append(("ksm_rmap_items", .uint(v))) }
        if let v = zeroPages { kv.append(("ksm_zero_pages", .uint(v))) }
        if let v = processProfit { kv.append(("ksm_process_profit", .int(v))) }
        return .object(kv)
    }
}

/// What an experiment sets while it runs.
public struct KSMTuning: Sendable {
    /// Pages per ksmd wake-up. The default is 100 (ksm.rst); an experiment scans its few
    /// thousand pages per wake-up so a full scan takes milliseconds, not seconds.
    public var pagesToScan = 5000
    /// ksmd sleep between wake-ups (default 20 ms, ksm.rst).
    public var sleepMillisecs = 5
    /// nil: leave use_zero_pages as the host has it.
    public var useZeroPages: Bool? = nil
    /// smart_scan (on by default since 6.7) skips a page that failed to merge for 1, 2, 4, ...
    /// later scans (mm/ksm.c, should_skip_rmap_item): a guest page seen before its twin in the
    /// other VM was written then merges only scans later. Off for an experiment, so merging
    /// follows the content; nil leaves it.
    public var smartScan: Bool? = false
    public init() {}
}

/// The host's KSM: counters, settings and sessions. Errors say what is missing, never crash.
public enum KSM {
    /// The sysfs directory (ksm.rst).
    public static let sysfs = "/sys/kernel/mm/ksm"

    /// True when this kernel has KSM (CONFIG_KSM).
    public static var isPresent: Bool { access(sysfs + "/run", F_OK) == 0 }

    /// nil when KSM can be run and tuned by this process; else why not.
    public static func unavailableReason() -> String? {
        if !isPresent { return "KSM is not available: \(sysfs) is missing (kernel without CONFIG_KSM)" }
        for f in ["run", "pages_to_scan", "sleep_millisecs"] where access(sysfs + "/" + f, W_OK) != 0 {
            return "KSM is not writable: \(sysfs)/\(f): \(lastErrno()) (run as root)"
        }
        return nil
    }

    // MARK: reading

    static func readString(_ path: String) throws(KVMError) -> String {
        do { return try readSmallTextFile(path) } catch {
            if case .call(_, let e) = error, e.rawValue == ENOENT { throw KVMError.unavailable("\(path) does not exist (no KSM in this kernel?)") }
            throw error
        }
    }

    static func readInt(_ name: String) throws(KVMError) -> Int64 {
        let s = try readString(sysfs + "/" + name)
        guard let v = Int64(s) else { throw KVMError.invalid("\(sysfs)/\(name): '\(s)' is not a number") }
        return v
    }

    static func readOptional(_ name: String) -> Int64? {
        guard access(sysfs + "/" + name, R_OK) == 0 else { return nil }
        return try? readInt(name)
    }

    /// The host-wide counters now.
    public static func counters() throws(KVMError) -> KSMCounters {
        func u(_ n: String) throws(KVMError) -> UInt64 { UInt64(max(0, try readInt(n))) }
        func o(_ n: String) -> UInt64? { readOptional(n).map { UInt64(max(0, $0)) } }
        return KSMCounters(
            pagesShared: try u("pages_shared"), pagesSharing: try u("pages_sharing"),
            pagesUnshared: try u("pages_unshared"), pagesVolatile: try u("pages_volatile"),
            fullScans: try u("full_scans"), pagesScanned: o("pages_scanned"), pagesSkipped: o("pages_skipped"),
            ksmZeroPages: o("ksm_zero_pages"), stableNodeChains: o("stable_node_chains"), stableNodeDups: o("stable_node_dups"),
            generalProfit: readOptional("general_profit"))
    }

    /// ksmd's settings now.
    public static func settings() throws(KVMError) -> KSMSettings {
        var advisor: String? = nil
        if access(sysfs + "/advisor_mode", R_OK) == 0, let s = try? readString(sysfs + "/advisor_mode") {
            // "[none] scan-time": the bracketed one is in force.
            if let a = s.firstIndex(of: "["), let b = s.firstIndex(of: "]"), a < b {
                advisor = String(s[s.index(after: a)..<b])
            }
        }
        return KSMSettings(
            run: Int(try readInt("run")), pagesToScan: Int(try readInt("pages_to_scan")),
            sleepMillisecs: Int(try readInt("sleep_millisecs")), useZeroPages: readOptional("use_zero_pages").map { Int($0) },
            advisorMode: advisor, maxPageSharing: readOptional("max_page_sharing").map { Int($0) },
            smartScan: readOptional("smart_scan").map { Int($0) })
    }

    /// This process's KSM counters, or nil when the kernel has neither file (before 6.1).
    public static func processStat() -> KSMProcessStat? {
        if let s = try? readString("/proc/self/ksm_stat") {
            var kv: [String: Int64] = [:]
            for line in s.split(separator: "\n") {
                let parts = line.split(separator: " ")
                if parts.count == 2, let v = Int64(parts[1]) { kv[String(parts[0])] = v }
            }
            if let m = kv["ksm_merging_pages"] {
                return KSMProcessStat(mergingPages: UInt64(max(0, m)), rmapItems: kv["ksm_rmap_items"].map { UInt64(max(0, $0)) },
                                      zeroPages: kv["ksm_zero_pages"].map { UInt64(max(0, $0)) }, processProfit: kv["ksm_process_profit"])
            }
        }
        if let s = try? readString("/proc/self/ksm_merging_pages"), let m = UInt64(s) {
            return KSMProcessStat(mergingPages: m)
        }
        return nil
    }

    // MARK: writing

    static func write(_ name: String, _ value: String) throws(KVMError) {
        let path = sysfs + "/" + name
        let fd = open(path, O_WRONLY | O_CLOEXEC)
        if fd < 0 {
            let e = lastErrno()
            if e.rawValue == EACCES || e.rawValue == EPERM { throw KVMError.unavailable("\(path) is not writable: \(e) (run as root)") }
            if e.rawValue == ENOENT { throw KVMError.unavailable("\(path) does not exist (no KSM in this kernel?)") }
            throw KVMError.call("open(\(path))", e)
        }
        defer { close(fd) }
        let bytes = Array(value.utf8)
        let n = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
        if n != bytes.count { throw KVMError.call("write(\(path), \(value))", lastErrno()) }
    }

    /// Writes `s` (run last, so ksmd starts with the new knobs and stops before the old ones return).
    static func apply(_ s: KSMSettings, from current: KSMSettings) throws(KVMError) {
        if current.run != 0 && s.run == 0 { try write("run", "0") }
        if let a = s.advisorMode, a != current.advisorMode { try write("advisor_mode", a) }
        if s.pagesToScan != current.pagesToScan { try write("pages_to_scan", String(s.pagesToScan)) }
        if s.sleepMillisecs != current.sleepMillisecs { try write("sleep_millisecs", String(s.sleepMillisecs)) }
        if let z = s.useZeroPages, z != current.useZeroPages { try write("use_zero_pages", String(z)) }
        if let z = s.smartScan, z != current.smartScan { try write("smart_scan", String(z)) }
        if s.run != current.run && s.run != 0 { try write("run", String(s.run)) }
    }

    /// Runs `body` with ksmd running and tuned, then puts every changed setting back, whether
    /// `body` returns or throws. Sessions of all MemVirt processes take turns (an flock), so
    /// one never restores over another's; a session that died without restoring (killed) is
    /// repaired by the next one (its saved settings are in the lock file).
    public static func withSession<T>(_ tuning: KSMTuning = KSMTuning(), _ body: (KSMSession) throws(KVMError) -> T) throws(KVMError) -> T {
        if let why = unavailableReason() { throw KVMError.unavailable(why) }
        let session = try KSMSession(tuning: tuning)
        var restoreError: KVMError? = nil
        let result: Result<T, KVMError>
        do { result = .success(try body(session)) } catch { result = .failure(error) }
        do { try session.restore() } catch { restoreError = error }
        let value = try result.get()
        if let e = restoreError { throw e }
        return value
    }
}

/// ksmd running for one experiment. Made by `KSM.withSession`, which restores the settings.
public final class KSMSession: @unchecked Sendable {
    /// The host's settings before the session (what `restore` writes back).
    public let saved: KSMSettings
    /// What the session runs with.
    public let applied: KSMSettings
    private let lockFD: Int32
    private var restored = false

    /// Where sessions lock and leave their saved settings (tmpfs: gone at reboot, as are the settings).
    static let lockPath = access("/run", W_OK) == 0 ? "/run/memvirt-ksm.lock" : "/tmp/memvirt-ksm.lock"

    init(tuning t: KSMTuning) throws(KVMError) {
        let fd = open(Self.lockPath, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        if fd < 0 { throw KVMError.call("open(\(Self.lockPath))", lastErrno()) }
        while flock(fd, LOCK_EX) != 0 {
            if errno == EINTR { continue }
            let e = lastErrno()
            close(fd)
            throw KVMError.call("flock(\(Self.lockPath))", e)
        }
        lockFD = fd
        do throws(KVMError) {
            var current = try KSM.settings()
            // A session that was killed left "saved;applied" here: if the host still runs
            // with what it applied, put its saved settings back first.
            if let stale = Self.readLockFile(fd), KSMSession.same(current, stale.applied) {
                try KSM.apply(stale.saved, from: current)
                current = try KSM.settings()
            }
            saved = current
            var a = current
            a.run = 1
            a.pagesToScan = t.pagesToScan
            a.sleepMillisecs = t.sleepMillisecs
            if let z = t.useZeroPages, current.useZeroPages != nil { a.useZeroPages = z ? 1 : 0 }
            if let z = t.smartScan, current.smartScan != nil { a.smartScan = z ? 1 : 0 }
            if current.advisorMode != nil { a.advisorMode = "none" }
            applied = a
            Self.writeLockFile(fd, saved: saved, applied: a)
            do throws(KVMError) { try KSM.apply(a, from: current) } catch {
                try? KSM.apply(current, from: (try? KSM.settings()) ?? a)
                throw error
            }
        } catch {
            Self.clearLockFile(fd)
            flock(fd, LOCK_UN)
            close(fd)
            throw error
        }
    }

    deinit {
        if !restored { try? restore() }
    }

    /// Puts the saved settings back (once) and ends the session.
    public func restore() throws(KVMError) {
        if restored { return }
        restored = true
        defer {
            flock(lockFD, LOCK_UN)
            close(lockFD)
        }
        let now = (try? KSM.settings()) ?? applied
        try KSM.apply(saved, from: now)
        Self.clearLockFile(lockFD)
    }

    /// Waits until `full_scans` has advanced by `scans` since the call; returns the seconds waited.
    @discardableResult
    public func waitForFullScans(_ scans: UInt64, timeoutSeconds: Double) throws(KVMError) -> Double {
        let start = try KSM.counters().fullScans
        let t0 = monotonicNanoseconds()
        while true {
            let now = try KSM.counters().fullScans
            let waited = Double(monotonicNanoseconds() - t0) / 1e9
            if now >= start + scans { return waited }
            if waited > timeoutSeconds {
                throw KVMError.invalid("ksmd did only \(now - start) of \(scans) full scans in \(formatFixed(timeoutSeconds, digits: 1)) s (pages_to_scan \(applied.pagesToScan), sleep_millisecs \(applied.sleepMillisecs))")
            }
            usleep(2000)
        }
    }

    /// Polls `condition` every 2 ms until it holds or the timeout; returns whether it held.
    @discardableResult
    public func waitUntil(timeoutSeconds: Double, _ condition: () -> Bool) -> Bool {
        let t0 = monotonicNanoseconds()
        while !condition() {
            if Double(monotonicNanoseconds() - t0) / 1e9 > timeoutSeconds { return false }
            usleep(2000)
        }
        return true
    }

    /// Waits, full scan by full scan, until `done(value)` or until `value` stayed the same over
    /// `stableScans` full scans, or the timeout. Returns the last value, the full scans waited,
    /// the seconds and whether `done` was reached. `value` is read after each full scan.
    public func waitForMerging<V: Equatable>(stableScans: Int = 2, timeoutSeconds: Double,
                                             value: () throws(KVMError) -> V, done: (V) -> Bool) throws(KVMError) -> (value: V, scans: Int, seconds: Double, done: Bool) {
        let t0 = monotonicNanoseconds()
        var last = try value()
        var same = 0
        var scans = 0
        while true {
            if done(last) { return (last, scans, Double(monotonicNanoseconds() - t0) / 1e9, true) }
            let left = timeoutSeconds - Double(monotonicNanoseconds() - t0) / 1e9
            if left <= 0 { return (last, scans, timeoutSeconds, false) }
            do { try waitForFullScans(1, timeoutSeconds: left) } catch {
                return (try value(), scans, Double(monotonicNanoseconds() - t0) / 1e9, false)
            }
            scans += 1
            let v = try value()
            same = v == last ? same + 1 : 0
            last = v
            if same >= stableScans { return (last, scans, Double(monotonicNanoseconds() - t0) / 1e9, done(last)) }
        }
    }

    // MARK: the lock file: "run pages sleep zero advisor smart" saved, then applied

    static func same(_ a: KSMSettings, _ b: KSMSettings) -> Bool {
        a.run == b.run && a.pagesToScan == b.pagesToScan && a.sleepMillisecs == b.sleepMillisecs
    }

    static func line(_ s: KSMSettings) -> String {
        "\(s.run) \(s.pagesToScan) \(s.sleepMillisecs) \(s.useZeroPages ?? -1) \(s.advisorMode ?? "-") \(s.smartScan ?? -1)"
    }

    static func parse(_ l: Substring) -> KSMSettings? {
        let p = l.split(separator: " ")
        guard p.count == 6, let r = Int(p[0]), let n = Int(p[1]), let s = Int(p[2]), let z = Int(p[3]), let m = Int(p[5]) else { return nil }
        return KSMSettings(run: r, pagesToScan: n, sleepMillisecs: s, useZeroPages: z < 0 ? nil : z,
                           advisorMode: p[4] == "-" ? nil : String(p[4]), maxPageSharing: nil, smartScan: m < 0 ? nil : m)
    }

    static func writeLockFile(_ fd: Int32, saved: KSMSettings, applied: KSMSettings) {
        let text = Array((line(saved) + "\n" + line(applied) + "\n").utf8)
        _ = ftruncate(fd, 0)
        _ = text.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 0) }
        _ = fsync(fd)
    }

    static func clearLockFile(_ fd: Int32) { _ = ftruncate(fd, 0) }

    static func readLockFile(_ fd: Int32) -> (saved: KSMSettings, applied: KSMSettings)? {
        var buf = [UInt8](repeating: 0, count: 512)
        let n = buf.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, 0) }
        guard n > 0 else { return nil }
        let lines = String(decoding: buf[0..<n], as: UTF8.self).split(separator: "\n")
        guard lines.count == 2, let s = parse(lines[0]), let a = parse(lines[1]) else { return nil }
        return (s, a)
    }
}

/// What KSM should find in guest RAM, computed from the content itself: resident pages are
/// grouped by exact content (a 64-bit hash, then a full comparison), and each group of c
/// equal pages is what ksmd can merge. The rules of mm/ksm.c:
///  - a KSM page holds at most max_page_sharing mappings (default 256); c pages of one content
///    fill ceil-ish groups (stable_node "dups" of a chain): full = c / m KSM pages of m, and the
///    rest r = c mod m forms one more KSM page when r >= 2; a single leftover page waits in the
///    unstable tree for a partner that never comes (stable_tree_search returns NULL for a chain
///    whose dups are all full);
///  - each KSM page counts once in pages_shared and its other mappings in pages_sharing;
///  - with use_zero_pages, empty pages are merged with the zero page instead (ksm_zero_pages).
public struct KSMOracle: Sendable, Equatable {
    /// Resident pages looked at.
    public var pages: UInt64
    /// Different page contents among them.
    public var distinctContents: UInt64
    /// Contents that occur at least twice.
    public var duplicatedContents: UInt64
    /// Resident pages that are all zero.
    public var zeroPages: UInt64
    public var expectedShared: UInt64
    public var expectedSharing: UInt64
    /// Pages expected merged (shared + sharing): what /proc/self/ksm_merging_pages counts.
    public var expectedMerging: UInt64 { expectedShared + expectedSharing }
    /// Empty pages expected on the zero page (use_zero_pages=1), else 0.
    public var expectedZeroPages: UInt64

    public var json: JSONValue {
        .object([
            ("pages", .uint(pages)), ("distinct_contents", .uint(distinctContents)), ("duplicated_contents", .uint(duplicatedContents)),
            ("zero_pages", .uint(zeroPages)), ("expected_shared", .uint(expectedShared)), ("expected_sharing", .uint(expectedSharing)),
            ("expected_merging", .uint(expectedMerging)), ("expected_zero_pages", .uint(expectedZeroPages)),
            ("expected_saved_bytes", .uint((expectedSharing + expectedZeroPages) * 4096)),
        ])
    }

    /// Looks at every resident page of `regions` (the VMM's view; reading does not fault a
    /// resident page). `maxPageSharing` and `useZeroPages` as the host has them.
    public static func compute(regions: [GuestMemoryRegion], maxPageSharing: Int, useZeroPages: Bool) throws(KVMError) -> KSMOracle {
        // Content hash -> groups of pages of that hash with equal content: (a representative, count).
        var groups: [UInt64: [(UnsafeRawPointer, UInt64)]] = [:]
        var pages: UInt64 = 0
        var zero: UInt64 = 0
        for r in regions {
            let resident = try r.residency()
            let base = UnsafeRawPointer(r.mapping.base)
            for (i, b) in resident.enumerated() where b & 1 != 0 {
                let p = base + i * 4096
                pages += 1
                let h = contentHash(p)
                if isZero(p) { zero += 1 }
                var list = groups[h] ?? []
                if let k = list.firstIndex(where: { memcmp($0.0, p, 4096) == 0 }) {
                    list[k].1 += 1
                } else {
                    list.append((p, 1))
                }
                groups[h] = list
            }
        }
        let m = UInt64(max(2, maxPageSharing))
        var distinct: UInt64 = 0, duplicated: UInt64 = 0, shared: UInt64 = 0, sharing: UInt64 = 0, onZero: UInt64 = 0
        for (_, list) in groups {
            for (rep, c) in list {
                distinct += 1
                if c >= 2 { duplicated += 1 }
                if useZeroPages && isZero(rep) {
                    onZero += c
                    continue
                }
                let full = c / m, rest = c % m
                let kPages = full + (rest >= 2 ? 1 : 0)
                let mapped = full * m + (rest >= 2 ? rest : 0)
                shared += kPages
                sharing += mapped - kPages
            }
        }
        return KSMOracle(pages: pages, distinctContents: distinct, duplicatedContents: duplicated, zeroPages: zero,
                         expectedShared: shared, expectedSharing: sharing, expectedZeroPages: onZero)
    }

    static func contentHash(_ p: UnsafeRawPointer) -> UInt64 {
        let w = p.assumingMemoryBound(to: UInt64.self)
        var h: UInt64 = FNV1a.offsetBasis
        for k in 0..<512 { h = (h ^ w[k]) &* FNV1a.prime &+ UInt64(k) }
        return h
    }

    static func isZero(_ p: UnsafeRawPointer) -> Bool {
        let w = p.assumingMemoryBound(to: UInt64.self)
        for k in 0..<512 where w[k] != 0 { return false }
        return true
    }
}
