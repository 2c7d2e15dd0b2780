import CKVM
import MemVirtCore
import MemVirtGuest
#if canImport(Glibc)
import Glibc
#endif

/// A VM snapshot file, version 1: guest memory and the full vCPU state.
///
///     offset 0     fixed header (64 bytes):
///                  u32 magic "MVSN" | u16 version | u16 0 | u64 meta length | u64 meta checksum
///                  | u64 memory offset | u64 memory bytes | u64 file size | u64 header checksum (of bytes 0..<48)
///     offset 64    meta: the VM configuration (as the migration HELLO), realtime at save, vCPU
///                  count, per vCPU a done flag and its encoded state, then one u64 page hash
///                  (`ckvm_page_hash(page, index)`) per page
///     memory off.  (4 KiB aligned) the data pages, then the runtime pages, raw; all-zero pages
///                  are holes (the file is sparse)
///
/// A short file (truncated), a bad magic, another version, a header or meta checksum mismatch,
/// or a page whose content does not match its hash (checked when the page is loaded, eagerly
/// or on first touch) is refused with a message that says which.
public enum SnapshotFormat {
    public static let magic: UInt32 = 0x4e53_564d  // "MVSN" little-endian
    public static let version: UInt16 = 1
    public static let headerSize = 64
}

/// What `Snapshot.save` did.
public struct SnapshotSaveReport: Sendable {
    public var path: String
    public var fileBytes: UInt64 = 0
    public var memoryBytes: UInt64 = 0
    public var zeroPages: UInt64 = 0
    public var pages: UInt64 = 0
    /// The guest's memory hash at the snapshot (the sum of the page hashes).
    public var memoryHash: UInt64 = 0
    /// Stop the guest -> file complete.
    public var saveNanos: UInt64 = 0
    public var guestRunNanos: UInt64 = 0
    public var vcpusDone: [Bool] = []

    public var json: JSONValue {
        .object([
            ("schema", "memvirt.snapshot/1"), ("path", .string(path)), ("file_bytes", .uint(fileBytes)),
            ("memory_bytes", .uint(memoryBytes)), ("pages", .uint(pages)), ("zero_pages", .uint(zeroPages)),
            ("memory_hash", .string("0x" + String(memoryHash, radix: 16))),
            ("save_ms", .double(Double(saveNanos / 1000) / 1000)), ("guest_run_ms", .double(Double(guestRunNanos / 1000) / 1000)),
            ("vcpus_done", .array(vcpusDone.map { .bool($0) })),
        ])
    }
}

/// How a snapshot is restored.
public struct RestoreOptions: Sendable {
    /// Map guest data memory on first touch through userfaultfd (else read it all first).
    public var lazy = false
    /// Pages to copy in ahead of the guest's touches (lazy only), e.g. a recorded working set,
    /// in a helper thread while the guest runs.
    public var prefetch: [Int] = []
    /// Run the restored guest this long, then stop it (nil: to the end of its workload).
    public var runNanos: UInt64? = nil
    public init() {}
}

public struct RestoreReport: Sendable {
    public var lazy: Bool
    public var error: String? = nil
    /// Restore start (open) -> the first KVM_RUN of the restored vCPUs: the guest's first
    /// instruction follows at once.
    public var timeToFirstInstructionNanos: UInt64 = 0
    /// Data pages read before the guest ran (eager) / copied in on first touch (lazy) /
    /// copied in by the prefetcher.
    public var pagesLoadedEagerly: UInt64 = 0
    public var faults: UInt64 = 0
    public var prefetched: UInt64 = 0
    /// Data pages in the order the guest first touched them (lazy): a working set to record.
    public var touchOrder: [Int] = []
    public var runNanos: UInt64 = 0
    public var finished = false
    public var guest: [GuestReport] = []
    public var snapshotHash: UInt64 = 0

