#if canImport(Glibc)
import Glibc
#endif

/// An owned file descriptor: closed exactly once, in `deinit`. A class (not ~Copyable) because
/// vCPU and pager threads share it; the descriptor number never changes.
final class FileDescriptor: @unchecked Sendable {
    let raw: Int32
    init(_ raw: Int32) { self.raw = raw }
    deinit { _ = Glibc.close(raw) }

    /// open(2).
    static func open(_ path: String, _ flags: Int32, mode: mode_t = 0) throws(KVMError) -> FileDescriptor {
        let fd = Glibc.open(path, flags | O_CLOEXEC, mode)
        if fd < 0 { throw KVMError.call("open(\(path))", lastErrno()) }
        return FileDescriptor(fd)
    }
}

/// An owned mmap'd range: unmapped exactly once, in `deinit`.
final class Mapping: @unchecked Sendable {
    let base: UnsafeMutableRawPointer
    let size: Int

    /// mmap(2) of `size` bytes. `alignment` > page size over-maps and trims (for THP).
    init(size: Int, prot: Int32 = PROT_READ | PROT_WRITE, flags: Int32 = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
         fd: Int32 = -1, offset: off_t = 0, alignment: Int = 4096, what: String) throws(KVMError) {
        if alignment <= 4096 || fd >= 0 {
            let p = mmap(nil, size, prot, flags, fd, offset)
            guard let p, p != MAP_FAILED else { throw KVMError.call("mmap(\(what), \(size) bytes)", lastErrno()) }
            base = p
        } else {
            let total = size + alignment
            let p = mmap(nil, total, prot, flags, -1, 0)
            guard let p, p != MAP_FAILED else { throw KVMError.call("mmap(\(what), \(total) bytes)", lastErrno()) }
            let start = UInt(bitPattern: p)
            let aligned = (start + UInt(alignment) - 1) & ~(UInt(alignment) - 1)
            let head = Int(aligned - start)
            if head > 0 { munmap(p, head) }
            let tail = total - head - size
            // SAFETY: aligned + size lies inside the mapping of `total` bytes just made.
            if tail > 0 { munmap(UnsafeMutableRawPointer(bitPattern: aligned + UInt(size))!, tail) }
            base = UnsafeMutableRawPointer(bitPattern: aligned)!
        }
        self.size = size
    }
    deinit { munmap(base, size) }
}

/// Monotonic nanoseconds (CLOCK_MONOTONIC).
@inline(__always) public func monotonicNanoseconds() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
}

/// Sleeps `nanos` nanoseconds (nanosleep(2), restarted on EINTR).
public func usleepNanos(_ nanos: UInt64) {
    var req = timespec(tv_sec: Int(nanos / 1_000_000_000), tv_nsec: Int(nanos % 1_000_000_000))
    var rem = timespec()
    while nanosleep(&req, &rem) != 0 && errno == EINTR { req = rem }
}

/// This process's resource usage (getrusage(RUSAGE_SELF)): all threads, vCPUs included.
public struct ProcessUsage: Sendable {
    public var minorFaults: UInt64
    public var majorFaults: UInt64
    public var userSeconds: Double
    public var systemSeconds: Double
    public static func now() -> ProcessUsage {
        var u = rusage()
        getrusage(RUSAGE_SELF.rawValue, &u)
        return ProcessUsage(
            minorFaults: UInt64(u.ru_minflt), majorFaults: UInt64(u.ru_majflt),
            userSeconds: Double(u.ru_utime.tv_sec) + Double(u.ru_utime.tv_usec) / 1e6,
            systemSeconds: Double(u.ru_stime.tv_sec) + Double(u.ru_stime.tv_usec) / 1e6)
    }
}

/// A dedicated pthread: blocking KVM_RUN and userfaultfd reads live here, never on the Swift
/// concurrency pool.
final class DedicatedThread: @unchecked Sendable {
    private var thread: pthread_t = 0
    private let body: () -> Void
    private var joined = false

    private init(body: @escaping () -> Void) { self.body = body }

    /// Starts `body` on a new pthread.
    static func start(name: String, _ body: @escaping @Sendable () -> Void) throws(KVMError) -> DedicatedThread {
        let t = DedicatedThread(body: body)
        let box = Unmanaged.passRetained(t).toOpaque()
        var tid: pthread_t = 0
        let rc = pthread_create(&tid, nil, { arg in
            // SAFETY: `arg` is the retained DedicatedThread passed below; released here once.
            let t = Unmanaged<DedicatedThread>.fromOpaque(arg!).takeRetainedValue()
            t.body()
            return nil
        }, box)
        if rc != 0 {
            Unmanaged<DedicatedThread>.fromOpaque(box).release()
            throw KVMError.call("pthread_create(\(name))", Errno(rawValue: rc))
        }
        t.thread = tid
        return t
    }

