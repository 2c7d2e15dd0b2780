import CKVM
import MemVirtCore
#if canImport(Glibc)
import Glibc
#endif

/// A minimal userfaultfd handler for `kvm calibrate`: missing faults on pages in `zeroPages`
/// are served with UFFDIO_ZEROPAGE, all others with UFFDIO_COPY of a zero page; each fault's
/// service time (message read to ioctl done) is kept.
final class UffdServer: @unchecked Sendable {
    let region: GuestMemoryRegion
    let zeroPages: Range<Int>
    let uffd: FileDescriptor
    let stopRead: FileDescriptor
    let stopWrite: FileDescriptor
    let buffer: UnsafeMutableRawPointer
    var thread: DedicatedThread?
    private var lock = pthread_mutex_t()
    private var samples: [Double] = []
    private var failure: KVMError?
    /// The handler thread's id (set when it starts), for pinning it from outside while it
    /// waits in ppoll.
    private var handlerThread: Int32?

    let realtime: Bool

    init(region: GuestMemoryRegion, zeroPages: Range<Int>, realtime: Bool = false) throws(KVMError) {
        self.realtime = realtime
        self.region = region
        self.zeroPages = zeroPages
        uffd = try userfaultfdForMissing(region, purpose: "calibration pager")
        (stopRead, stopWrite) = try stopPipe()
        buffer = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        buffer.initializeMemory(as: UInt8.self, repeating: 0, count: 4096)
        pthread_mutex_init(&lock, nil)
    }

    deinit {
        stop()
        buffer.deallocate()
        pthread_mutex_destroy(&lock)
    }

    func start() throws(KVMError) {
        guard thread == nil else { return }
        thread = try DedicatedThread.start(name: "memvirt-cal-uffd") { [self] in loop() }
    }

    func stop() {
        guard let t = thread else { return }
        var one: UInt8 = 1
        _ = write(stopWrite.raw, &one, 1)
        t.join()
        thread = nil
    }

    var error: KVMError? {
        pthread_mutex_lock(&lock); defer { pthread_mutex_unlock(&lock) }
        return failure
    }

    func resetSamples() {
        pthread_mutex_lock(&lock); defer { pthread_mutex_unlock(&lock) }
        samples.removeAll(keepingCapacity: true)
    }

    func takeSamples() -> [Double] {
        pthread_mutex_lock(&lock); defer { pthread_mutex_unlock(&lock) }
        let s = samples
        samples.removeAll(keepingCapacity: true)
        return s
    }

    /// Restricts the handler thread to the CPUs of `mask` (0-63); `nil`: every CPU in
    /// `allowed`. Called while the thread waits for a fault (between batches). False when
    /// refused or the thread has not started.
    @discardableResult func pin(_ mask: UInt64?, allowed: UInt64) -> Bool {
        pthread_mutex_lock(&lock)
        let t = handlerThread
        pthread_mutex_unlock(&lock)
        guard let t else { return false }
        return setAffinityMask(mask ?? allowed, tid: t)
    }

    private func fail(_ e: KVMError) {
        pthread_mutex_lock(&lock); failure = e; pthread_mutex_unlock(&lock)
    }

    private func loop() {
        var fds = [pollfd(fd: uffd.raw, events: Int16(POLLIN), revents: 0), pollfd(fd: stopRead.raw, events: Int16(POLLIN), revents: 0)]
        let msgSize = 32
        var msgs = [UInt8](repeating: 0, count: msgSize * 16)
        let base = region.hostAddress.rawValue
        if realtime { enterRealtimeScheduling() }
        pthread_mutex_lock(&lock); handlerThread = ckvm_gettid(); pthread_mutex_unlock(&lock)
        while true {
            let n = ckvm_ppoll_ns(&fds, 2, -1)
            if n < 0 { if n == -EINTR { continue }; fail(.call("ppoll(userfaultfd)", Errno(rawValue: -n))); return }
            if fds[1].revents != 0 { return }
            if fds[0].revents == 0 { continue }
            let got = msgs.withUnsafeMutableBytes { read(uffd.raw, $0.baseAddress, $0.count) }
            let t0 = monotonicNanoseconds()
            if got < 0 {
                if errno == EAGAIN || errno == EINTR { continue }
                fail(.call("read(userfaultfd)", lastErrno()))
                return
            }
            for i in 0..<(got / msgSize) {
                let (event, address) = msgs.withUnsafeBytes { b in
                    (b[i * msgSize], b.loadUnaligned(fromByteOffset: i * msgSize + 16, as: UInt64.self))
                }
                guard event == UInt8(UFFD_EVENT_PAGEFAULT), address >= base, address - base < region.size else { continue }
                let page = Int((address - base) / 4096)
                let dst = base + UInt64(page) * 4096
                var rc: Int32
                if zeroPages.contains(page) {
                    var z = uffdio_zeropage(range: uffdio_range(start: dst, len: 4096), mode: 0, zeropage: 0)
                    rc = ckvm_uffdio_zeropage(uffd.raw, &z)
                    while rc == -EAGAIN { z.zeropage = 0; rc = ckvm_uffdio_zeropage(uffd.raw, &z) }
                } else {
                    var c = uffdio_copy(dst: dst, src: UInt64(UInt(bitPattern: buffer)), len: 4096, mode: 0, copy: 0)
                    rc = ckvm_uffdio_copy(uffd.raw, &c)
                    while rc == -EAGAIN { c.copy = 0; rc = ckvm_uffdio_copy(uffd.raw, &c) }
                }
                if rc == -EEXIST { continue }  // served already (a repeated message)
                if rc < 0 { fail(.call(zeroPages.contains(page) ? "UFFDIO_ZEROPAGE(page \(page))" : "UFFDIO_COPY(page \(page))", Errno(rawValue: -rc))); return }
                let dt = Double(monotonicNanoseconds() - t0)
                pthread_mutex_lock(&lock); samples.append(dt); pthread_mutex_unlock(&lock)
            }
        }
    }
}
