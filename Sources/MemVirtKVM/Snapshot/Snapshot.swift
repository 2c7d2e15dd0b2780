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
    /// The largest meta a reader accepts: 8 vCPU states (tens of KiB each) and 8 bytes per
    /// page hash of up to `maxPages` pages fit well below it.
    public static let maxMetaBytes: UInt64 = 256 << 20
    /// The most pages a snapshot may hold: 16 TiB of guest memory (KVM's x86 guest-physical
    /// space is 52 bits, but no guest of ours comes near this; it keeps every count in an Int).
    public static let maxPages: UInt64 = 1 << 32
}

/// Runs a decoder over snapshot bytes. The decoders shared with the migration stream name the
/// stream in their errors: here they name the snapshot file instead.
func snapshotWording<T>(_ path: String, _ body: () throws(KVMError) -> T) -> Result<T, KVMError> {
    do { return .success(try body()) } catch {
        guard case .invalid(let m) = error else { return .failure(error) }
        var text = m.replacing("migration stream corrupt", with: "snapshot \(path) corrupt")
        text = text.replacing("migration stream", with: "snapshot \(path)")
        if !text.contains(path) { text = "snapshot \(path) corrupt: " + text }
        return .failure(.invalid(text))
    }
}

/// Refuses a path that is not a regular file (a directory reads as 0 bytes or EISDIR, a FIFO
/// blocks) with what it is.
func requireRegularFile(_ st: stat, path: String, what: String) throws(KVMError) {
    let kind = st.st_mode & S_IFMT
    guard kind != S_IFREG else { return }
    let name = kind == S_IFDIR ? "a directory" : kind == S_IFIFO ? "a FIFO" : kind == S_IFCHR ? "a character device"
        : kind == S_IFBLK ? "a block device" : kind == S_IFSOCK ? "a socket" : "not a regular file"
    throw KVMError.invalid("\(path) is \(name), not a \(what) file")
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
    /// Refuse the restore when it would need more host memory than this (`--memory-limit`).
    public var memoryLimit: UInt64? = nil
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
    /// Host memory the restore was allowed to take (runtime + data pages with content): what
    /// was checked against the host's available memory and `memoryLimit`.
    public var memoryNeededBytes: UInt64 = 0
    /// Guest data memory resident in the VMM at the end (the data mapping's `Rss` in
    /// /proc/self/smaps: zero pages mapped for reads are not counted).
    public var dataResidentBytes: UInt64? = nil

    public var json: JSONValue {
        .object([
            ("schema", "memvirt.restore/1"), ("mode", .string(lazy ? "lazy" : "eager")), ("error", error.map { .string($0) } ?? .null),
            ("time_to_first_instruction_ms", .double(Double(timeToFirstInstructionNanos / 1000) / 1000)),
            ("pages_loaded_eagerly", .uint(pagesLoadedEagerly)), ("faults", .uint(faults)), ("prefetched", .uint(prefetched)),
            ("run_ms", .double(Double(runNanos / 1000) / 1000)), ("finished", .bool(finished)),
            ("memory_needed_bytes", .uint(memoryNeededBytes)), ("data_resident_bytes", dataResidentBytes.map { .uint($0) } ?? .null),
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
    public static func save(_ spec: WorkloadSpec, afterNanos: UInt64, to path: String, accessesPerSecond: UInt64? = nil,
                            memoryLimit: UInt64? = nil) throws(KVMError) -> SnapshotSaveReport {
        do { try spec.validate() } catch { throw KVMError.invalid(error.message) }
        // A path that cannot take the snapshot is refused before the guest runs.
        try checkWritable(path)
        try KVMRunner.memoryBudget(spec, pageSize: .size4K, residentLimit: nil).check("the snapshot's guest", limit: memoryLimit)
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

    /// Refuses a snapshot path that is a directory or another non-file, or whose temporary
    /// `PATH.partial` cannot be created (the test leaves nothing behind).
    static func checkWritable(_ path: String) throws(KVMError) {
        var st = stat()
        if stat(path, &st) == 0 { try requireRegularFile(st, path: path, what: "snapshot") }
        let tmp = path + ".partial"
        let fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
        if fd < 0 {
            let e = lastErrno()
            if e.rawValue == EEXIST { return }  // an old one: O_TRUNC at the write
            throw KVMError.call("cannot create the snapshot's temporary file \(tmp)", e)
        }
        close(fd)
        unlink(tmp)
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
        // A failed write leaves nothing behind: no PATH.partial.
        var complete = false
        defer { if !complete { unlink(tmp) } }
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
        complete = true
        report.fileBytes = fileSize
        report.memoryBytes = memoryBytes
        report.pages = UInt64(hashes.count)
        report.zeroPages = zeros
        report.memoryHash = hashes.reduce(0, &+)
    }

    // MARK: restore

    /// Restores the snapshot at `path` into a new VM and runs it (to the end, or `runNanos`).
    public static func restore(from path: String, options o: RestoreOptions) throws(KVMError) -> RestoreReport {
        let t0 = monotonicNanoseconds()
        let f = try File(path: path)
        guard let ps = PageSize.allCases.first(where: { $0.bytes == f.hello.pageSize }), f.hello.dataSize % ps.bytes == 0 else {
            throw KVMError.invalid("snapshot \(path) corrupt: guest page size \(f.hello.pageSize) for \(f.hello.dataSize) bytes of data (use 4K, 2M or 1G)")
        }
        // Host memory: the runtime, and the data pages with content. Zero pages (never written,
        // holes in the file) are not copied, eagerly or lazily: the guest reads them from the
        // host's zero page, so even the final checksum, which reads every page, allocates none.
        // A guest whose workload goes on may still write any page of its footprint: then the
        // whole footprint counts.
        let dataPageCount = Int(f.hello.dataSize / 4096)
        let budget = f.done.allSatisfy({ $0 })
            ? HostMemoryBudget(parts: [("runtime", f.hello.runtimeSize), ("data pages with content", UInt64(f.nonZeroPages(below: dataPageCount)) * 4096)])
            : HostMemoryBudget(parts: [("runtime", f.hello.runtimeSize), ("guest data (its workload goes on)", f.hello.dataSize)])
        try budget.check("restoring \(path)", limit: o.memoryLimit)
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
        report.memoryNeededBytes = budget.needBytes
        // The runtime (descriptor tables, page tables, mailboxes, stacks): always eagerly.
        for i in 0..<Int(g.runtime.size / 4096) {
            memcpy(g.runtime.mapping.base + i * 4096, try f.checkedPage(dataPages + i), 4096)
        }
        var lazy: LazyPages? = nil
        if o.lazy {
            lazy = try LazyPages(region: g.data, file: f)
        } else {
            // Eager: read the runs of pages with content in (large reads), then check them; zero
            // pages stay untouched (fresh anonymous memory reads as zero).
            var i = 0
            while i < dataPages {
                if f.isZero(i) { i += 1; continue }
                var j = i + 1
                while j < dataPages && !f.isZero(j) && j - i < 8192 { j += 1 }
                var off = i * 4096
                let end = j * 4096
                while off < end {
                    let n = pread(f.fd.raw, g.data.mapping.base + off, end - off, off_t(f.memoryOffset + UInt64(off)))
                    if n < 0 { if errno == EINTR { continue }; throw KVMError.call("read snapshot \(path)", lastErrno()) }
                    if n == 0 { throw KVMError.invalid("snapshot \(path) truncated while reading guest memory at \(off)") }
                    off += n
                }
                for k in i..<j where ckvm_page_hash(g.data.mapping.base + k * 4096, UInt64(k)) != f.hashes[k] {
                    throw KVMError.invalid("snapshot \(path) corrupt: page \(k) does not match its hash")
                }
                report.pagesLoadedEagerly += UInt64(j - i)
                i = j
            }
        }
        for (i, s) in f.states.enumerated() { try g.vcpus[i].restoreState(s) }
        let kicker = VCPUKicker(vm: g)
        var runner = VCPUThreads(g: g, kicker: kicker)
        runner.done = f.done
        defer { lazy?.stop() }
        try lazy?.start(onError: { kicker.stop() })
        report.timeToFirstInstructionNanos = monotonicNanoseconds() - t0
        try runner.start()
        if let l = lazy, !o.prefetch.isEmpty { try l.prefetch(o.prefetch.filter { $0 >= 0 && $0 < dataPages }) }
        let r0 = monotonicNanoseconds()
        // vCPUs that had finished before the snapshot do not run again (no thread to wait for).
        let allFinished = { (r: VCPUThreads) in r.allDoneFast || r.done.allSatisfy { $0 } }
        if let limit = o.runNanos {
            while monotonicNanoseconds() - r0 < limit && !allFinished(runner) { usleepNanos(1_000_000) }
            if !allFinished(runner) {
                try runner.stop()
                // The stop leaves immediate_exit set: clear it, or the checksum below would
                // leave KVM_RUN at once, over and over.
                kicker.resume()
            } else {
                try runner.join()
            }
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
        report.dataResidentBytes = residentBytes(of: g.data.mapping.base)
        if let l = lazy {
            l.stop()
            if let e = l.error { throw e }
        }
        return report
    }

    /// Reads a working-set file (`memvirt-working-set 1` then one page index a line).
    public static func readWorkingSet(_ path: String) throws(KVMError) -> [Int] {
        let fd = try FileDescriptor.open(path, O_RDONLY | O_NONBLOCK)  // a FIFO would block the open: refused below
        var st = stat()
        if fstat(fd.raw, &st) != 0 { throw KVMError.call("fstat(\(path))", lastErrno()) }
        try requireRegularFile(st, path: path, what: "working-set")
        var bytes: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            let n = buf.withUnsafeMutableBytes { read(fd.raw, $0.baseAddress, $0.count) }
            if n < 0 { throw KVMError.call("read(\(path))", lastErrno()) }
            if n == 0 { break }
            bytes += buf[0..<n]
        }
        // Lines end in LF or CRLF (a file edited on Windows); "\r\n" is one Character in Swift,
        // so split on the bytes.
        let lines = bytes.split(separator: UInt8(ascii: "\n"), omittingEmptySubsequences: false).enumerated().compactMap { (k, l) -> (Int, String)? in
            let t = l.last == UInt8(ascii: "\r") ? l.dropLast() : l[...]
            return t.isEmpty ? nil : (k + 1, String(decoding: t, as: UTF8.self))
        }
        guard let first = lines.first, first.0 == 1, first.1.hasPrefix("memvirt-working-set 1") else {
            throw KVMError.invalid("\(path) is not a working-set file (first line must be 'memvirt-working-set 1')")
        }
        var pages: [Int] = []
        for (k, l) in lines.dropFirst() {
            guard let p = Int(l), p >= 0 else { throw KVMError.invalid("\(path):\(k): '\(l)' is not a page index") }
            pages.append(p)
        }
        return pages
    }

    public static func writeWorkingSet(_ pages: [Int], to path: String) throws(KVMError) {
        try WorkingSetFile(creating: path).write(pages)
    }
}
