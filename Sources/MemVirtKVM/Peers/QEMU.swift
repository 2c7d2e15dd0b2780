import Foundation
import MemVirtCore
#if canImport(Glibc)
import Glibc
#endif

/// QEMU beside MemVirt: the same multiboot image under `qemu-system-x86_64 -enable-kvm
/// -kernel`, run to its power-off, or live-migrated over loopback through QMP.
///
/// The guest's ports: `-device isa-debugcon,iobase=0xe9,chardev=...` (its text lines) and
/// `-device isa-debug-exit,iobase=0xf4,iosize=4` (QEMU exits with (value << 1) | 1: 1 when the
/// guest finished). QMP (docs/interop/qmp-spec, qapi/migration.json): greeting, then
/// `qmp_capabilities`; `migrate-set-capabilities`, `migrate-set-parameters`, `migrate {uri}`,
/// `query-migrate` (status, total-time, downtime, setup-time, ram.transferred, ...).
public enum QEMU {
    /// `qemu-system-x86_64` on PATH (or $MEMVIRT_QEMU), nil when absent.
    public static var executable: String? {
        if let e = ProcessInfo.processInfo.environment["MEMVIRT_QEMU"], FileManager.default.isExecutableFile(atPath: e) { return e }
        for dir in (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin").split(separator: ":") {
            let p = "\(dir)/qemu-system-x86_64"
            if FileManager.default.isExecutableFile(atPath: p) { return p }
        }
        return nil
    }

    /// "7.2.x" from `qemu-system-x86_64 --version` (nil when it cannot be run).
    public static var version: String? {
        guard let exe = executable else { return nil }
        let p = Process()
        let pipe = Pipe()
        p.executableURL = URL(fileURLWithPath: exe)
        p.arguments = ["--version"]
        p.standardOutput = pipe
        p.standardError = FileHandle.nullDevice
        do { try p.run() } catch { return nil }
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        let text = String(decoding: data, as: UTF8.self)
        guard let r = text.range(of: "version ") else { return nil }
        return String(text[r.upperBound...].prefix { !$0.isWhitespace })
    }

    /// Why QEMU comparisons cannot run here (nil: they can).
    public static var unavailableReason: String? {
        if executable == nil { return "qemu-system-x86_64 not found on PATH (apt-get install qemu-system-x86)" }
        if let why = KVM.unavailableReason { return why }
        return nil
    }

    /// The arguments every run shares: KVM, no devices but the two debug ports, the image.
    static func baseArguments(kernel: String, append: String, memory: UInt64, console: String, vcpus: Int = 1) -> [String] {
        ["-enable-kvm", "-m", "\(memory >> 20)M", "-smp", "\(vcpus)", "-display", "none", "-nodefaults", "-no-user-config", "-serial", "none",
         "-kernel", kernel, "-append", append,
         "-chardev", "file,id=dbg,path=\(console)", "-device", "isa-debugcon,iobase=0xe9,chardev=dbg",
         "-device", "isa-debug-exit,iobase=0xf4,iosize=4"]
    }

    /// A QEMU process with its console file and stderr.
    final class Machine: @unchecked Sendable {
        let process = Process()
        let console: String
        let stderrPath: String
        let started = monotonicNanoseconds()

        init(arguments: [String], console: String, stderrPath: String) throws(KVMError) {
            guard let exe = QEMU.executable else { throw KVMError.unavailable("qemu-system-x86_64 not found on PATH") }
            self.console = console
            self.stderrPath = stderrPath
            _ = FileManager.default.createFile(atPath: stderrPath, contents: nil)
            process.executableURL = URL(fileURLWithPath: exe)
            process.arguments = arguments
            process.standardInput = FileHandle.nullDevice
            process.standardOutput = FileHandle.nullDevice
            process.standardError = FileHandle(forWritingAtPath: stderrPath)
            do { try process.run() } catch { throw KVMError.invalid("cannot start \(exe): \(error)") }
        }

        var consoleText: String { (try? String(contentsOfFile: console, encoding: .utf8)) ?? "" }
        var stderrText: String { ((try? String(contentsOfFile: stderrPath, encoding: .utf8)) ?? "").split(separator: "\n").filter { !$0.contains("host doesn't support requested feature") }.joined(separator: "\n") }