    public var json: JSONValue {
        .object([
            ("schema", "memvirt.restore/1"), ("mode", .string(lazy ? "lazy" : "eager")), ("error", error.map { .string($0) } ?? .null),
            ("time_to_first_instruction_ms", .double(Double(timeToFirstInstructionNanos / 1000) / 1000)),
            ("pages_loaded_eagerly", .uint(pagesLoadedEagerly)), ("faults", .uint(faults)), ("prefetched", .uint(prefetched)),
            ("run_ms", .double(Double(runNanos / 1000) / 1000)), ("finished", .bool(finished)),
            ("snapshot_hash", .string("0x" + String(snapshotHash, radix: 16))),
            ("guest", .array(guest.map { r in
                var o: [(String, JSONValue)] = [("accesses", .uint(r.accesses)), ("reads", .uint(r.reads)), ("writes", .uint(r.writes)), ("read_sum", .uint(r.readSum))]
                if let c = r.memoryChecksum { o.append(("memory_checksum", .uint(c))) }
                return .object(o)
            })),
        ])
    }
}

public enum Snapshot {
    // MARK: save

    /// Runs `spec` in a VM for `afterNanos` (or to its end), stops it, and writes the snapshot
    /// to `path`.
    public static func save(_ spec: WorkloadSpec, afterNanos: UInt64, to path: String, accessesPerSecond: UInt64? = nil) throws(KVMError) -> SnapshotSaveReport {
        do { try spec.validate() } catch { throw KVMError.invalid(error.message) }
        let kvm = try KVM()
        var c = GuestConfig(dataSize: spec.footprint.rawValue)
        c.dataVirtual = spec.base
        c.vcpus = spec.threads
        c.tableBytesPerVCPU = KVMRunner.tableBytes(spec)
        let g = try GuestVM(kvm: kvm, config: c)
        let khz = LiveMigration.tscKHz(g)
        for t in 0..<spec.threads {
            var (m, table) = try KVMRunner.prepare(spec, thread: t, layout: g.layout)
            if !table.isEmpty { try g.runtime.write(array: table, at: GuestPhysicalAddress(rawValue: m.table)) }
            if let r = accessesPerSecond { m.pace = max(1, khz * 1000 / max(1, r)) }
            try g.setMailbox(t, m)
        }
        let kicker = VCPUKicker(vm: g)
        var runner = VCPUThreads(g: g, kicker: kicker)
        try runner.start()
        let t0 = monotonicNanoseconds()
        while monotonicNanoseconds() - t0 < afterNanos && !runner.allDoneFast { usleepNanos(1_000_000) }
        try runner.stop()
        var report = SnapshotSaveReport(path: path)
        report.guestRunNanos = monotonicNanoseconds() - t0
        let s0 = monotonicNanoseconds()
        try write(g, done: runner.done, to: path, report: &report)
        report.saveNanos = monotonicNanoseconds() - s0
        report.vcpusDone = runner.done
        return report
    }

