import MemVirtCore
#if canImport(Glibc)
import Glibc
#endif

/// The destination's ALIVE messages while its guest runs after the switch: the source waits
/// for RESULT as long as the workload takes, and its idle timeout then means a dead peer.
final class Heartbeat: @unchecked Sendable {
    private var lock = pthread_mutex_t()
    private var cond = pthread_cond_t()
    private var stopping = false
    private var thread: DedicatedThread?

    init(channel: MigrationChannel, everyNanos: UInt64) throws(KVMError) {
        pthread_mutex_init(&lock, nil)
        pthread_cond_init(&cond, nil)
        thread = try DedicatedThread.start(name: "memvirt-heartbeat") { [self] in
            while wait(everyNanos) {
                do { try channel.send(.alive) } catch { return }
            }
        }
    }
    deinit {
        stop()
        pthread_cond_destroy(&cond)
        pthread_mutex_destroy(&lock)
    }

    /// Sleeps `nanos` or until stopped; false once stopped.
    private func wait(_ nanos: UInt64) -> Bool {
        pthread_mutex_lock(&lock)
        defer { pthread_mutex_unlock(&lock) }
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        let t = UInt64(ts.tv_nsec) + nanos
        ts.tv_sec += Int(t / 1_000_000_000)
        ts.tv_nsec = Int(t % 1_000_000_000)
        while !stopping {
            if pthread_cond_timedwait(&cond, &lock, &ts) == ETIMEDOUT { return !stopping }
        }
        return false
    }

    /// Stops and joins the thread (idempotent).
    func stop() {
        pthread_mutex_lock(&lock)
        stopping = true
        pthread_cond_broadcast(&cond)
        let t = thread
        thread = nil
        pthread_mutex_unlock(&lock)
        t?.join()
    }
}
