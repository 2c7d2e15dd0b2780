import CKVM
import MemVirtCore
import MemVirtGuest
#if canImport(Glibc)
import Glibc
#endif

extension Snapshot {
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
            let fd = try FileDescriptor.open(path, O_RDONLY | O_NONBLOCK)  // a FIFO would block the open: refused below
            self.fd = fd
            var st = stat()
            if fstat(fd.raw, &st) != 0 { throw KVMError.call("fstat(\(path))", lastErrno()) }
            try requireRegularFile(st, path: path, what: "snapshot")
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
                    // Every number is checked before it is summed or converted: a crafted header is an
                    // error, never a trap.
                    let (end, overflow) = memOff.addingReportingOverflow(memBytes)
                    guard metaLen <= SnapshotFormat.maxMetaBytes, memOff % 4096 == 0, memOff >= UInt64(SnapshotFormat.headerSize) + metaLen,
                          !overflow, fileSize == end, memBytes % 4096 == 0, memBytes / 4096 <= SnapshotFormat.maxPages else {
                        throw KVMError.invalid("snapshot \(path) corrupt: inconsistent header (meta \(metaLen) bytes of at most \(SnapshotFormat.maxMetaBytes), memory at \(memOff) + \(memBytes)\(overflow ? " (past 2^64)" : ""), size \(fileSize))")
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
                snapshotWording(path) { () throws(KVMError) in
                    var r = ByteReader(b, what: "snapshot meta")
                    let hb = try Self.blob(&r, path: path, what: "the VM configuration")
                    let hr: Result<MigrationHello, KVMError> = hb.withUnsafeBytes { x in Result { () throws(KVMError) in try MigrationHello.decode(x) } }
                    let hello = try hr.get()
                    _ = try r.get(UInt64.self)  // realtime at save
                    let n64 = try r.get(UInt64.self)
                    guard n64 >= 1, n64 <= UInt64(GuestLayout.maxVCPUs), n64 == UInt64(hello.vcpus) else {
                        throw KVMError.invalid("snapshot \(path) corrupt: \(n64) vCPU states for a VM of \(hello.vcpus) vCPUs (this memvirt runs 1...\(GuestLayout.maxVCPUs))")
                    }
                    let n = Int(n64)
                    var done: [Bool] = [], states: [VCPUState] = []
                    for i in 0..<n {
                        done.append(try r.get(UInt8.self) != 0)
                        let sb = try Self.blob(&r, path: path, what: "vCPU \(i)'s state")
                        let sr: Result<VCPUState, KVMError> = sb.withUnsafeBytes { x in
                            Result { () throws(KVMError) in var rr = ByteReader(x, what: "snapshot vCPU state"); return try VCPUState.decode(&rr) }
                        }
                        states.append(try sr.get())
                    }
                    let pages64 = try r.get(UInt64.self)
                    // memBytes is bounded by the header check (at most maxPages pages).
                    guard pages64 == memBytes / 4096, UInt64(r.remaining) == pages64 * 8 else {
                        throw KVMError.invalid("snapshot \(path) corrupt: \(pages64) page hashes (\(r.remaining) bytes of them) for \(memBytes) bytes of memory")
                    }
                    let pages = Int(pages64)
                    var hashes = [UInt64](repeating: 0, count: pages)
                    hashes.withUnsafeMutableBytes { $0.copyMemory(from: UnsafeRawBufferPointer(rebasing: b[r.offset...])) }
                    return (hello, done, states, hashes)
                }
            }
            (hello, done, states, hashes) = try parsed.get()
            let (guestBytes, sumOverflow) = hello.dataSize.addingReportingOverflow(hello.runtimeSize)
            guard !sumOverflow, guestBytes == memBytes, hello.dataSize % 4096 == 0, hello.runtimeSize % 4096 == 0 else {
                throw KVMError.invalid("snapshot \(path) corrupt: \(hello.dataSize) + \(hello.runtimeSize) bytes of guest memory, \(memBytes) in the file")
            }
            // The runtime holds every vCPU's lookup table: a larger table cannot be real (and
            // would overflow the layout's arithmetic).
            guard hello.tableBytesPerVCPU <= hello.runtimeSize / UInt64(hello.vcpus) else {
                throw KVMError.invalid("snapshot \(path) corrupt: \(hello.tableBytesPerVCPU) table bytes per vCPU in a runtime area of \(hello.runtimeSize) bytes")
            }
            memoryOffset = memOff
            memory = try Mapping(size: Int(memBytes), prot: PROT_READ, flags: MAP_PRIVATE, fd: fd.raw, offset: off_t(memOff), what: "snapshot \(path)")
        }

        func page(_ i: Int) -> UnsafeRawPointer { UnsafeRawPointer(memory.base + i * 4096) }

        /// True when the snapshot says page `i` is all zeros (its hash is the zero page's):
        /// restore maps the zero page instead of copying, so untouched memory stays unallocated.
        func isZero(_ i: Int) -> Bool { hashes[i] == ckvm_page_hash_zero(UInt64(i)) }

        /// Data pages (below `dataPages`) with content.
        func nonZeroPages(below dataPages: Int) -> Int {
            hashes.withUnsafeBufferPointer { Int(ckvm_count_nonzero_hashes($0.baseAddress, min(dataPages, $0.count), 0)) }
        }

        /// A length-prefixed field of the meta, its length checked against what is left before
        /// it is converted.
        static func blob(_ r: inout ByteReader, path: String, what: String) throws(KVMError) -> [UInt8] {
            let n = try r.get(UInt64.self)
            guard n <= UInt64(r.remaining) else {
                throw KVMError.invalid("snapshot \(path) corrupt: \(what) claims \(n) bytes at meta offset \(r.offset - 8), \(r.remaining) remain")
            }
            let a = Array(r.buffer[r.offset..<(r.offset + Int(n))])
            r.offset += Int(n)
            return a
        }

        /// The page's content checked against its hash.
        func checkedPage(_ i: Int) throws(KVMError) -> UnsafeRawPointer {
            let p = page(i)
            guard ckvm_page_hash(p, UInt64(i)) == hashes[i] else {
                throw KVMError.invalid("snapshot \(path) corrupt: page \(i) does not match its hash")
            }
            return p
        }
    }
}
