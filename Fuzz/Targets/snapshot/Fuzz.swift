// Fuzz target: the snapshot reader (MemVirtKVM/Snapshot/Snapshot.swift), with no VM. The input
// is a snapshot file's header and meta (and optionally the start of its memory); the harness
// recomputes the header and meta checksums (so inputs get past them), writes the file to
// tmpfs, extends it with zeros to the size its header claims (up to 256 MiB, sparse: seeds
// stay small), and opens it with the real `Snapshot.File`: header, meta (HELLO, vCPU states,
// page hashes) and the memory mapping. Then it checks the guest page size as restore does and
// loads the first pages through `checkedPage` (their hashes).
//
// Byte 6 of the input (the header's reserved u16) bit 0: keep the input's header checksum;
// bit 1: keep its meta checksum (so the checksum refusals are fuzzed too).
//
// Seeds: `MEMVIRT_FUZZ_SEEDS=DIR fuzz-snapshot` writes snapshots laid out as Snapshot.write
// lays them out, with the real encoders, into DIR and exits.
import CKVM
import MemVirtCore
@testable import MemVirtKVM

#if canImport(Glibc)
import Glibc
#endif

/// Writes to standard error (Swift 6 refuses the C `stderr` global).
func sayError(_ text: String) {
    var t = text
    t.withUTF8 { b in _ = write(2, b.baseAddress, b.count) }
}

@inline(never) func fail(_ what: String) -> Never {
    sayError("fuzz-snapshot: \(what)\n")
    abort()
}

func u64(_ b: [UInt8], _ o: Int) -> UInt64 { b.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: o, as: UInt64.self) } }
func put64(_ b: inout [UInt8], _ o: Int, _ v: UInt64) { withUnsafeBytes(of: v) { for k in 0..<8 { b[o + k] = $0[k] } } }