    /// Writes a stopped VM's snapshot.
    static func write(_ g: GuestVM, done: [Bool], to path: String, report: inout SnapshotSaveReport) throws(KVMError) {
        let dataPages = Int(g.data.size / 4096), runtimePages = Int(g.runtime.size / 4096)
        let hello = MigrationHello(dataSize: g.layout.dataSize, vcpus: UInt32(g.vcpus.count), tableBytesPerVCPU: g.layout.tableStride,
                                   runtimeSize: g.layout.runtimeSize, mode: 0, pageSize: g.layout.dataPageSize.bytes)
        var meta = ByteWriter()
        meta.put(bytes: hello.encoded())
        meta.put(LiveMigration.realtimeNanos())
        meta.put(UInt64(g.vcpus.count))
        for (i, v) in g.vcpus.enumerated() {
            meta.put(UInt8(done[i] ? 1 : 0))
            meta.put(bytes: try v.saveState().encoded())
        }
        meta.put(UInt64(dataPages + runtimePages))
        var hashes = [UInt64](repeating: 0, count: dataPages + runtimePages)
        var zeroPage = [Bool](repeating: false, count: dataPages + runtimePages)
        func page(_ i: Int) -> UnsafeRawPointer {
            i < dataPages ? UnsafeRawPointer(g.data.mapping.base + i * 4096) : UnsafeRawPointer(g.runtime.mapping.base + (i - dataPages) * 4096)
        }
        var zeros: UInt64 = 0
        // Pages never touched (not resident) are zero: no read, which would fault them in.
        let resident = try g.data.residency() + g.runtime.residency()
        for i in 0..<hashes.count {
            if resident[i] & 1 == 0 || ckvm_page_is_zero(page(i)) != 0 {
                zeroPage[i] = true
                zeros += 1
                hashes[i] = ckvm_page_hash_zero(UInt64(i))
            } else {
                hashes[i] = ckvm_page_hash(page(i), UInt64(i))
            }
        }
        hashes.withUnsafeBytes { meta.bytes.append(contentsOf: $0) }
        let memoryOffset = (UInt64(SnapshotFormat.headerSize + meta.bytes.count) + 4095) / 4096 * 4096
        let memoryBytes = UInt64(hashes.count) * 4096
        let fileSize = memoryOffset + memoryBytes
        var header = ByteWriter()
        header.put(SnapshotFormat.magic); header.put(SnapshotFormat.version); header.put(UInt16(0))
        header.put(UInt64(meta.bytes.count))
        header.put(meta.bytes.withUnsafeBytes { ckvm_checksum($0.baseAddress, $0.count) })
        header.put(memoryOffset); header.put(memoryBytes); header.put(fileSize)
        header.put(header.bytes.withUnsafeBytes { ckvm_checksum($0.baseAddress, $0.count) })
        header.put(UInt64(0))
        precondition(header.bytes.count == SnapshotFormat.headerSize)

        // Write to a temporary name, rename when complete: a crash never leaves a valid-looking file.
        let tmp = path + ".partial"
        let fd = try FileDescriptor.open(tmp, O_WRONLY | O_CREAT | O_TRUNC, mode: 0o644)
        func pwriteAll(_ p: UnsafeRawPointer, _ n: Int, _ off: UInt64) throws(KVMError) {
            var done = 0
            while done < n {
                let w = pwrite(fd.raw, p + done, min(n - done, 64 << 20), off_t(off + UInt64(done)))
                if w < 0 { if errno == EINTR { continue }; throw KVMError.call("write snapshot \(tmp)", lastErrno()) }
                done += w
            }
        }
        if ftruncate(fd.raw, off_t(fileSize)) != 0 { throw KVMError.call("ftruncate(\(tmp))", lastErrno()) }
        func pwriteBytes(_ a: [UInt8], _ off: UInt64) throws(KVMError) {
            let r: Result<Void, KVMError> = a.withUnsafeBytes { b in Result { () throws(KVMError) in try pwriteAll(b.baseAddress!, b.count, off) } }
            try r.get()
        }
        try pwriteBytes(header.bytes, 0)
        try pwriteBytes(meta.bytes, UInt64(SnapshotFormat.headerSize))
        // Runs of non-zero pages in one write each; zero pages stay holes.
        var i = 0
        while i < hashes.count {
            if zeroPage[i] { i += 1; continue }
            var j = i + 1
            let regionEnd = i < dataPages ? dataPages : hashes.count
            while j < regionEnd && !zeroPage[j] { j += 1 }
            try pwriteAll(page(i), (j - i) * 4096, memoryOffset + UInt64(i) * 4096)
            i = j
        }
        if fsync(fd.raw) != 0 { throw KVMError.call("fsync(\(tmp))", lastErrno()) }
        if rename(tmp, path) != 0 { throw KVMError.call("rename(\(tmp) -> \(path))", lastErrno()) }
        report.fileBytes = fileSize
        report.memoryBytes = memoryBytes
        report.pages = UInt64(hashes.count)
        report.zeroPages = zeros
        report.memoryHash = hashes.reduce(0, &+)
    }

    // MARK: open

    /// A snapshot file opened and checked (header, meta, size); pages are checked on load.
    final class File: @unchecked Sendable {
        let path: String
        let fd: FileDescriptor
        let hello: MigrationHello
        let done: [Bool]
        let states: [VCPUState]
        let hashes: [UInt64]
        let memoryOffset: UInt64
        /// The memory part of the file, mapped read-only.
        let memory: Mapping