        /// Waits for the exit; nil on timeout (the process is then killed).
        func wait(timeoutNanos: UInt64) -> Int32? {
            let t0 = monotonicNanoseconds()
            while process.isRunning {
                if monotonicNanoseconds() - t0 > timeoutNanos { kill(); return nil }
                usleepNanos(5_000_000)
            }
            return process.terminationStatus
        }

        func kill() {
            if process.isRunning { process.terminate(); usleepNanos(200_000_000) }
            if process.isRunning { Glibc.kill(process.processIdentifier, SIGKILL) }
            process.waitUntilExit()
        }
    }

    /// A scratch directory for one comparison's files.
    static func scratch() throws(KVMError) -> String {
        var template = Array((NSTemporaryDirectory() + "/memvirt-qemu-XXXXXX").utf8CString)
        guard let p = mkdtemp(&template) else { throw KVMError.call("mkdtemp", lastErrno()) }
        return String(cString: p)
    }

    /// What one QEMU run of the image printed.
    public struct RunReport: Sendable {
        public var exitStatus: Int32?
        public var console: String
        public var stderr: String
        public var wallNanos: UInt64
        public var result: [String: UInt64] { MultibootRunReport.parseResult(console) }
        /// The guest powered off through isa-debug-exit with 0 (QEMU's status 1).
        public var finished: Bool { exitStatus == 1 }
    }

    /// Boots `kernel` under QEMU with `append` and `memory`, to its power-off.
    public static func run(kernel: String, append: String, memory: UInt64, vcpus: Int = 1, timeoutNanos: UInt64 = 120_000_000_000) throws(KVMError) -> RunReport {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let m = try Machine(arguments: baseArguments(kernel: kernel, append: append, memory: memory, console: dir + "/console", vcpus: vcpus),
                            console: dir + "/console", stderrPath: dir + "/stderr")
        let status = m.wait(timeoutNanos: timeoutNanos)
        return RunReport(exitStatus: status, console: m.consoleText, stderr: m.stderrText, wallNanos: monotonicNanoseconds() - m.started)
    }

    // MARK: migration

    /// The two migration parameters both VMMs share in the comparison (qapi/migration.json,
    /// `migrate-set-parameters`): `max-bandwidth` (bytes/s; QEMU's default 128 MiB/s,
    /// MAX_THROTTLE in migration/migration.c) and `downtime-limit` (ms; default 300,
    /// DEFAULT_MIGRATE_SET_DOWNTIME). QEMU applies `max-bandwidth` to its iterative passes
    /// (ram_save_iterate checks the rate limit); its post-copy phase follows
    /// `max-postcopy-bandwidth` instead (default 0: no limit).
    public struct MigrationSettings: Sendable, Equatable {
        public var maxBandwidth: UInt64
        public var downtimeLimitMillis: UInt64
        public init(maxBandwidth: UInt64, downtimeLimitMillis: UInt64) {
            self.maxBandwidth = maxBandwidth
            self.downtimeLimitMillis = downtimeLimitMillis
        }
        /// QEMU's defaults (docs/references.md: 128 MiB/s, 300 ms).
        public static let qemuDefaults = MigrationSettings(maxBandwidth: 128 << 20, downtimeLimitMillis: 300)
        /// The `migrate-set-parameters` arguments.
        public var qmpArguments: [String: Any] { ["max-bandwidth": maxBandwidth, "downtime-limit": downtimeLimitMillis] }
        /// From a `query-migrate-parameters` reply (nil when either key is missing).
        public init?(queryReply r: [String: Any]) {
            guard let bw = (r["max-bandwidth"] as? NSNumber)?.uint64Value, let dl = (r["downtime-limit"] as? NSNumber)?.uint64Value else { return nil }
            self.init(maxBandwidth: bw, downtimeLimitMillis: dl)
        }
    }

    /// Sets `settings` on a QEMU through QMP and reads them back with
    /// `query-migrate-parameters`; throws when QEMU refuses them or reports other values.
    static func apply(_ settings: MigrationSettings, _ q: QMP) throws(KVMError) -> MigrationSettings {
        _ = try q.execute("migrate-set-parameters", settings.qmpArguments)
        let back = try q.execute("query-migrate-parameters", [:])
        guard let got = MigrationSettings(queryReply: back) else {
            throw KVMError.invalid("QMP query-migrate-parameters: no max-bandwidth or downtime-limit in its reply")
        }
        guard got == settings else {
            throw KVMError.invalid("QEMU kept max-bandwidth \(got.maxBandwidth) B/s, downtime-limit \(got.downtimeLimitMillis) ms after migrate-set-parameters asked for \(settings.maxBandwidth) B/s, \(settings.downtimeLimitMillis) ms")
        }
        return got
    }

