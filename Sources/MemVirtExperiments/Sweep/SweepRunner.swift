import Foundation
import MemVirtCore
import MemVirtReport

#if canImport(Glibc)
import Glibc
#endif

/// Runs sweep points into a result directory:
///
/// - `DIR/<ID>.json`: a finished point (`memvirt.sweep-point/1`: id, index, axes, the
///   scenario, host, seconds, and the run's own JSON under `result`), written to a temporary
///   name in `DIR/.work`, fsynced and renamed, so a killed run leaves no partial result;
/// - `DIR/<ID>.err`: a failed point's stderr and exit status (removed when it later succeeds);
/// - `DIR/runs.log`: one line appended per finished run (`done|failed ID index seconds host pid`),
///   the audit trail that shows no point ran twice;
/// - `DIR/.work/`: scenario files, temporary outputs and one lock file per point.
///
/// A point whose result exists is skipped. A point is run only under an exclusive `flock` on
/// its lock file (released by the kernel when the holder dies), so two sweeps over the same
/// directory (a local one and a Slurm array, or a rerun while orphans finish) never run the
/// same point at once.
public struct SweepRunner: Sendable {
    public var plan: SweepPlan
    public var out: String
    /// The command that runs one point: given the path of the point's scenario file, the argv
    /// of a process that prints the run's JSON object on stdout and exits 0, or fails with a
    /// message on stderr and a non-zero status.
    public var command: @Sendable (_ scenarioPath: String) -> [String]
    private let doneIndex = DoneIndex()

    public static let resultSchema = "memvirt.sweep-point/1"

    public init(plan: SweepPlan, out: String, command: @escaping @Sendable (String) -> [String]) throws {
        self.plan = plan
        self.out = out
        self.command = command
        try Self.makeDirectory(out)
        try Self.makeDirectory(work)
    }

    var work: String { out + "/.work" }
    public func resultPath(_ p: SweepPoint) -> String { "\(out)/\(p.id).json" }
    public func errorPath(_ p: SweepPoint) -> String { "\(out)/\(p.id).err" }

    public enum Outcome: Sendable, Equatable {
        /// Ran and wrote its result.
        case ran
        /// Its result was already there.
        case present
        /// Another process holds its lock (running it now).
        case busy
        /// Ran and failed; the message is the end of its stderr.
        case failed(String)
    }

    /// A point whose process is running.
    public struct Running: Sendable {
        public var point: SweepPoint
        public var pid: pid_t
        var lockFD: Int32
        var stdoutPath: String
        var stderrPath: String
        var started: Double
    }

