import CKVM
import MemVirtCore
import MemVirtGuest
#if canImport(Glibc)
import Glibc
#endif

/// The vCPU threads of a migrating VM: start, stop (kick), join.
struct VCPUThreads {
    let g: GuestVM
    let kicker: VCPUKicker
    /// The guest kernel that runs the vCPUs (KernelMigration), or nil: each vCPU runs its
    /// command (`GuestVM.execute`).
    let kernel: GuestKernel?
    var threads: [DedicatedThread] = []
    var boxes: [ResultBox<CommandOutcome>] = []
    var kernelBox = ResultBox<[VCPUSchedulerReport]>()
    /// The guest kernel's reports, one per vCPU per run so far (summed when reported).
    var kernelReports: [VCPUSchedulerReport] = []
    var kernelNanos: UInt64 = 0
    var kernelStarted: UInt64 = 0
    /// The counting threads' total when this side first ran them (a destination goes on from
    /// the source's counts): increments here are counted from it.
    var counterBase: UInt64? = nil
    var done: [Bool]
    var stopped = false

    init(g: GuestVM, kicker: VCPUKicker, kernel: GuestKernel? = nil) {
        self.g = g
        self.kicker = kicker
        self.kernel = kernel
        done = g.vcpus.map { _ in false }
    }

    mutating func start() throws(KVMError) {
        stopped = false
        if let k = kernel {
            let box = ResultBox<[VCPUSchedulerReport]>()
            kernelBox = box
            if counterBase == nil { counterBase = try KernelMigration.counters(g).reduce(0, +) }
            kernelStarted = monotonicNanoseconds()
            // Reset here, not on the new thread: a stop requested before that thread gets going
            // must not be wiped.
            k.prepareRun()
            threads = [try DedicatedThread.start(name: "memvirt-guest-kernel") {
                do { box.value = .success(try k.run(forNanos: 24 * 3_600_000_000_000, resetStop: false)) } catch let e as KVMError { box.value = .failure(e) } catch {}
            }]
            return
        }
        boxes = g.vcpus.map { _ in ResultBox<CommandOutcome>() }
        threads = []
        for (i, box) in boxes.enumerated() where !done[i] {
            let g = self.g, k = kicker
            threads.append(try DedicatedThread.start(name: "memvirt-vcpu\(i)") {
                do { box.value = .success(try g.execute(vcpu: i, kicker: k)) } catch let e as KVMError { box.value = .failure(e) } catch {}
            })
        }
    }

    /// A destination prepared before the stop: one thread per vCPU, created now and waiting at
    /// `gate`; `gate.open(skip:)` lets them into KVM_RUN (those marked done return at once),
    /// `gate.cancel()` ends them without running. Not for the guest kernel (its scheduler
    /// state arrives with STATE).
    mutating func startGated(_ gate: StartGate) throws(KVMError) {
        precondition(kernel == nil, "gated start is for vCPUs running their commands")
        stopped = false
        boxes = g.vcpus.map { _ in ResultBox<CommandOutcome>() }
        threads = []
        for (i, box) in boxes.enumerated() {
            let g = self.g, k = kicker
            threads.append(try DedicatedThread.start(name: "memvirt-vcpu\(i)") {
                guard gate.wait(vcpu: i) else { return }
                gate.entering()
                do { box.value = .success(try g.execute(vcpu: i, kicker: k)) } catch let e as KVMError { box.value = .failure(e) } catch {}
            })
        }
    }

    /// True when every vCPU reported DONE (read without joining: a hint).
    var allDoneFast: Bool {
        if let k = kernel { return k.finished }
        return boxes.allSatisfy { b in if case .success(let o)? = b.value { return !o.stopped } else { return false } }
    }