    /// Starts a paused QEMU (`-S`, no guest code runs) with `kernel`, reads its migration
    /// parameters (`query-migrate-parameters`: what QEMU uses when nobody sets them), sets
    /// `settings` and reads them back. Returns (before, after).
    public static func checkParameters(_ settings: MigrationSettings, kernel: String) throws(KVMError) -> (defaults: MigrationSettings, applied: MigrationSettings) {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var args = baseArguments(kernel: kernel, append: "", memory: 64 << 20, console: dir + "/console")
        args += ["-S", "-qmp", "unix:\(dir)/q.qmp,server=on,wait=off"]
        let m = try Machine(arguments: args, console: dir + "/console", stderrPath: dir + "/stderr")
        defer { m.kill() }
        let q = try QMP(path: dir + "/q.qmp", process: m)
        guard let before = MigrationSettings(queryReply: try q.execute("query-migrate-parameters", [:])) else {
            throw KVMError.invalid("QMP query-migrate-parameters: no max-bandwidth or downtime-limit in its reply")
        }
        let after = try apply(settings, q)
        _ = try? q.execute("quit", [:])
        return (before, after)
    }

    /// One QEMU live migration (source and destination on this host, loopback TCP).
    public struct MigrationReport: Sendable {
        public var status: String
        /// QEMU's own figures (query-migrate): milliseconds and bytes.
        public var totalMillis: Double?
        public var downtimeMillis: Double?
        public var setupMillis: Double?
        public var ramTransferred: UInt64?
        public var ramTotal: UInt64?
        public var dirtySyncCount: UInt64?
        public var duplicatePages: UInt64?
        public var normalPages: UInt64?
        public var postcopyRequests: UInt64?
        public var mbps: Double?
        /// The migration parameters the source QEMU reported back before `migrate`.
        public var settings: MigrationSettings?
        /// The destination's console (the guest's result line is there) and result.
        public var destinationConsole: String
        public var sourceConsole: String
        public var result: [String: UInt64] { MultibootRunReport.parseResult(destinationConsole) }
        public var destinationExit: Int32?
        public var error: String?
        /// The raw last query-migrate reply.
        public var raw: String

        public var json: JSONValue {
            func d(_ v: Double?) -> JSONValue { v.map { .double($0) } ?? .null }
            func u(_ v: UInt64?) -> JSONValue { v.map { .uint($0) } ?? .null }
            return .object([
                ("status", .string(status)), ("total_ms", d(totalMillis)), ("downtime_ms", d(downtimeMillis)), ("setup_ms", d(setupMillis)),
                ("ram_transferred", u(ramTransferred)), ("ram_total", u(ramTotal)), ("dirty_sync_count", u(dirtySyncCount)),
                ("duplicate_pages", u(duplicatePages)), ("normal_pages", u(normalPages)), ("postcopy_requests", u(postcopyRequests)),
                ("mbps", d(mbps)), ("max_bandwidth", u(settings?.maxBandwidth)), ("downtime_limit_ms", u(settings?.downtimeLimitMillis)),
                ("destination_exit", destinationExit.map { .int(Int64($0)) } ?? .null),
                ("error", error.map { .string($0) } ?? .null),
                ("result", .object(result.sorted { $0.key < $1.key }.map { ($0.key, .uint($0.value)) })),
            ])
        }
    }

