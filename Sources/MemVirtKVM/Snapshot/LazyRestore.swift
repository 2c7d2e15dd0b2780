import CKVM
import MemVirtCore
import MemVirtGuest
#if canImport(Glibc)
import Glibc
#endif

/// A working-set file opened for writing: created before a restore, so a bad path fails
/// before the guest runs rather than after.
public final class WorkingSetFile: @unchecked Sendable {
    let fd: FileDescriptor
    public let path: String

    public init(creating path: String) throws(KVMError) {
        self.path = path
        var st = stat()
        if stat(path, &st) == 0 { try requireRegularFile(st, path: path, what: "working-set") }
        fd = try FileDescriptor.open(path, O_WRONLY | O_CREAT | O_TRUNC, mode: 0o644)
    }

    /// `memvirt-working-set 1 pages=N`, then one page index a line.
    public func write(_ pages: [Int]) throws(KVMError) {
        var s = "memvirt-working-set 1 pages=\(pages.count)\n"
        for p in pages { s += "\(p)\n" }
        let bytes = Array(s.utf8)
        var off = 0
        while off < bytes.count {
            let w = bytes.withUnsafeBytes { Glibc.write(fd.raw, $0.baseAddress! + off, $0.count - off) }
            if w < 0 { if errno == EINTR { continue }; throw KVMError.call("write(\(path))", lastErrno()) }
            off += w
        }
    }
}

/// Lazy restore: guest data pages come from the snapshot file on first touch (userfaultfd,
/// missing mode; each page checked against its hash), and optionally ahead of it from a
/// prefetch list.
final class LazyPages: @unchecked Sendable {
    let region: GuestMemoryRegion
    let file: Snapshot.File
    let uffd: FileDescriptor
    let stopRead: FileDescriptor
    let stopWrite: FileDescriptor
    var thread: DedicatedThread?
    var prefetcher: DedicatedThread?
    var lock = pthread_mutex_t()
    var _faults: UInt64 = 0
    var _prefetched: UInt64 = 0
    var _error: KVMError?
    var _order: [Int] = []
    let stopFlag: UnsafeMutablePointer<UInt32>

    init(region: GuestMemoryRegion, file: Snapshot.File) throws(KVMError) {
        self.region = region
        self.file = file
        uffd = try userfaultfdForMissing(region, purpose: "lazy restore")
        (stopRead, stopWrite) = try stopPipe()
        pthread_mutex_init(&lock, nil)
        stopFlag = .allocate(capacity: 1)
        stopFlag.initialize(to: 0)
    }
    deinit { stop(); pthread_mutex_destroy(&lock); stopFlag.deallocate() }

    var faults: UInt64 { pthread_mutex_lock(&lock); defer { pthread_mutex_unlock(&lock) }; return _faults }
    var prefetched: UInt64 { pthread_mutex_lock(&lock); defer { pthread_mutex_unlock(&lock) }; return _prefetched }
    var error: KVMError? { pthread_mutex_lock(&lock); defer { pthread_mutex_unlock(&lock) }; return _error }
    var touchOrder: [Int] { pthread_mutex_lock(&lock); defer { pthread_mutex_unlock(&lock) }; return _order }

    /// Copies page `p` in (a page the snapshot says is zero: maps the zero page, allocating
    /// nothing until the guest writes it); false when it was there already.
    func copy(_ p: Int, check: Bool = true) throws(KVMError) -> Bool {
        if file.isZero(p) {
            var z = uffdio_zeropage(range: uffdio_range(start: region.hostAddress.rawValue + UInt64(p) * 4096, len: 4096), mode: 0, zeropage: 0)
            var rc = ckvm_uffdio_zeropage(uffd.raw, &z)
            while rc == -EAGAIN { z.zeropage = 0; rc = ckvm_uffdio_zeropage(uffd.raw, &z) }
            if rc == -EEXIST { return false }
            _ = try checked(rc, "UFFDIO_ZEROPAGE(restore page \(p))")
            return true
        }
        let src = check ? try file.checkedPage(p) : file.page(p)
        var c = uffdio_copy(dst: region.hostAddress.rawValue + UInt64(p) * 4096, src: UInt64(UInt(bitPattern: src)), len: 4096, mode: 0, copy: 0)
        var rc = ckvm_uffdio_copy(uffd.raw, &c)
        while rc == -EAGAIN { c.copy = 0; rc = ckvm_uffdio_copy(uffd.raw, &c) }
        if rc == -EEXIST { return false }
        _ = try checked(rc, "UFFDIO_COPY(restore page \(p))")
        return true
    }