    /// Starts `p`'s process, or says why not (`.present`, `.busy`).
    ///
    /// A present result is confirmed under the point's lock, where its runs.log line is
    /// checked too: a run killed between renaming its result into place and appending its
    /// `done` line (two files cannot change at once) left a result the log does not show, and
    /// the line is appended then from what the result file records (id, index, seconds, host,
    /// pid). Under the lock the writer has either appended its line or died, so no line is
    /// written twice.
    public func start(_ p: SweepPoint) throws -> Result<Running, SkipReason> {
        let presentBefore = FileManager.default.fileExists(atPath: resultPath(p))
        let lockPath = "\(work)/\(p.id).lock"
        let fd = open(lockPath, O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw InputError("cannot create lock file \(lockPath): \(String(cString: strerror(errno)))") }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            close(fd)
            // Its holder is finishing it (and will log it), or running it now.
            return .failure(presentBefore ? .present : .busy)
        }
        // Checked (again) under the lock: another process may have finished it meanwhile.
        if FileManager.default.fileExists(atPath: resultPath(p)) {
            recordUnloggedResult(p)
            close(fd)
            return .failure(.present)
        }
        let scenarioPath = "\(work)/\(p.id).toml"
        do {
            try Self.writeAtomically(p.scenario, to: scenarioPath, temporaryDirectory: work)
        } catch {
            close(fd)
            throw error
        }
        let tag = "\(p.id).\(getpid())"
        let outPath = "\(work)/\(tag).out"
        let errPath = "\(work)/\(tag).stderr"
        let argv = command(scenarioPath)
        let pid: pid_t
        do {
            pid = try ChildProcess.spawn(argv, stdout: outPath, stderr: errPath)
        } catch {
            close(fd)
            throw error
        }
        return .success(Running(point: p, pid: pid, lockFD: fd, stdoutPath: outPath, stderrPath: errPath, started: Self.now()))
    }

    public enum SkipReason: Error, Sendable { case present, busy }

    /// Records a finished process: the result file, or the `.err` file; a line in runs.log.
    public func finish(_ r: Running, status: Int32) -> Outcome {
        defer {
            unlink(r.stdoutPath)
            unlink(r.stderrPath)
            close(r.lockFD)
        }
        let seconds = Self.now() - r.started
        let stderrText = (try? String(contentsOfFile: r.stderrPath, encoding: .utf8)) ?? ""
        let stdoutText = (try? String(contentsOfFile: r.stdoutPath, encoding: .utf8)) ?? ""
        let host = ProcessInfo.processInfo.hostName
        var failure: String?
        if let why = ChildProcess.describeFailure(status) {
            failure = why
        } else {
            do {
                let v = try JSONReader.parse(stdoutText.trimmingCharacters(in: .whitespacesAndNewlines))
                guard v.asObject != nil else { throw InputError("the run printed JSON that is not an object") }
                let wrapper: JSONValue = .object([
                    ("schema", .string(Self.resultSchema)), ("id", .string(r.point.id)), ("index", .int(Int64(r.point.index))),
                    ("axes", .object(zip(plan.axes, r.point.values).map { ($0.key, $1.json) })),
                    ("scenario", .string(r.point.scenario)), ("host", .string(host)), ("seconds", .double(seconds)),
                    ("pid", .int(Int64(getpid()))), ("result", v),
                ])
                try Self.writeAtomically(wrapper.rendered(pretty: true) + "\n", to: resultPath(r.point), temporaryDirectory: work)
                unlink(errorPath(r.point))
            } catch {
                failure = "its output is not a run result: \(error)"
            }
        }
        let line: String
        let outcome: Outcome
        if let f = failure {
            let text = stderrText + (stderrText.isEmpty || stderrText.hasSuffix("\n") ? "" : "\n") + "memvirt sweep: point \(r.point.id) (index \(r.point.index)) failed: \(f)\n"
            try? Self.writeAtomically(text, to: errorPath(r.point), temporaryDirectory: work)
            let lastLine = stderrText.split(separator: "\n").last.map(String.init) ?? f
            outcome = .failed(lastLine)
            line = "failed"
        } else {
            outcome = .ran
            line = "done"
        }
        appendLog(Self.logLine(line, r.point, seconds: seconds, host: host, pid: Int64(getpid())))
        if failure == nil { doneIndex.insert(r.point.id) }
        return outcome
    }

    static func logLine(_ what: String, _ p: SweepPoint, seconds: Double, host: String, pid: Int64) -> String {
        "\(what) \(p.id) \(p.index) \(String(format: "%.3f", seconds)) \(host) \(pid)\n"
    }

    /// The ids with a `done` line in runs.log, read once and re-read when an id is missing
    /// (other processes append to it too).
    private final class DoneIndex: @unchecked Sendable {
        private let lock = NSLock()
        private var ids: Set<String>?
        func contains(_ id: String, log: String) -> Bool {
            lock.lock(); defer { lock.unlock() }
            if ids?.contains(id) == true { return true }
            ids = Self.read(log)
            return ids!.contains(id)
        }
        func insert(_ id: String) {
            lock.lock(); defer { lock.unlock() }
            ids?.insert(id)
        }
        static func read(_ log: String) -> Set<String> {
            guard let text = try? String(contentsOfFile: log, encoding: .utf8) else { return [] }
            var ids: Set<String> = []
            for line in text.split(separator: "\n") where line.hasPrefix("done ") {
                let fields = line.split(separator: " ")
                if fields.count > 1 { ids.insert(String(fields[1])) }
            }
            return ids
        }
    }

    /// Appends the `done` line of a result whose run died before logging it (see `start`).
    /// Called under the point's lock.
    func recordUnloggedResult(_ p: SweepPoint) {
        let log = "\(out)/runs.log"
        guard !doneIndex.contains(p.id, log: log) else { return }
        let v = (try? String(contentsOfFile: resultPath(p), encoding: .utf8)).flatMap { try? JSONReader.parse($0) }
        let seconds = v?["seconds"]?.asDouble ?? 0
        let host = v?["host"]?.asString ?? "?"
        let pid = v?["pid"]?.asDouble.map { Int64($0) } ?? 0
        appendLog(Self.logLine("done", p, seconds: seconds, host: host, pid: pid))
        doneIndex.insert(p.id)
    }

    /// Runs points one after the other (what `sweep run` and each Slurm array task do).
    public func runSequentially(_ points: some Sequence<SweepPoint>, onOutcome: (SweepPoint, Outcome) -> Void = { _, _ in }) throws -> [Outcome] {
        var outcomes: [Outcome] = []
        for p in points {
            let o: Outcome
            switch try start(p) {
            case .failure(.present): o = .present
            case .failure(.busy): o = .busy
            case .success(let r): o = finish(r, status: try ChildProcess.wait(r.pid))
            }
            onOutcome(p, o)
            outcomes.append(o)
        }
        return outcomes
    }

    /// Runs every missing point with up to `jobs` processes at once (the local backend),
    /// in plan order.
    public func runLocal(jobs: Int, onOutcome: (SweepPoint, Outcome) -> Void = { _, _ in }) throws -> [Outcome] {
        precondition(jobs >= 1)
        var pending = plan.points[...]
        var running: [pid_t: Running] = [:]
        var outcomes: [Outcome] = []
        while !pending.isEmpty || !running.isEmpty {
            while running.count < jobs, let p = pending.first {
                pending = pending.dropFirst()
                switch try start(p) {
                case .failure(.present):
                    onOutcome(p, .present); outcomes.append(.present)
                case .failure(.busy):
                    onOutcome(p, .busy); outcomes.append(.busy)
                case .success(let r):
                    running[r.pid] = r
                }
            }
            guard !running.isEmpty else { continue }
            let (pid, status) = try ChildProcess.waitAny(of: Array(running.keys))
            guard let r = running.removeValue(forKey: pid) else { continue }
            let o = finish(r, status: status)
            onOutcome(r.point, o)
            outcomes.append(o)
        }
        return outcomes
    }

    private func appendLog(_ line: String) {
        let fd = open("\(out)/runs.log", O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
        guard fd >= 0 else { return }
        _ = line.utf8CString.withUnsafeBufferPointer { write(fd, $0.baseAddress, $0.count - 1) }
        close(fd)
    }

    static func now() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) * 1e-9
    }

    static func makeDirectory(_ path: String) throws {
        do {
            try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        } catch {
            throw InputError("cannot create directory '\(path)': \(error.localizedDescription)")
        }
    }

    /// Writes `text` to a temporary file in `temporaryDirectory` (same file system), fsyncs
    /// it, renames it over `path` and fsyncs the directory: readers see the old file or the
    /// whole new one, never a part.
    public static func writeAtomically(_ text: String, to path: String, temporaryDirectory: String) throws {
        let name = (path as NSString).lastPathComponent
        let tmp = "\(temporaryDirectory)/\(name).tmp.\(getpid())"
        let fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw InputError("cannot write \(tmp): \(String(cString: strerror(errno)))") }
        let bytes = Array(text.utf8)
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeBufferPointer { write(fd, $0.baseAddress! + done, $0.count - done) }
            if n < 0 {
                if errno == EINTR { continue }
                let e = String(cString: strerror(errno))
                close(fd); unlink(tmp)
                throw InputError("cannot write \(tmp): \(e)")
            }
            done += n
        }
        guard fsync(fd) == 0 else {
            let e = String(cString: strerror(errno))
            close(fd); unlink(tmp)
            throw InputError("cannot fsync \(tmp): \(e)")
        }
        close(fd)
        guard rename(tmp, path) == 0 else {
            let e = String(cString: strerror(errno))
            unlink(tmp)
            throw InputError("cannot rename \(tmp) to \(path): \(e)")
        }
        let dir = open((path as NSString).deletingLastPathComponent.isEmpty ? "." : (path as NSString).deletingLastPathComponent, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if dir >= 0 { fsync(dir); close(dir) }
    }
}