    /// Boots `kernel` in a source QEMU and a destination QEMU (`-incoming tcp:127.0.0.1:PORT`),
    /// waits until the guest's workload runs plus `afterNanos`, migrates through QMP
    /// (`postcopy`: postcopy-ram on both, then migrate-start-postcopy after the first pass
    /// starts), polls query-migrate to the end, and waits for the destination's guest to power off.
    /// `settings`: set on the source through `migrate-set-parameters` and read back before the
    /// migration starts (nil: QEMU's own, read back too). `vcpus`: `-smp` on both.
    public static func migrate(kernel: String, append: String, memory: UInt64, afterNanos: UInt64, postcopy: Bool = false,
                               settings: MigrationSettings? = nil, vcpus: Int = 1, timeoutNanos: UInt64 = 120_000_000_000) throws(KVMError) -> MigrationReport {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let port = try freePort()
        var dargs = baseArguments(kernel: kernel, append: append, memory: memory, console: dir + "/dst-console", vcpus: vcpus)
        dargs += ["-incoming", "tcp:127.0.0.1:\(port)", "-qmp", "unix:\(dir)/dst.qmp,server=on,wait=off"]
        var sargs = baseArguments(kernel: kernel, append: append, memory: memory, console: dir + "/src-console", vcpus: vcpus)
        sargs += ["-qmp", "unix:\(dir)/src.qmp,server=on,wait=off"]
        let dst = try Machine(arguments: dargs, console: dir + "/dst-console", stderrPath: dir + "/dst-stderr")
        defer { dst.kill() }
        let src = try Machine(arguments: sargs, console: dir + "/src-console", stderrPath: dir + "/src-stderr")
        defer { src.kill() }
        let sq = try QMP(path: dir + "/src.qmp", process: src)
        let dq = try QMP(path: dir + "/dst.qmp", process: dst)
        if postcopy {
            let caps: [String: Any] = ["capabilities": [["capability": "postcopy-ram", "state": true]]]
            _ = try sq.execute("migrate-set-capabilities", caps)
            _ = try dq.execute("migrate-set-capabilities", caps)
        }
        var applied: MigrationSettings? = nil
        if let settings { applied = try apply(settings, sq) } else { applied = MigrationSettings(queryReply: try sq.execute("query-migrate-parameters", [:])) }
        // The guest's workload has started: its line is on the source's console.
        let t0 = monotonicNanoseconds()
        while !src.consoleText.contains("memvirt-guest: workload") {
            if !src.process.isRunning || monotonicNanoseconds() - t0 > timeoutNanos {
                throw KVMError.invalid("the source QEMU's guest never started its workload; console: \(src.consoleText) stderr: \(src.stderrText)")
            }
            usleepNanos(5_000_000)
        }
        usleepNanos(afterNanos)
        _ = try sq.execute("migrate", ["uri": "tcp:127.0.0.1:\(port)"])
        var report = MigrationReport(status: "active", destinationConsole: "", sourceConsole: "", raw: "")
        report.settings = applied
        var switched = false
        while true {
            let r = try sq.execute("query-migrate", [:])
            let st = r["status"] as? String ?? "?"
            report.status = st
            if postcopy && !switched && st == "active" {
                _ = try sq.execute("migrate-start-postcopy", [:])
                switched = true
            }
            if ["completed", "failed", "cancelled"].contains(st) {
                report.totalMillis = (r["total-time"] as? NSNumber)?.doubleValue
                report.downtimeMillis = (r["downtime"] as? NSNumber)?.doubleValue
                report.setupMillis = (r["setup-time"] as? NSNumber)?.doubleValue
                if let ram = r["ram"] as? [String: Any] {
                    report.ramTransferred = (ram["transferred"] as? NSNumber)?.uint64Value
                    report.ramTotal = (ram["total"] as? NSNumber)?.uint64Value
                    report.dirtySyncCount = (ram["dirty-sync-count"] as? NSNumber)?.uint64Value
                    report.duplicatePages = (ram["duplicate"] as? NSNumber)?.uint64Value
                    report.normalPages = (ram["normal"] as? NSNumber)?.uint64Value
                    report.postcopyRequests = (ram["postcopy-requests"] as? NSNumber)?.uint64Value
                    report.mbps = (ram["mbps"] as? NSNumber)?.doubleValue
                }
                if let e = r["error-desc"] as? String { report.error = e }
                if let d = try? JSONSerialization.data(withJSONObject: r), let s = String(data: d, encoding: .utf8) { report.raw = s }
                break
            }
            if monotonicNanoseconds() - t0 > timeoutNanos { report.error = "query-migrate still '\(st)' at the timeout"; break }
            usleepNanos(10_000_000)
        }
        _ = try? sq.execute("quit", [:])
        report.sourceConsole = src.consoleText
        if report.status == "completed" {
            report.destinationExit = dst.wait(timeoutNanos: timeoutNanos)
            if report.destinationExit == nil { report.error = "the destination's guest did not power off within \(timeoutNanos / 1_000_000_000) s" }
        }
        report.destinationConsole = dst.consoleText
        return report
    }

