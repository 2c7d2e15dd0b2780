import CKVM
#if canImport(Glibc)
import Glibc
#endif

/// Stops running vCPUs from another thread, the way api.rst describes: set `immediate_exit`
/// in each vCPU's kvm_run, then signal its thread (SIGUSR1, a handler that does nothing and no
/// SA_RESTART), so a KVM_RUN in progress returns EINTR and one about to start returns at once
/// (after completing any pending I/O, which keeps the saved state consistent). `GuestVM.execute`
/// then returns with `stopped`; `resume()` clears the flags so the same vCPUs can go on.
public final class VCPUKicker: @unchecked Sendable {
    let g: GuestVM
    let flag: UnsafeMutablePointer<UInt32>
    var threads: [pthread_t?]
    var lock = pthread_mutex_t()

    public init(vm: GuestVM) {
        g = vm
        flag = .allocate(capacity: 1)
        flag.initialize(to: 0)
        threads = [pthread_t?](repeating: nil, count: vm.vcpus.count)
        pthread_mutex_init(&lock, nil)
        Self.installHandler
    }
    deinit { flag.deallocate(); pthread_mutex_destroy(&lock) }

    static let installHandler: Void = {
        var sa = sigaction()
        sa.__sigaction_handler.sa_handler = { _ in }
        sigemptyset(&sa.sa_mask)
        sa.sa_flags = 0
        sigaction(SIGUSR1, &sa, nil)
    }()

    /// Called on a vCPU's thread before it runs.
    func register(_ index: Int) {
        // The thread may have inherited a mask that blocks SIGUSR1 (a test runner's worker
        // threads do): a blocked signal never interrupts KVM_RUN, so unblock it here.
        var set = sigset_t()
        sigemptyset(&set)
        sigaddset(&set, SIGUSR1)
        pthread_sigmask(SIG_UNBLOCK, &set, nil)
        pthread_mutex_lock(&lock)
        threads[index] = pthread_self()
        pthread_mutex_unlock(&lock)
    }

    func unregister(_ index: Int) {
        pthread_mutex_lock(&lock)
        threads[index] = nil
        pthread_mutex_unlock(&lock)
    }

    public var stopRequested: Bool { ckvm_load_acquire_u32(flag) != 0 }

    /// Asks every vCPU to leave KVM_RUN (callers then join their threads).
    public func stop() {
        ckvm_store_release_u32(flag, 1)
        for v in g.vcpus { ckvm_set_immediate_exit(v.run, 1) }
        pthread_mutex_lock(&lock)
        let ts = threads
        pthread_mutex_unlock(&lock)
        for t in ts { if let t { pthread_kill(t, SIGUSR1) } }
    }

    /// Lets the vCPUs run again (after their threads returned).
    public func resume() {
        for v in g.vcpus { ckvm_set_immediate_exit(v.run, 0) }
        pthread_mutex_lock(&lock)
        for i in threads.indices { threads[i] = nil }
        pthread_mutex_unlock(&lock)
        ckvm_store_release_u32(flag, 0)
    }
}