/// Child processes through posix_spawn, with stdout and stderr sent to files.
public enum ChildProcess {
    public static func spawn(_ argv: [String], stdout: String, stderr: String, newProcessGroup: Bool = false) throws -> pid_t {
        guard let exe = argv.first else { throw InputError("empty command") }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, stdout, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        posix_spawn_file_actions_addopen(&actions, 2, stderr, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        if newProcessGroup {
            posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETPGROUP))
            posix_spawnattr_setpgroup(&attr, 0)
        }
        var cargs: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) } + [nil]
        defer { for p in cargs { free(p) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, exe, &actions, &attr, &cargs, environ)
        guard rc == 0 else { throw InputError("cannot start \(exe): \(String(cString: strerror(rc)))") }
        return pid
    }

    /// Waits for `pid`; its raw wait status.
    public static func wait(_ pid: pid_t) throws -> Int32 {
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 {
            guard errno == EINTR else { throw InputError("waitpid \(pid): \(String(cString: strerror(errno)))") }
        }
        return status
    }

    /// Waits until one of `pids` exits (only those: other children of this process, such as
    /// a test runner's, are left alone); polls every 5 ms.
    public static func waitAny(of pids: [pid_t]) throws -> (pid_t, Int32) {
        while true {
            for pid in pids {
                var status: Int32 = 0
                let r = waitpid(pid, &status, WNOHANG)
                if r == pid { return (pid, status) }
                if r < 0 && errno != EINTR { throw InputError("waitpid \(pid): \(String(cString: strerror(errno)))") }
            }
            usleep(5000)
        }
    }

    /// Nil for exit status 0; otherwise what happened.
    public static func describeFailure(_ status: Int32) -> String? {
        let signal = status & 0x7F
        if signal == 0 {
            let code = (status >> 8) & 0xFF
            return code == 0 ? nil : "exit status \(code)"
        }
        return "killed by signal \(signal)"
    }
}