        init(path: String) throws(KVMError) {
            self.path = path
            let fd = try FileDescriptor.open(path, O_RDONLY)
            self.fd = fd
            var st = stat()
            if fstat(fd.raw, &st) != 0 { throw KVMError.call("fstat(\(path))", lastErrno()) }
            let size = UInt64(st.st_size)
            var h = [UInt8](repeating: 0, count: SnapshotFormat.headerSize)
            let got = h.withUnsafeMutableBytes { pread(fd.raw, $0.baseAddress, $0.count, 0) }
            guard got == SnapshotFormat.headerSize else {
                throw KVMError.invalid("snapshot \(path) truncated: \(size) bytes, shorter than its \(SnapshotFormat.headerSize)-byte header")
            }
            let hr: Result<(UInt64, UInt64, UInt64, UInt64, UInt64), KVMError> = h.withUnsafeBytes { b in
                Result { () throws(KVMError) in
                    var r = ByteReader(b, what: "snapshot header")
                    let magic: UInt32 = try r.get()
                    guard magic == SnapshotFormat.magic else {
                        throw KVMError.invalid("\(path) is not a memvirt snapshot (magic 0x\(String(magic, radix: 16)), expected \"MVSN\")")
                    }
                    let version: UInt16 = try r.get()
                    guard version == SnapshotFormat.version else {
                        throw KVMError.invalid("snapshot \(path) has version \(version), this memvirt reads version \(SnapshotFormat.version): refused")
                    }
                    _ = try r.get(UInt16.self)
                    let metaLen: UInt64 = try r.get(), metaSum: UInt64 = try r.get()
                    let memOff: UInt64 = try r.get(), memBytes: UInt64 = try r.get(), fileSize: UInt64 = try r.get()
                    let hsum: UInt64 = try r.get()
                    let want = ckvm_checksum(b.baseAddress, 48)
                    guard hsum == want else { throw KVMError.invalid("snapshot \(path) corrupt: header checksum mismatch") }
                    guard metaLen <= 256 << 20, memOff % 4096 == 0, memOff >= UInt64(SnapshotFormat.headerSize) + metaLen,
                          fileSize == memOff + memBytes, memBytes % 4096 == 0 else {
                        throw KVMError.invalid("snapshot \(path) corrupt: inconsistent header (meta \(metaLen), memory at \(memOff) + \(memBytes), size \(fileSize))")
                    }
                    return (metaLen, metaSum, memOff, memBytes, fileSize)
                }
            }
            let (metaLen, metaSum, memOff, memBytes, fileSize) = try hr.get()
            guard size >= fileSize else {
                throw KVMError.invalid("snapshot \(path) truncated: \(size) bytes, its header says \(fileSize) (\(fileSize - size) bytes missing)")
            }
            var meta = [UInt8](repeating: 0, count: Int(metaLen))
            let mgot = meta.withUnsafeMutableBytes { pread(fd.raw, $0.baseAddress, $0.count, off_t(SnapshotFormat.headerSize)) }
            guard mgot == Int(metaLen) else { throw KVMError.invalid("snapshot \(path): short read of its meta (\(mgot) of \(metaLen) bytes)") }
            let msum = meta.withUnsafeBytes { ckvm_checksum($0.baseAddress, $0.count) }
            guard msum == metaSum else { throw KVMError.invalid("snapshot \(path) corrupt: meta checksum mismatch (vCPU state or page hashes damaged)") }
            let parsed: Result<(MigrationHello, [Bool], [VCPUState], [UInt64]), KVMError> = meta.withUnsafeBytes { b in
                Result { () throws(KVMError) in
                    var r = ByteReader(b, what: "snapshot meta")
                    let hb = try r.getBytes()
                    let hr: Result<MigrationHello, KVMError> = hb.withUnsafeBytes { x in Result { () throws(KVMError) in try MigrationHello.decode(x) } }
                    let hello = try hr.get()
                    _ = try r.get(UInt64.self)  // realtime at save
                    let n = Int(try r.get(UInt64.self))
                    guard n >= 1, n <= GuestLayout.maxVCPUs, UInt32(n) == hello.vcpus else { throw KVMError.invalid("snapshot \(path) corrupt: \(n) vCPU states") }
                    var done: [Bool] = [], states: [VCPUState] = []
                    for _ in 0..<n {
                        done.append(try r.get(UInt8.self) != 0)
                        let sb = try r.getBytes()
                        let sr: Result<VCPUState, KVMError> = sb.withUnsafeBytes { x in
                            Result { () throws(KVMError) in var rr = ByteReader(x, what: "snapshot vCPU state"); return try VCPUState.decode(&rr) }
                        }
                        states.append(try sr.get())
                    }
                    let pages = Int(try r.get(UInt64.self))
                    guard UInt64(pages) * 4096 == memBytes, r.remaining == pages * 8 else {
                        throw KVMError.invalid("snapshot \(path) corrupt: \(pages) page hashes for \(memBytes) bytes of memory")
                    }
                    var hashes = [UInt64](repeating: 0, count: pages)
                    hashes.withUnsafeMutableBytes { $0.copyMemory(from: UnsafeRawBufferPointer(rebasing: b[r.offset...])) }
                    return (hello, done, states, hashes)
                }
            }
            (hello, done, states, hashes) = try parsed.get()
            guard hello.dataSize + hello.runtimeSize == memBytes else {
                throw KVMError.invalid("snapshot \(path) corrupt: \(hello.dataSize) + \(hello.runtimeSize) bytes of guest memory, \(memBytes) in the file")
            }
            memoryOffset = memOff
            memory = try Mapping(size: Int(memBytes), prot: PROT_READ, flags: MAP_PRIVATE, fd: fd.raw, offset: off_t(memOff), what: "snapshot \(path)")
        }