/// A file on tmpfs, unlinked at once (the harness reaches it as /proc/self/fd/N), rewritten
/// for every input: Glibc's Swift module does not expose memfd_create.
nonisolated(unsafe) var scratchFD: Int32 = -1
func scratchFile(_ bytes: UnsafeRawBufferPointer, extendTo size: UInt64 = 0) -> Int32 {
    if scratchFD < 0 {
        let path = "/dev/shm/memvirt-fuzz-\(getpid())"
        scratchFD = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard scratchFD >= 0 else { fail("cannot create \(path): errno \(errno)") }
        unlink(path)
    }
    guard ftruncate(scratchFD, 0) == 0 else { fail("ftruncate: errno \(errno)") }
    var off = 0
    while off < bytes.count {
        let w = pwrite(scratchFD, bytes.baseAddress! + off, bytes.count - off, off_t(off))
        guard w > 0 else { fail("write to the scratch file: errno \(errno)") }
        off += w
    }
    if size > UInt64(bytes.count) { guard ftruncate(scratchFD, off_t(size)) == 0 else { fail("ftruncate: errno \(errno)") } }
    return scratchFD
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzSnapshot(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    var b = Array(UnsafeBufferPointer(start: data, count: size))
    var claimed: UInt64 = 0
    if b.count >= SnapshotFormat.headerSize {
        let keep = b[6]
        let metaLen = u64(b, 8)
        if keep & 2 == 0, metaLen <= UInt64(b.count - SnapshotFormat.headerSize) {
            let sum = b.withUnsafeBytes { ckvm_checksum($0.baseAddress! + SnapshotFormat.headerSize, Int(metaLen)) }
            put64(&b, 16, sum)
        }
        if keep & 1 == 0 { put64(&b, 48, b.withUnsafeBytes { ckvm_checksum($0.baseAddress, 48) }) }
        claimed = u64(b, 40)
    }
    let extend = claimed > UInt64(b.count) && claimed <= 256 << 20 ? claimed : 0
    let fd = b.withUnsafeBytes { scratchFile($0, extendTo: extend) }
    do throws(KVMError) {
        let f = try Snapshot.File(path: "/proc/self/fd/\(fd)")
        guard PageSize.allCases.contains(where: { $0.bytes == f.hello.pageSize }) else { return 0 }
        guard f.states.count == Int(f.hello.vcpus), f.done.count == f.states.count else {
            fail("\(f.states.count) states and \(f.done.count) done flags accepted for \(f.hello.vcpus) vCPUs")
        }
        guard UInt64(f.hashes.count) * 4096 == f.hello.dataSize + f.hello.runtimeSize else {
            fail("\(f.hashes.count) page hashes accepted for \(f.hello.dataSize) + \(f.hello.runtimeSize) bytes")
        }
        for i in 0..<min(f.hashes.count, 8) { _ = try? f.checkedPage(i) }
        for s in f.states { _ = s.encoded() }
    } catch {
        guard !error.description.isEmpty else { fail("an empty error") }
    }
    return 0
}

// MARK: seeds

/// A snapshot file of a guest with `dataSize` bytes of data and `vcpus` vCPUs, all memory zero,
/// laid out as Snapshot.write lays it out; only the header and meta are returned (the harness
/// extends the file to the size the header claims).
func seed(vcpus: Int, dataSize: UInt64, runtimeSize: UInt64, pageSize: UInt64, lapic: Bool) -> [UInt8] {
    let hello = MigrationHello(dataSize: dataSize, vcpus: UInt32(vcpus), tableBytesPerVCPU: 8192, runtimeSize: runtimeSize,
                               mode: 0, pageSize: pageSize)
    var state = VCPUState()
    state.regs.rip = 0x40_0000; state.regs.rflags = 2
    state.xsave = [UInt8](repeating: 0, count: 4096)
    state.xcrs = kvm_xcrs()
    state.msrs = [(0x10, 987_654_321)]
    state.lapic = lapic ? [UInt8](repeating: 0, count: 1024) : nil
    state.tscKHz = 2_400_000
    var meta = ByteWriter()
    meta.put(bytes: hello.encoded())
    meta.put(UInt64(1_700_000_000_000_000_000))
    meta.put(UInt64(vcpus))
    for i in 0..<vcpus { meta.put(UInt8(i == 0 ? 0 : 1)); meta.put(bytes: state.encoded()) }
    let pages = Int((dataSize + runtimeSize) / 4096)
    meta.put(UInt64(pages))
    for i in 0..<pages { meta.put(ckvm_page_hash_zero(UInt64(i))) }
    let memoryOffset = (UInt64(SnapshotFormat.headerSize + meta.bytes.count) + 4095) / 4096 * 4096
    let memoryBytes = UInt64(pages) * 4096
    var header = ByteWriter()
    header.put(SnapshotFormat.magic); header.put(SnapshotFormat.version); header.put(UInt16(0))
    header.put(UInt64(meta.bytes.count))
    header.put(meta.bytes.withUnsafeBytes { ckvm_checksum($0.baseAddress, $0.count) })
    header.put(memoryOffset); header.put(memoryBytes); header.put(memoryOffset + memoryBytes)
    header.put(header.bytes.withUnsafeBytes { ckvm_checksum($0.baseAddress, $0.count) })
    header.put(UInt64(0))
    return header.bytes + meta.bytes
}

@_cdecl("LLVMFuzzerInitialize")
public func fuzzInitialize(_ argc: UnsafeMutablePointer<Int32>, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>) -> CInt {
    guard let dir = getenv("MEMVIRT_FUZZ_SEEDS").map({ String(cString: $0) }) else { return 0 }
    let seeds: [(String, [UInt8])] = [
        ("one-vcpu", seed(vcpus: 1, dataSize: 256 << 10, runtimeSize: 2 << 20, pageSize: 4096, lapic: false)),
        ("two-vcpus-lapic", seed(vcpus: 2, dataSize: 64 << 10, runtimeSize: 2 << 20, pageSize: 4096, lapic: true)),
        ("2m-pages", seed(vcpus: 1, dataSize: 2 << 20, runtimeSize: 2 << 20, pageSize: 2 << 20, lapic: false)),
    ]
    for (name, bytes) in seeds {
        guard let f = fopen("\(dir)/\(name)", "wb") else { fail("cannot write \(dir)/\(name)") }
        _ = bytes.withUnsafeBytes { fwrite($0.baseAddress, 1, $0.count, f) }
        fclose(f)
    }
    print("fuzz-snapshot: wrote \(seeds.count) seeds to \(dir)")
    exit(0)
}
