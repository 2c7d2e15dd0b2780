import CKVM
import MemVirtCore
import MemVirtGuest
#if canImport(Glibc)
import Glibc
#endif

/// The destination's userfaultfd in post-copy: pages arrive with UFFDIO_COPY (which wakes a
/// guest waiting on them); a guest fault on a page not here yet becomes a REQUEST to the source
/// (once per page). Race: a page can arrive between the fault and our look at `present`; then
/// UFFDIO_WAKE is enough (the copy already woke the waiter, or it re-faults and finds the page).
final class PostcopyFaults: @unchecked Sendable {
    let region: GuestMemoryRegion
    let channel: MigrationChannel
    let uffd: FileDescriptor
    let stopRead: FileDescriptor
    let stopWrite: FileDescriptor
    let present: UnsafeMutablePointer<UInt32>
    let pages: Int
    /// The stream's index of this region's first page (data: 0; the runtime: the data pages):
    /// REQUEST names pages by it.
    let indexBase: Int
    var requested: [Bool]
    var requests: UInt64 = 0
    var thread: DedicatedThread?

    init(region: GuestMemoryRegion, channel: MigrationChannel, indexBase: Int = 0) throws(KVMError) {
        self.region = region
        self.indexBase = indexBase
        self.channel = channel
        pages = Int(region.size / 4096)
        uffd = try userfaultfdForMissing(region, purpose: "post-copy")
        (stopRead, stopWrite) = try stopPipe()
        present = .allocate(capacity: pages)
        present.initialize(repeating: 0, count: pages)
        requested = [Bool](repeating: false, count: pages)
    }
    deinit { stop(); present.deallocate() }

    /// Maps a received page (before or after the guest resumed); nil: a zero page, mapped
    /// with UFFDIO_ZEROPAGE (no page allocated until the guest writes it).
    func place(page p: Int, from src: UnsafeRawPointer?) throws(KVMError) {
        let dst = region.hostAddress.rawValue + UInt64(p) * 4096
        var rc: Int32
        if let src {
            var c = uffdio_copy(dst: dst, src: UInt64(UInt(bitPattern: src)), len: 4096, mode: 0, copy: 0)
            rc = ckvm_uffdio_copy(uffd.raw, &c)
            while rc == -EAGAIN { c.copy = 0; rc = ckvm_uffdio_copy(uffd.raw, &c) }
        } else {
            var z = uffdio_zeropage(range: uffdio_range(start: dst, len: 4096), mode: 0, zeropage: 0)
            rc = ckvm_uffdio_zeropage(uffd.raw, &z)
            while rc == -EAGAIN { z.zeropage = 0; rc = ckvm_uffdio_zeropage(uffd.raw, &z) }
        }
        if rc == -EEXIST {
            // Already mapped: a newer copy of a page sent in an earlier pre-copy round.
            if let src { memcpy(region.mapping.base + p * 4096, src, 4096) } else { memset(region.mapping.base + p * 4096, 0, 4096) }
        } else if rc < 0 {
            _ = try checked(rc, "UFFDIO_COPY/ZEROPAGE(post-copy page \(p))")
        }
        ckvm_store_release_u32(present + p, 1)
    }

    /// True when page `p` is mapped here (placed, and not discarded since).
    func isPresent(_ p: Int) -> Bool { ckvm_load_acquire_u32(present + p) != 0 }

    /// Drops a stale page (hybrid; a runtime page in prepared post-copy): the guest's next
    /// touch faults and asks the source.
    func discard(page p: Int) throws(KVMError) {
        if madvise(region.mapping.base + p * 4096, 4096, MADV_DONTNEED) != 0 { throw KVMError.call("madvise(MADV_DONTNEED, page \(p))", lastErrno()) }
        ckvm_store_release_u32(present + p, 0)
    }

    /// Starts the fault thread; a thread that cannot start fails the migration (a guest
    /// faulting with nobody to ask for its page would wait forever).
    func start() throws(KVMError) {
        guard thread == nil else { return }
        thread = try DedicatedThread.start(name: "memvirt-postcopy-faults") { [self] in loop() }
    }

    func stop() {
        guard let t = thread else { return }
        var one: UInt8 = 1
        _ = write(stopWrite.raw, &one, 1)
        t.join()
        thread = nil
    }

    private func loop() {
        var fds = [pollfd(fd: uffd.raw, events: Int16(POLLIN), revents: 0), pollfd(fd: stopRead.raw, events: Int16(POLLIN), revents: 0)]
        var msgs = [UInt8](repeating: 0, count: 32 * 64)
        let base = region.hostAddress.rawValue
        while true {
            let n = poll(&fds, 2, -1)
            if n < 0 { if errno == EINTR { continue }; return }
            if fds[1].revents != 0 { return }
            let got = msgs.withUnsafeMutableBytes { read(uffd.raw, $0.baseAddress, $0.count) }
            if got <= 0 { continue }
            var ask = ByteWriter()
            var asked = 0
            for i in 0..<(got / 32) {
                let (event, address) = msgs.withUnsafeBytes { b in (b[i * 32], b.loadUnaligned(fromByteOffset: i * 32 + 16, as: UInt64.self)) }
                guard event == UInt8(UFFD_EVENT_PAGEFAULT), address >= base, address - base < region.size else { continue }
                let p = Int((address - base) / 4096)
                if ckvm_load_acquire_u32(present + p) != 0 {
                    var range = uffdio_range(start: base + UInt64(p) * 4096, len: 4096)
                    _ = ckvm_uffdio_wake(uffd.raw, &range)
                } else if !requested[p] {
                    requested[p] = true
                    ask.put(UInt64(indexBase + p))
                    asked += 1
                }
            }
            if asked > 0 {
                requests += UInt64(asked)
                do { try channel.send(.request, ask.bytes) } catch { return }
            }
        }
    }
}