        func page(_ i: Int) -> UnsafeRawPointer { UnsafeRawPointer(memory.base + i * 4096) }

        /// The page's content checked against its hash.
        func checkedPage(_ i: Int) throws(KVMError) -> UnsafeRawPointer {
            let p = page(i)
            guard ckvm_page_hash(p, UInt64(i)) == hashes[i] else {
                throw KVMError.invalid("snapshot \(path) corrupt: page \(i) does not match its hash")
            }
            return p
        }
    }

    // MARK: restore

    /// Restores the snapshot at `path` into a new VM and runs it (to the end, or `runNanos`).
    public static func restore(from path: String, options o: RestoreOptions) throws(KVMError) -> RestoreReport {
        let t0 = monotonicNanoseconds()
        let f = try File(path: path)
        guard let ps = PageSize.allCases.first(where: { $0.bytes == f.hello.pageSize }) else {
            throw KVMError.invalid("snapshot \(path) corrupt: guest page size \(f.hello.pageSize)")
        }
        var c = GuestConfig(dataSize: f.hello.dataSize)
        c.vcpus = Int(f.hello.vcpus)
        c.tableBytesPerVCPU = f.hello.tableBytesPerVCPU
        c.dataPageSize = ps
        c.restoring = true
        let kvm = try KVM()
        let g = try GuestVM(kvm: kvm, config: c)
        guard g.layout.runtimeSize == f.hello.runtimeSize else {
            throw KVMError.invalid("snapshot \(path) mismatched: its runtime area is \(f.hello.runtimeSize) bytes, this memvirt builds \(g.layout.runtimeSize)")
        }
        let dataPages = Int(g.data.size / 4096)
        var report = RestoreReport(lazy: o.lazy)
        report.snapshotHash = f.hashes.reduce(0, &+)
        // The runtime (descriptor tables, page tables, mailboxes, stacks): always eagerly.
        for i in 0..<Int(g.runtime.size / 4096) {
            memcpy(g.runtime.mapping.base + i * 4096, try f.checkedPage(dataPages + i), 4096)
        }
        var lazy: LazyPages? = nil
        if o.lazy {
            lazy = try LazyPages(region: g.data, file: f)
        } else {
            // Eager: read the data pages in (large reads), then check every page.
            var off = 0
            let total = Int(g.data.size)
            while off < total {
                let n = pread(f.fd.raw, g.data.mapping.base + off, min(total - off, 32 << 20), off_t(f.memoryOffset + UInt64(off)))
                if n < 0 { if errno == EINTR { continue }; throw KVMError.call("read snapshot \(path)", lastErrno()) }
                if n == 0 { throw KVMError.invalid("snapshot \(path) truncated while reading guest memory at \(off)") }
                off += n
            }
            for i in 0..<dataPages where ckvm_page_hash(g.data.mapping.base + i * 4096, UInt64(i)) != f.hashes[i] {
                throw KVMError.invalid("snapshot \(path) corrupt: page \(i) does not match its hash")
            }
            report.pagesLoadedEagerly = UInt64(dataPages)
        }
        for (i, s) in f.states.enumerated() { try g.vcpus[i].restoreState(s) }
        let kicker = VCPUKicker(vm: g)
        var runner = VCPUThreads(g: g, kicker: kicker)
        runner.done = f.done
        lazy?.start(onError: { kicker.stop() })
        report.timeToFirstInstructionNanos = monotonicNanoseconds() - t0
        try runner.start()
        if let l = lazy, !o.prefetch.isEmpty { l.prefetch(o.prefetch.filter { $0 >= 0 && $0 < dataPages }) }
        let r0 = monotonicNanoseconds()
        if let limit = o.runNanos {
            while monotonicNanoseconds() - r0 < limit && !runner.allDoneFast { usleepNanos(1_000_000) }
            if !runner.allDoneFast { try runner.stop() } else { try runner.join() }
        } else {
            try runner.join()
        }
        report.runNanos = monotonicNanoseconds() - r0
        report.finished = runner.done.allSatisfy { $0 }
        // The workload's faults and working set (the checksum below touches everything).
        if let l = lazy { report.faults = l.faults; report.prefetched = l.prefetched; report.touchOrder = l.touchOrder }
        if lazy?.error == nil && report.finished {
            // The guest's checksum reads all its memory: with lazy pages, while the handler still runs.
            report.guest = try LiveMigration.finalGuest(g, threads: g.vcpus.count)
        }
        if let l = lazy {
            l.stop()
            if let e = l.error { throw e }
        }
        return report
    }