    /// The guest kernel's account so far (nil without one).
    func kernelReport() throws(KVMError) -> KernelMigrationReport? {
        guard let k = kernel else { return nil }
        var r = KernelMigrationReport(asyncPF: k.options.asyncPF)
        r.add(kernelReports)
        r.counterIncrements = try KernelMigration.counters(g).reduce(0, +) &- (counterBase ?? 0)
        r.counterPerSecond = kernelNanos > 0 ? Double(r.counterIncrements) / (Double(kernelNanos) / 1e9) : 0
        // How long the counting threads held their vCPUs, from the scheduler's clock: robust to
        // the counting loop's own speed, which varies between runs on a shared host.
        let held = kernelReports.map { $0.threadNanos[KernelMigration.counterThread($0.vcpu)] ?? 0 }.reduce(0, +)
        if kernelNanos > 0 { r.counterShare = Double(held) / Double(kernelNanos) / Double(max(1, g.vcpus.count)) }
        return r
    }

    /// Waits for the threads; marks the vCPUs that finished their workload.
    mutating func join() throws(KVMError) {
        for t in threads { t.join() }
        if let k = kernel {
            threads = []
            guard let r = kernelBox.value else { return }
            kernelNanos += monotonicNanoseconds() - kernelStarted
            let reports = try r.get()
            kernelReports += reports
            for i in g.vcpus.indices { done[i] = k.isDone(KernelMigration.workloadThread(i)) }
            kernelBox = ResultBox()
            return
        }
        for (i, b) in boxes.enumerated() {
            guard let r = b.value else { continue }
            let o = try r.get()
            if !o.stopped { done[i] = true }
        }
        threads = []
    }

    /// Kicks every vCPU out of KVM_RUN and waits for them.
    mutating func stop() throws(KVMError) {
        if let k = kernel { k.requestStop() } else { kicker.stop() }
        try join()
        stopped = true
    }
}

/// Where a prepared destination's vCPU threads wait for STATE (see `VCPUThreads.startGated`).
final class StartGate: @unchecked Sendable {
    private var lock = pthread_mutex_t()
    private var cond = pthread_cond_t()
    private enum State { case waiting, open, cancelled }
    private var state = State.waiting
    private var skip: [Bool] = []
    private var waiting = 0
    private var _firstEntry: UInt64? = nil
    init() { pthread_mutex_init(&lock, nil); pthread_cond_init(&cond, nil) }
    deinit { pthread_cond_destroy(&cond); pthread_mutex_destroy(&lock) }

    /// Blocks until opened (true: run vCPU `vcpu`) or cancelled (false).
    func wait(vcpu: Int) -> Bool {
        pthread_mutex_lock(&lock)
        defer { pthread_mutex_unlock(&lock) }
        waiting += 1
        pthread_cond_broadcast(&cond)
        while state == .waiting { pthread_cond_wait(&cond, &lock) }
        return state == .open && !(vcpu < skip.count && skip[vcpu])
    }

    /// Waits until `n` threads wait at the gate (they exist and are parked: the switch does
    /// not pay for their creation).
    func awaitWaiting(_ n: Int) {
        pthread_mutex_lock(&lock)
        while waiting < n && state == .waiting { pthread_cond_wait(&cond, &lock) }
        pthread_mutex_unlock(&lock)
    }

    /// Lets the threads run, except those with `skip` set (their vCPU finished at the source).
    func open(skip s: [Bool]) {
        pthread_mutex_lock(&lock)
        if state == .waiting { skip = s; state = .open }
        pthread_cond_broadcast(&cond)
        pthread_mutex_unlock(&lock)
    }

    /// Ends the waiting threads without running (no-op once open).
    func cancel() {
        pthread_mutex_lock(&lock)
        if state == .waiting { state = .cancelled }
        pthread_cond_broadcast(&cond)
        pthread_mutex_unlock(&lock)
    }

    var isOpen: Bool { pthread_mutex_lock(&lock); defer { pthread_mutex_unlock(&lock) }; return state == .open }

    /// A thread is about to enter KVM_RUN: the first one's CLOCK_REALTIME is kept.
    func entering() {
        let now = LiveMigration.realtimeNanos()
        pthread_mutex_lock(&lock)
        if _firstEntry == nil { _firstEntry = now }
        pthread_mutex_unlock(&lock)
    }
    /// CLOCK_REALTIME when the first thread entered KVM_RUN (nil: none yet).
    var firstEntry: UInt64? { pthread_mutex_lock(&lock); defer { pthread_mutex_unlock(&lock) }; return _firstEntry }
}