    /// Starts the fault handler. A handler that cannot start fails the restore: without it the
    /// first touch of a page would hang its vCPU forever.
    func start(onError: @escaping @Sendable () -> Void) throws(KVMError) {
        thread = try DedicatedThread.start(name: "memvirt-lazy-restore") { [self] in loop(onError) }
    }

    func prefetch(_ pages: [Int]) throws(KVMError) {
        prefetcher = try DedicatedThread.start(name: "memvirt-prefetch") { [self] in
            for p in pages {
                if ckvm_load_acquire_u32(stopFlag) != 0 { break }
                do throws(KVMError) {
                    if try copy(p) { pthread_mutex_lock(&lock); _prefetched += 1; pthread_mutex_unlock(&lock) }
                } catch {
                    pthread_mutex_lock(&lock); _error = _error ?? error; pthread_mutex_unlock(&lock)
                    break
                }
            }
        }
    }

    func stop() {
        ckvm_store_release_u32(stopFlag, 1)
        prefetcher?.join()
        prefetcher = nil
        guard let t = thread else { return }
        var one: UInt8 = 1
        _ = write(stopWrite.raw, &one, 1)
        t.join()
        thread = nil
    }

    private func loop(_ onError: @Sendable () -> Void) {
        var fds = [pollfd(fd: uffd.raw, events: Int16(POLLIN), revents: 0), pollfd(fd: stopRead.raw, events: Int16(POLLIN), revents: 0)]
        var msgs = [UInt8](repeating: 0, count: 32 * 64)
        let base = region.hostAddress.rawValue
        while true {
            let n = poll(&fds, 2, -1)
            if n < 0 { if errno == EINTR { continue }; return }
            if fds[1].revents != 0 { return }
            let got = msgs.withUnsafeMutableBytes { read(uffd.raw, $0.baseAddress, $0.count) }
            if got <= 0 { continue }
            for i in 0..<(got / 32) {
                let (event, address) = msgs.withUnsafeBytes { b in (b[i * 32], b.loadUnaligned(fromByteOffset: i * 32 + 16, as: UInt64.self)) }
                guard event == UInt8(UFFD_EVENT_PAGEFAULT), address >= base, address - base < region.size else { continue }
                let p = Int((address - base) / 4096)
                do throws(KVMError) {
                    if try copy(p) {
                        pthread_mutex_lock(&lock); _faults += 1; _order.append(p); pthread_mutex_unlock(&lock)
                    } else {
                        var range = uffdio_range(start: base + UInt64(p) * 4096, len: 4096)
                        _ = ckvm_uffdio_wake(uffd.raw, &range)
                    }
                } catch {
                    // A damaged page: record the error, stop the vCPUs, and still map the page
                    // (unchecked) so the faulting vCPU leaves KVM and sees the stop.
                    pthread_mutex_lock(&lock); _error = _error ?? error; pthread_mutex_unlock(&lock)
                    onError()
                    _ = try? copy(p, check: false)
                }
            }
        }
    }
}

/// `Rss` of the mapping that starts at `base`, from /proc/self/smaps (nil if not found). Pages
/// mapped to the shared zero page are not counted.
func residentBytes(of base: UnsafeMutableRawPointer) -> UInt64? {
    guard let f = fopen("/proc/self/smaps", "r") else { return nil }
    defer { fclose(f) }
    let start = String(UInt(bitPattern: base), radix: 16)
    var line = [CChar](repeating: 0, count: 512)
    var inside = false
    while fgets(&line, Int32(line.count), f) != nil {
        let s = String(decoding: line.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        if let dash = s.firstIndex(of: "-"), s[..<dash].allSatisfy(\.isHexDigit), !s[..<dash].isEmpty {
            // A mapping's first line: "start-end perms ...".
            var lo = s[..<dash]
            while lo.count > 1 && lo.hasPrefix("0") { lo = lo.dropFirst() }
            inside = lo == start
            continue
        }
        if inside && s.hasPrefix("Rss:") {
            let fields = s.split(separator: " ", omittingEmptySubsequences: true)
            return fields.count >= 2 ? UInt64(fields[1]).map { $0 * 1024 } : nil
        }
    }
    return nil
}
