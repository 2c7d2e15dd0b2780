import CKVM
import Histogram
import MemVirtCore
import MemVirtGuest
#if canImport(Glibc)
import Glibc
#endif

/// How the userfaultfd pager serves guest RAM.
public struct PagerOptions: Sendable {
    /// At most this many pages resident; older pages are saved to the store and dropped
    /// (MADV_DONTNEED). nil: no limit.
    public var residentLimitPages: Int? = nil
    /// Pages mapped after each faulting page (when missing), in the same UFFDIO_COPY.
    public var readAhead = 0
    /// Directory of the page store (an unlinked O_TMPFILE).
    public var storeDirectory = "/tmp"
    /// The store's service time: a fault whose page lives in the store is served no sooner
    /// than this many nanoseconds after it arrived (a disk; faults overlap, as on a queue).
    /// Zero-filled first touches are served at once.
    public var storeDelayNanos: UInt64 = 0
    /// What the store holds before the guest runs.
    public var storeContent: StoreContent = .empty
    /// Record when each fault's UFFDIO_COPY returned (`PagerReport.copyTimes`): for `kvm
    /// calibrate`'s "page ready" figure.
    public var recordCopyTimes = false
    /// Keep each eviction's pwrite and MADV_DONTNEED and each store read's pread time
    /// (`Pager.takeOperationSamples`): for `kvm calibrate`'s pager phase.
    public var recordOperationSamples = false
    public init() {}

    /// The page store's initial content.
    public enum StoreContent: Sendable, Equatable {
        /// Nothing: a page's first touch is zero-filled.
        case empty
        /// Every page, word at region offset o = memvirt_store_word(o, salt): the whole
        /// region starts "swapped out" and every first touch is a store read.
        case pattern(salt: UInt64)
    }
}

/// What the pager did, with fault service times (HdrHistogram, nanoseconds).
public struct PagerReport: Sendable {
    /// userfaultfd page-fault messages read.
    public var faults: UInt64
    /// Messages for pages already mapped (a retried fault): only woken.
    public var spurious: UInt64
    /// Pages mapped zero-filled (first touch).
    public var zeroFills: UInt64
    /// Pages mapped from the page store (previously evicted).
    public var storeReads: UInt64
    /// Pages mapped ahead of a fault.
    public var readAheadPages: UInt64
    /// Pages saved to the store and dropped with MADV_DONTNEED.
    public var evictions: UInt64
    public var residentLimitPages: Int?
    public var peakResidentPages: Int
    public var serviceNanos: Histogram<UInt64>
    /// With `PagerOptions.recordCopyTimes`: per served fault, its page and when its
    /// UFFDIO_COPY returned (CLOCK_MONOTONIC nanoseconds).
    public var copyTimes: [(page: Int, nanos: UInt64)] = []
    /// With `PagerOptions.recordCopyTimes` and a store delay: per page served after its delay,
    /// how late the pager got to it (nanoseconds after arrival + delay: its ppoll's wake-up).
    public var lateNanos: [UInt64] = []
    /// Where the pager thread's time went (CLOCK_MONOTONIC nanoseconds, summed over the served
    /// faults; instrumentation only): the store's pwrite of evicted pages, their
    /// MADV_DONTNEED (host unmap plus KVM's mmu-notifier zap), the store's pread, the
    /// UFFDIO_COPY ioctl (it also wakes the faulting thread).
    public var phases = PagerPhases()

    /// Time per phase of the pager thread (nanoseconds, sums).
    public struct PagerPhases: Sendable, Equatable {
        public var storeWriteNanos: UInt64 = 0
        public var dontneedNanos: UInt64 = 0
        public var storeReadNanos: UInt64 = 0
        public var copyNanos: UInt64 = 0
        /// From reading a fault's message to its UFFDIO_COPY returned (faults served at once,
        /// no store delay): the handler's whole time per fault.
        public var handlerNanos: UInt64 = 0
        public var handled: UInt64 = 0
        /// From one fault's UFFDIO_COPY returned to the next fault's message read: the
        /// faulting thread's wake-up and retry, its guest running to the next missing page,
        /// that fault's way through KVM into handle_userfault, and the pager's wake-up.
        public var gapNanos: UInt64 = 0
        public var gaps: UInt64 = 0
        public init() {}

        public var json: JSONValue {
            .object([
                ("store_write_ns", .uint(storeWriteNanos)), ("dontneed_ns", .uint(dontneedNanos)), ("store_read_ns", .uint(storeReadNanos)),
                ("uffdio_copy_ns", .uint(copyNanos)), ("handler_ns", .uint(handlerNanos)), ("handled", .uint(handled)),
                ("gap_ns", .uint(gapNanos)), ("gaps", .uint(gaps)),
            ])
        }
    }