    /// Waits for the thread to end.
    func join() {
        if joined { return }
        joined = true
        pthread_join(thread, nil)
    }
}

/// Runs `body` on a dedicated pthread and returns its result; the caller waits.
public func onDedicatedThread<T: Sendable>(name: String, _ body: @escaping @Sendable () throws(KVMError) -> T) throws(KVMError) -> T {
    let box = ResultBox<T>()
    let t = try DedicatedThread.start(name: name) {
        do { box.value = .success(try body()) } catch let e as KVMError { box.value = .failure(e) } catch {}
    }
    t.join()
    switch box.value! {
    case .success(let v): return v
    case .failure(let e): throw e
    }
}

/// Runs `body` on a dedicated pthread; the awaiting task is suspended, no pool thread blocks.
func onDedicatedThreadAsync<T: Sendable>(name: String, _ body: @escaping @Sendable () throws(KVMError) -> T) async throws(KVMError) -> T {
    let r: Result<T, KVMError> = await withCheckedContinuation { (c: CheckedContinuation<Result<T, KVMError>, Never>) in
        do {
            let t = try DedicatedThread.start(name: name) {
                let r: Result<T, KVMError>
                do { r = .success(try body()) } catch let e as KVMError { r = .failure(e) } catch { r = .failure(.invalid("\(error)")) }
                c.resume(returning: r)
            }
            _ = t  // detached by design: it ends by itself after resuming
            pthread_detach(t.threadID)
        } catch let e as KVMError {
            c.resume(returning: .failure(e))
        } catch {}
    }
    return try r.get()
}

extension DedicatedThread {
    var threadID: pthread_t { joined = true; return thread }
}

final class ResultBox<T>: @unchecked Sendable {
    var value: Result<T, KVMError>?
}

/// The calling thread's scheduler statistics from the host kernel (/proc/thread-self/schedstat,
/// Documentation/scheduler/sched-stats.rst): nanoseconds on a CPU, nanoseconds runnable but
/// waiting on a run queue (the host's CPU contention as this thread sees it: a vCPU's steal
/// time), and time slices run. Nil where the file is absent (CONFIG_SCHEDSTATS off).
public struct ThreadSchedStat: Sendable {
    public var runNanos: UInt64
    public var waitNanos: UInt64
    public var slices: UInt64

    public static func current() -> ThreadSchedStat? {
        let fd = open("/proc/thread-self/schedstat", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var buf = [UInt8](repeating: 0, count: 128)
        let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, 127) }
        guard n > 0 else { return nil }
        let f = String(decoding: buf[0..<n], as: UTF8.self).split(whereSeparator: { $0 == " " || $0 == "\n" }).compactMap { UInt64($0) }
        guard f.count >= 3 else { return nil }
        return ThreadSchedStat(runNanos: f[0], waitNanos: f[1], slices: f[2])
    }

    public func since(_ b: ThreadSchedStat) -> ThreadSchedStat {
        ThreadSchedStat(runNanos: runNanos &- b.runNanos, waitNanos: waitNanos &- b.waitNanos, slices: slices &- b.slices)
    }
}

/// One value handed from one thread to another: `put` once (later puts are ignored), `take`
/// waits for it. A mutex and a condition variable, so the hand-off is synchronized.
final class Handoff<T>: @unchecked Sendable {
    private var lock = pthread_mutex_t()
    private var cond = pthread_cond_t()
    private var value: T?
    init() {
        pthread_mutex_init(&lock, nil)
        pthread_cond_init(&cond, nil)
    }
    deinit {
        pthread_cond_destroy(&cond)
        pthread_mutex_destroy(&lock)
    }
    func put(_ v: T) {
        pthread_mutex_lock(&lock)
        if value == nil { value = v }
        pthread_cond_broadcast(&cond)
        pthread_mutex_unlock(&lock)
    }
    func take() -> T {
        pthread_mutex_lock(&lock)
        while value == nil { pthread_cond_wait(&cond, &lock) }
        let v = value!
        pthread_mutex_unlock(&lock)
        return v
    }
}

/// The text of a small file (sysfs, procfs: at most 4 KiB read), whitespace trimmed.
func readSmallTextFile(_ path: String) throws(KVMError) -> String {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    if fd < 0 { throw KVMError.call("open(\(path))", lastErrno()) }
    defer { close(fd) }
    var buf = [UInt8](repeating: 0, count: 4096)
    let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
    if n < 0 { throw KVMError.call("read(\(path))", lastErrno()) }
    return String(decoding: buf[0..<n], as: UTF8.self).trimmingWhitespace
}

fileprivate extension String {
    var trimmingWhitespace: String {
        var s = Substring(self)
        while let c = s.first, c.isWhitespace { s.removeFirst() }
        while let c = s.last, c.isWhitespace { s.removeLast() }
        return String(s)
    }
}