    /// A loopback TCP port nobody listens on now.
    static func freePort() throws(KVMError) -> UInt16 {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw KVMError.call("socket", lastErrno()) }
        defer { close(fd) }
        var a = sockaddr_in()
        a.sin_family = sa_family_t(AF_INET)
        a.sin_addr.s_addr = inet_addr("127.0.0.1")
        a.sin_port = 0
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        let rc = withUnsafeMutablePointer(to: &a) { p in p.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) } }
        guard rc == 0 else { throw KVMError.call("bind(127.0.0.1:0)", lastErrno()) }
        _ = withUnsafeMutablePointer(to: &a) { p in p.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
        return UInt16(bigEndian: a.sin_port)
    }
}

/// A QMP connection over a unix socket: one command at a time, events skipped.
final class QMP {
    let fd: Int32
    var buffer: [UInt8] = []

    init(path: String, process: QEMU.Machine, timeoutNanos: UInt64 = 30_000_000_000) throws(KVMError) {
        let t0 = monotonicNanoseconds()
        var connected: Int32 = -1
        while connected < 0 {
            let s = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
            guard s >= 0 else { throw KVMError.call("socket(AF_UNIX)", lastErrno()) }
            var a = sockaddr_un()
            a.sun_family = sa_family_t(AF_UNIX)
            let bytes = Array(path.utf8)
            guard bytes.count < MemoryLayout.size(ofValue: a.sun_path) else { close(s); throw KVMError.invalid("QMP socket path too long: \(path)") }
            withUnsafeMutableBytes(of: &a.sun_path) { p in for (i, b) in bytes.enumerated() { p[i] = b } }
            let rc = withUnsafePointer(to: &a) { p in p.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(s, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
            if rc == 0 { connected = s; break }
            close(s)
            if !process.process.isRunning { throw KVMError.invalid("QEMU exited before its QMP socket opened: \(process.stderrText)") }
            if monotonicNanoseconds() - t0 > timeoutNanos { throw KVMError.invalid("QMP socket \(path) did not open within \(timeoutNanos / 1_000_000_000) s") }
            usleepNanos(10_000_000)
        }
        fd = connected
        _ = try readMessage()  // the greeting
        _ = try execute("qmp_capabilities", [:])
    }
    deinit { close(fd) }

    func readMessage() throws(KVMError) -> [String: Any] {
        while true {
            if let nl = buffer.firstIndex(of: 10) {
                let line = Array(buffer[..<nl])
                buffer.removeFirst(nl + 1)
                if line.allSatisfy({ $0 == 13 || $0 == 32 }) { continue }
                guard let o = try? JSONSerialization.jsonObject(with: Data(line)) as? [String: Any] else {
                    throw KVMError.invalid("QMP: not a JSON object: \(String(decoding: line, as: UTF8.self))")
                }
                return o
            }
            var chunk = [UInt8](repeating: 0, count: 65536)
            let n = read(fd, &chunk, chunk.count)
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw KVMError.invalid("QMP: connection closed") }
            buffer += chunk[0..<n]
        }
    }

    /// Sends a command and returns its "return" object (an error reply throws).
    func execute(_ command: String, _ arguments: [String: Any]) throws(KVMError) -> [String: Any] {
        var msg: [String: Any] = ["execute": command]
        if !arguments.isEmpty { msg["arguments"] = arguments }
        guard let data = try? JSONSerialization.data(withJSONObject: msg) else { throw KVMError.invalid("QMP: cannot encode \(command)") }
        let bytes = Array(data) + [10]
        var off = 0
        while off < bytes.count {
            let n = bytes[off...].withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw KVMError.invalid("QMP: write of \(command) failed") }
            off += n
        }
        while true {
            let r = try readMessage()
            if r["event"] != nil { continue }
            if let e = r["error"] as? [String: Any] { throw KVMError.invalid("QMP \(command): \(e["desc"] as? String ?? "\(e)")") }
            if let ret = r["return"] { return ret as? [String: Any] ?? [:] }
        }
    }
}