    public var json: JSONValue {
        let h = serviceNanos
        return .object([
            ("faults", .uint(faults)), ("spurious", .uint(spurious)), ("zero_fills", .uint(zeroFills)),
            ("store_reads", .uint(storeReads)), ("read_ahead_pages", .uint(readAheadPages)), ("evictions", .uint(evictions)),
            ("resident_limit_pages", residentLimitPages.map { .int(Int64($0)) } ?? .null),
            ("peak_resident_pages", .int(Int64(peakResidentPages))),
            ("service_us", .object([
                ("count", .uint(h.totalCount)), ("mean", .double((h.mean / 10).rounded() / 100)),
                ("p50", .double(Double(h.valueAtPercentile(50)) / 1e3)), ("p90", .double(Double(h.valueAtPercentile(90)) / 1e3)),
                ("p99", .double(Double(h.valueAtPercentile(99)) / 1e3)), ("max", .double(Double(h.max) / 1e3)),
            ])),
            ("phases", phases.json),
        ])
    }
}

/// Per operation of the pager thread, nanoseconds (CLOCK_MONOTONIC around each call).
public struct PagerOperationSamples: Sendable, Equatable {
    /// pwrite(2) of an evicted page to the store.
    public var storeWrite: [Double] = []
    /// madvise(MADV_DONTNEED) of an evicted page (host unmap plus KVM's mmu-notifier zap).
    public var dontneed: [Double] = []
    /// pread(2) of a page back from the store.
    public var storeRead: [Double] = []
    public init() {}
}

/// A userfaultfd pager over one guest RAM region (private anonymous memory, missing mode).
///
/// Its thread waits in poll(2) on the userfaultfd and a stop eventfd. A fault at page p is
/// served by one UFFDIO_COPY of p and up to `readAhead` missing pages after it, zero-filled or
/// read back from the page store. With a resident limit, room is made first: the oldest
/// resident pages (FIFO) are written to the store and dropped with MADV_DONTNEED, which also
/// zaps KVM's shadow/EPT entries through the MMU notifier, so the guest's next access comes
/// back here as a missing fault.
///
/// Why eviction is race-free here: it happens only while serving a fault, and the runner
/// allows a pager only with one vCPU. That vCPU is inside KVM's fault path (waiting on this
/// userfaultfd, or about to) until the UFFDIO_COPY below, so no guest write can land between
/// saving a page and dropping it. With several vCPUs a guest write racing with an eviction
/// could be lost (it would need UFFDIO_WRITEPROTECT first): the async-PF benchmark, which
/// runs several vCPUs, only reads its pager-backed memory and checks every word it reads.
///
/// With a store delay, faults wait in `pending` (arrival order = due order, the delay being
/// constant) and the thread sleeps in ppoll until the first is due; a second message for a
/// page already pending (KVM's async worker retrying, another vCPU) is not queued twice: the
/// UFFDIO_COPY wakes every thread waiting on the page.
/// KVM may send two messages for one fault (a FOLL_NOWAIT attempt, then the blocking one):
/// the second finds the page resident and is only woken.
public final class Pager: @unchecked Sendable {
    let region: GuestMemoryRegion
    let options: PagerOptions
    let uffd: FileDescriptor
    let stopFD: FileDescriptor
    let stopWriteFD: FileDescriptor
    let store: FileDescriptor
    let pages: Int
    var resident: [Bool]
    var stored: [Bool]
    var fifo: [Int32]
    var fifoHead = 0
    var residentCount = 0
    var thread: DedicatedThread?
    var failure: KVMError?
    /// Faults waiting for the store's service time: (page, arrival nanoseconds).
    var pending: [(page: Int, arrived: UInt64)] = []
    var pendingHead = 0
    var isPending: [Bool]
    /// Faults queued but not yet served, published for other threads.
    let outstandingCell: UnsafeMutablePointer<UInt32> = {
        let p = UnsafeMutablePointer<UInt32>.allocate(capacity: 1)
        p.initialize(to: 0)
        return p
    }()
    /// Faults waiting for the store's service time (safe to read from any thread).
    public var outstanding: Int { Int(ckvm_load_acquire_u32(outstandingCell)) }
    let buffer: UnsafeMutableRawPointer
    /// When the last UFFDIO_COPY returned (0: none yet), for `PagerPhases.gapNanos`.
    var lastCopyDone: UInt64 = 0
    /// With `recordOperationSamples`: what the thread timed since the last take (under `sampleLock`).
    private var operationSamples = PagerOperationSamples()
    private var sampleLock = pthread_mutex_t()
    var r = PagerReport(faults: 0, spurious: 0, zeroFills: 0, storeReads: 0, readAheadPages: 0, evictions: 0,
                        residentLimitPages: nil, peakResidentPages: 0,
                        serviceNanos: Histogram<UInt64>(lowestDiscernibleValue: 1, highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .three))