    /// Reads a working-set file (`memvirt-working-set 1` then one page index a line).
    public static func readWorkingSet(_ path: String) throws(KVMError) -> [Int] {
        let fd = try FileDescriptor.open(path, O_RDONLY)
        var bytes: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            let n = buf.withUnsafeMutableBytes { read(fd.raw, $0.baseAddress, $0.count) }
            if n < 0 { throw KVMError.call("read(\(path))", lastErrno()) }
            if n == 0 { break }
            bytes += buf[0..<n]
        }
        let lines = String(decoding: bytes, as: UTF8.self).split(separator: "\n")
        guard let first = lines.first, first.hasPrefix("memvirt-working-set 1") else {
            throw KVMError.invalid("\(path) is not a working-set file (first line must be 'memvirt-working-set 1')")
        }
        var pages: [Int] = []
        for (k, l) in lines.dropFirst().enumerated() {
            guard let p = Int(l), p >= 0 else { throw KVMError.invalid("\(path):\(k + 2): '\(l)' is not a page index") }
            pages.append(p)
        }
        return pages
    }

    public static func writeWorkingSet(_ pages: [Int], to path: String) throws(KVMError) {
        var s = "memvirt-working-set 1 pages=\(pages.count)\n"
        for p in pages { s += "\(p)\n" }
        let fd = try FileDescriptor.open(path, O_WRONLY | O_CREAT | O_TRUNC, mode: 0o644)
        let bytes = Array(s.utf8)
        var off = 0
        while off < bytes.count {
            let w = bytes.withUnsafeBytes { Glibc.write(fd.raw, $0.baseAddress! + off, $0.count - off) }
            if w < 0 { throw KVMError.call("write(\(path))", lastErrno()) }
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

    /// Copies page `p` in; false when it was there already.
    func copy(_ p: Int, check: Bool = true) throws(KVMError) -> Bool {
        let src = check ? try file.checkedPage(p) : file.page(p)
        var c = uffdio_copy(dst: region.hostAddress.rawValue + UInt64(p) * 4096, src: UInt64(UInt(bitPattern: src)), len: 4096, mode: 0, copy: 0)
        var rc = ckvm_uffdio_copy(uffd.raw, &c)
        while rc == -EAGAIN { c.copy = 0; rc = ckvm_uffdio_copy(uffd.raw, &c) }
        if rc == -EEXIST { return false }
        _ = try checked(rc, "UFFDIO_COPY(restore page \(p))")
        return true
    }

    func start(onError: @escaping @Sendable () -> Void) {
        thread = try? DedicatedThread.start(name: "memvirt-lazy-restore") { [self] in loop(onError) }
    }

    func prefetch(_ pages: [Int]) {
        prefetcher = try? DedicatedThread.start(name: "memvirt-prefetch") { [self] in
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