    /// Registers `region` (which the guest must not have touched yet) with a new userfaultfd.
    public init(region: GuestMemoryRegion, options: PagerOptions) throws(KVMError) {
        if let l = options.residentLimitPages, l < 1 { throw KVMError.invalid("resident limit must be at least one page") }
        guard options.readAhead >= 0, options.readAhead <= 512 else { throw KVMError.invalid("read-ahead \(options.readAhead): use 0...512 pages") }
        self.region = region
        self.options = options
        pages = Int(region.size / 4096)
        uffd = try userfaultfdForMissing(region, purpose: "pager")
        (stopFD, stopWriteFD) = try stopPipe()
        // O_TMPFILE (= __O_TMPFILE | O_DIRECTORY; Glibc's Swift overlay does not export it).
        store = try FileDescriptor.open(options.storeDirectory, 0o20_200_000 | O_RDWR, mode: 0o600)
        resident = [Bool](repeating: false, count: pages)
        stored = [Bool](repeating: false, count: pages)
        isPending = [Bool](repeating: false, count: pages)
        fifo = []
        fifo.reserveCapacity(pages)
        buffer = UnsafeMutableRawPointer.allocate(byteCount: 4096 * (options.readAhead + 1), alignment: 4096)
        r.residentLimitPages = options.residentLimitPages
        pthread_mutex_init(&sampleLock, nil)
        if case .pattern(let salt) = options.storeContent { try fillStore(salt: salt) }
    }

    /// Writes the pattern of every page into the store (1 MiB at a time).
    private func fillStore(salt: UInt64) throws(KVMError) {
        let chunk = 1 << 20
        let buf = UnsafeMutableRawPointer.allocate(byteCount: chunk, alignment: 4096)
        defer { buf.deallocate() }
        let words = buf.assumingMemoryBound(to: UInt64.self)
        var off: UInt64 = 0
        while off < region.size {
            let n = Int(min(UInt64(chunk), region.size - off))
            for w in 0..<(n / 8) { words[w] = memvirt_store_word(off + UInt64(w) * 8, salt) }
            if pwrite(store.raw, buf, n, off_t(off)) != n { throw KVMError.call("pwrite(page store)", lastErrno()) }
            off += UInt64(n)
        }
        for p in 0..<pages { stored[p] = true }
    }

    deinit {
        stop()
        buffer.deallocate()
        outstandingCell.deallocate()
        pthread_mutex_destroy(&sampleLock)
    }

    /// The operation samples since the last call (`PagerOptions.recordOperationSamples`); safe
    /// while the thread runs.
    public func takeOperationSamples() -> PagerOperationSamples {
        pthread_mutex_lock(&sampleLock); defer { pthread_mutex_unlock(&sampleLock) }
        let s = operationSamples
        operationSamples = PagerOperationSamples()
        return s
    }

    private func recordOperation(_ path: WritableKeyPath<PagerOperationSamples, [Double]>, _ nanos: UInt64) {
        guard options.recordOperationSamples else { return }
        pthread_mutex_lock(&sampleLock); defer { pthread_mutex_unlock(&sampleLock) }
        operationSamples[keyPath: path].append(Double(nanos))
    }

    /// Makes `range` resident before the guest runs (from the store, or zero-filled), in FIFO
    /// order, as if the guest had touched those pages: a run can then start at its steady
    /// state (the resident limit full) instead of filling it first. Call before `start`.
    public func prefill(_ range: Range<Int>) throws(KVMError) {
        guard thread == nil else { throw KVMError.invalid("pager: prefill before start") }
        guard range.lowerBound >= 0, range.upperBound <= pages else {
            throw KVMError.invalid("pager: prefill pages \(range.lowerBound)..<\(range.upperBound) outside the region's \(pages)")
        }
        if let l = options.residentLimitPages, residentCount + range.count > l {
            throw KVMError.invalid("pager: prefill of \(range.count) pages exceeds the resident limit of \(l)")
        }
        let t0 = monotonicNanoseconds()
        for p in range where !resident[p] { try serve(page: p, since: t0, record: false) }
    }

    /// Starts the pager thread.
    public func start() throws(KVMError) {
        guard thread == nil else { return }
        thread = try DedicatedThread.start(name: "memvirt-pager") { [self] in loop() }
    }

    /// Stops the pager thread (idempotent). Faults after this are not served: stop only when
    /// no vCPU runs.
    public func stop() {
        guard let t = thread else { return }
        var one: UInt8 = 1
        _ = write(stopWriteFD.raw, &one, 1)
        t.join()
        thread = nil
    }

    /// The counters and histogram so far (call after `stop`, or accept a racy snapshot).
    public func report() -> PagerReport { r }

    private func loop() {
        var fds = [pollfd(fd: uffd.raw, events: Int16(POLLIN), revents: 0), pollfd(fd: stopFD.raw, events: Int16(POLLIN), revents: 0)]
        let msgSize = 32
        var msgs = [UInt8](repeating: 0, count: msgSize * 64)
        let delay = options.storeDelayNanos
        while failure == nil {
            // Serve what is due, then sleep until the next is due or a message comes.
            var timeout: Int64 = -1
            while pendingHead < pending.count {
                let (page, arrived) = pending[pendingHead]
                let now = monotonicNanoseconds()
                if arrived + delay > now { timeout = Int64(arrived + delay - now); break }
                if options.recordCopyTimes { r.lateNanos.append(now - (arrived + delay)) }
                pendingHead += 1
                isPending[page] = false
                do { try serve(page: page, since: arrived) } catch { failure = error; return }
            }
            if pendingHead == pending.count && pendingHead > 0 { pending.removeAll(keepingCapacity: true); pendingHead = 0 }
            ckvm_store_release_u32(outstandingCell, UInt32(pending.count - pendingHead))
            let n = ckvm_ppoll_ns(&fds, 2, timeout)
            if n < 0 { if n == -EINTR { continue }; failure = .call("ppoll(userfaultfd)", Errno(rawValue: -n)); return }
            if fds[1].revents != 0 { return }
            if fds[0].revents == 0 { continue }
            let got = msgs.withUnsafeMutableBytes { read(uffd.raw, $0.baseAddress, $0.count) }
            let t0 = monotonicNanoseconds()
            if got > 0 && lastCopyDone != 0 && delay == 0 {
                r.phases.gapNanos &+= t0 - lastCopyDone
                r.phases.gaps &+= 1
                lastCopyDone = 0
            }
            if got < 0 {
                if errno == EAGAIN || errno == EINTR { continue }
                failure = .call("read(userfaultfd)", lastErrno())
                return
            }
            for i in 0..<(got / msgSize) {
                let (event, address) = msgs.withUnsafeBytes { b in
                    (b[i * msgSize], b.loadUnaligned(fromByteOffset: i * msgSize + 16, as: UInt64.self))
                }
                guard event == UInt8(UFFD_EVENT_PAGEFAULT) else { continue }
                r.faults += 1
                let base = region.hostAddress.rawValue
                guard address >= base, address - base < region.size else { continue }
                let page = Int((address - base) / 4096)
                if delay > 0 && stored[page] && !resident[page] {
                    if isPending[page] { r.spurious += 1; continue }
                    isPending[page] = true
                    pending.append((page, t0))
                    ckvm_store_release_u32(outstandingCell, UInt32(pending.count - pendingHead))
                    continue
                }
                do { try serve(page: page, since: t0) } catch { failure = error; return }
            }
        }
    }

    private func serve(page: Int, since t0: UInt64, record: Bool = true) throws(KVMError) {
        let base = region.hostAddress.rawValue
        if resident[page] {
            r.spurious += 1
            var range = uffdio_range(start: base + UInt64(page) * 4096, len: 4096)
            _ = ckvm_uffdio_wake(uffd.raw, &range)
            return
        }
        var k = 1
        while k <= options.readAhead, page + k < pages, !resident[page + k] { k += 1 }
        if let limit = options.residentLimitPages {
            k = min(k, limit)
            while residentCount + k > limit && fifoHead < fifo.count {
                try evict(Int(fifo[fifoHead]))
                fifoHead += 1
            }
            if fifoHead > 4096 && fifoHead * 2 > fifo.count {
                fifo.removeFirst(fifoHead)
                fifoHead = 0
            }
        }
        for j in 0..<k {
            let p = page + j
            let dst = buffer + j * 4096
            if stored[p] {
                let s0 = monotonicNanoseconds()
                let n = pread(store.raw, dst, 4096, off_t(p) * 4096)
                if record {
                    let t = monotonicNanoseconds() - s0
                    r.phases.storeReadNanos &+= t
                    recordOperation(\.storeRead, t)
                }
                if n != 4096 { throw KVMError.call("pread(page store, page \(p))", lastErrno()) }
                if record { r.storeReads += 1 }
            } else {
                memset(dst, 0, 4096)
                if record { r.zeroFills += 1 }
            }
        }
        var copy = uffdio_copy(dst: base + UInt64(page) * 4096, src: UInt64(UInt(bitPattern: buffer)), len: UInt64(k) * 4096, mode: 0, copy: 0)
        let c0 = monotonicNanoseconds()
        var rc = ckvm_uffdio_copy(uffd.raw, &copy)
        while rc == -EAGAIN {
            copy.copy = 0
            rc = ckvm_uffdio_copy(uffd.raw, &copy)
        }
        let c1 = monotonicNanoseconds()
        if record {
            r.phases.copyNanos &+= c1 - c0
            if options.storeDelayNanos == 0 {
                r.phases.handlerNanos &+= c1 - t0
                r.phases.handled &+= 1
                lastCopyDone = c1
            }
        }
        if rc < 0 && rc != -EEXIST { _ = try checked(rc, "UFFDIO_COPY(page \(page), \(k) pages)") }
        if record && options.recordCopyTimes { r.copyTimes.append((page, monotonicNanoseconds())) }
        for j in 0..<k {
            resident[page + j] = true
            fifo.append(Int32(page + j))
        }
        residentCount += k
        r.peakResidentPages = max(r.peakResidentPages, residentCount)
        guard record else { return }
        r.readAheadPages += UInt64(k - 1)
        _ = r.serviceNanos.record(monotonicNanoseconds() - t0)
    }

    private func evict(_ q: Int) throws(KVMError) {
        guard resident[q] else { return }
        let p = region.mapping.base + q * 4096
        let w0 = monotonicNanoseconds()
        if pwrite(store.raw, p, 4096, off_t(q) * 4096) != 4096 { throw KVMError.call("pwrite(page store, page \(q))", lastErrno()) }
        let w1 = monotonicNanoseconds()
        if madvise(p, 4096, MADV_DONTNEED) != 0 { throw KVMError.call("madvise(MADV_DONTNEED, page \(q))", lastErrno()) }
        let w2 = monotonicNanoseconds()
        r.phases.storeWriteNanos &+= w1 - w0
        r.phases.dontneedNanos &+= w2 - w1
        recordOperation(\.storeWrite, w1 - w0)
        recordOperation(\.dontneed, w2 - w1)
        stored[q] = true
        resident[q] = false
        residentCount -= 1
        r.evictions += 1
    }

    /// The pager's own failure, if its thread stopped on one.
    public var error: KVMError? { failure }
}

/// A new userfaultfd (non-blocking, close-on-exec) with `region` registered for missing-page
/// faults: the pager's, post-copy's and lazy restore's. The region must not be touched yet.
func userfaultfdForMissing(_ region: GuestMemoryRegion, purpose: String) throws(KVMError) -> FileDescriptor {
    let u = ckvm_userfaultfd(O_CLOEXEC | O_NONBLOCK)
    if u < 0 { throw KVMError.call("userfaultfd(2) for \(purpose) (root or vm.unprivileged_userfaultfd=1 needed)", Errno(rawValue: -u)) }
    let fd = FileDescriptor(u)
    var api = uffdio_api(api: ckvm_uffd_api(), features: 0, ioctls: 0)
    _ = try checked(ckvm_uffdio_api(fd.raw, &api), "UFFDIO_API (\(purpose))")
    var reg = uffdio_register(range: uffdio_range(start: region.hostAddress.rawValue, len: region.size),
                              mode: UInt64(UFFDIO_REGISTER_MODE_MISSING), ioctls: 0)
    _ = try checked(ckvm_uffdio_register(fd.raw, &reg), "UFFDIO_REGISTER(\(purpose), \(ByteCount(region.size)))")
    return fd
}

/// A close-on-exec pipe whose write end stops a thread that polls the read end.
func stopPipe() throws(KVMError) -> (read: FileDescriptor, write: FileDescriptor) {
    var fds: [Int32] = [0, 0]
    if pipe(&fds) != 0 { throw KVMError.call("pipe", lastErrno()) }
    _ = fcntl(fds[0], F_SETFD, FD_CLOEXEC)
    _ = fcntl(fds[1], F_SETFD, FD_CLOEXEC)
    return (FileDescriptor(fds[0]), FileDescriptor(fds[1]))
}
