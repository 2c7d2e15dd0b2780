import CKVM
import MemVirtCore
import Testing
#if canImport(Glibc)
import Glibc
#endif
@testable import MemVirtKVM

/// Whole-file helpers for crafting snapshots: the checksums are recomputed after an edit, so
/// the reader gets past them to the numbers under test.
enum SnapshotCraft {
    static func read(_ path: String) -> [UInt8] {
        let fd = open(path, O_RDONLY)
        defer { close(fd) }
        var st = stat()
        fstat(fd, &st)
        var b = [UInt8](repeating: 0, count: Int(st.st_size))
        _ = b.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, 0) }
        return b
    }
    static func write(_ b: [UInt8], _ path: String) {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        _ = b.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
        close(fd)
    }
    static func u64(_ b: [UInt8], _ at: Int) -> UInt64 { b.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: at, as: UInt64.self) } }
    static func set64(_ b: inout [UInt8], _ at: Int, _ v: UInt64) { for k in 0..<8 { b[at + k] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(k))) } }
    /// Meta checksum (header +16) and header checksum (+48) made right again.
    static func reseal(_ b: inout [UInt8]) {
        let metaLen = Int(u64(b, 8))
        let msum = b.withUnsafeBytes { ckvm_checksum($0.baseAddress! + 64, metaLen) }
        set64(&b, 16, msum)
        set64(&b, 48, b.withUnsafeBytes { ckvm_checksum($0.baseAddress, 48) })
    }
    // Offsets in the file (SnapshotFormat): meta at 64 = u64 HELLO length, HELLO (dataSize +0,
    // vcpus +8, tableBytesPerVCPU +12, runtimeSize +20), realtime, vCPU count, states, page
    // count, page hashes.
    static let hello = 72
    static func vcpuCount(_ b: [UInt8]) -> Int { 72 + Int(u64(b, 64)) + 8 }
    static func pageCount(_ b: [UInt8]) -> Int { 64 + Int(u64(b, 8)) - Int(u64(b, 32) / 4096) * 8 - 8 }
}

@Suite("KVM engine: snapshot hardening", .serialized, .enabled(if: KVM.isUsable, Comment(rawValue: kvmReason)))
struct SnapshotHardeningTests {
    static let small = WorkloadSpec(pattern: .sequential, footprint: .mib(4), accesses: 100_000, writeRatio: 1, seed: 5)

    /// A small snapshot of a guest that finished its workload.
    static func finishedSnapshot(_ name: String, _ spec: WorkloadSpec = small) throws -> String {
        let path = temporaryPath(name)
        let s = try Snapshot.save(spec, afterNanos: 5_000_000_000, to: path)
        #expect(s.vcpusDone == [true])
        return path
    }

    @Test("crafted numbers in a snapshot (checksums recomputed) are refused with the field, never a trap",
          arguments: ["memory-end", "vcpu-count", "page-count", "guest-size", "table-bytes", "hello-length", "state-length"])
    func craftedNumbers(field: String) throws {
        let src = try Self.finishedSnapshot("craft-src-\(field)")
        defer { unlink(src) }
        var b = SnapshotCraft.read(src)
        let expected: String
        switch field {
        case "memory-end":
            // memory offset + memory bytes past 2^64 (it wraps to the file size written here).
            let off = SnapshotCraft.u64(b, 24)
            SnapshotCraft.set64(&b, 32, 0 &- 4096)
            SnapshotCraft.set64(&b, 40, off &- 4096)
            expected = "inconsistent header"
        case "vcpu-count":
            SnapshotCraft.set64(&b, SnapshotCraft.vcpuCount(b), .max)
            expected = "vCPU states"
        case "page-count":
            SnapshotCraft.set64(&b, SnapshotCraft.pageCount(b), .max)
            expected = "page hashes"
        case "guest-size":
            SnapshotCraft.set64(&b, SnapshotCraft.hello + 0, 0 &- 4096)
            expected = "bytes of guest memory"
        case "table-bytes":
            SnapshotCraft.set64(&b, SnapshotCraft.hello + 12, .max)
            expected = "table bytes per vCPU"
        case "hello-length":
            SnapshotCraft.set64(&b, 64, .max)
            expected = "claims"
        default:
            // vCPU 0's state length: after its done byte.
            SnapshotCraft.set64(&b, SnapshotCraft.vcpuCount(b) + 8 + 1, .max - 3)
            expected = "claims"
        }
        SnapshotCraft.reseal(&b)
        let path = temporaryPath("craft-\(field)")
        SnapshotCraft.write(b, path)
        defer { unlink(path) }
        for lazy in [false, true] {
            var o = RestoreOptions()
            o.lazy = lazy
            do {
                _ = try Snapshot.restore(from: path, options: o)
                Issue.record("\(field): crafted snapshot accepted")
            } catch {
                print("\(field): \(error)")
                #expect("\(error)".contains(expected))
                #expect("\(error)".contains("snapshot \(path)"))
                #expect(!"\(error)".contains("migration stream"))
            }
        }
    }

    @Test("restore --run-for of a guest that had finished returns (no spin) with the oracle's result", .timeLimit(.minutes(1)))
    func runForFinishedGuest() throws {
        let path = try Self.finishedSnapshot("finished")
        defer { unlink(path) }
        let want = try oracle(Self.small)
        for lazy in [false, true] {
            var o = RestoreOptions()
            o.lazy = lazy
            o.runNanos = 10_000_000
            let r = try Snapshot.restore(from: path, options: o)
            #expect(r.finished)
            #expect(r.guest.first?.memoryChecksum == want.checksum)
            #expect(r.guest.first?.readSum == want.readSum)
        }
    }

    @Test("a sparse snapshot restores (eagerly and lazily, checksum included) into about its written pages, not its footprint")
    func sparseRestoreMemory() throws {
        // 1,024 pages written (strided by a page, each written once) in a 64 MiB footprint.
        let spec = WorkloadSpec(pattern: .strided(stride: 4096), footprint: .mib(64), accesses: 1024, writeRatio: 1, seed: 8)
        let path = try Self.finishedSnapshot("sparse", spec)
        defer { unlink(path) }
        let want = try oracle(spec)
        let written: UInt64 = 1024 * 4096
        for lazy in [false, true] {
            var o = RestoreOptions()
            o.lazy = lazy
            let r = try Snapshot.restore(from: path, options: o)
            print("sparse lazy=\(lazy): \(r.json.rendered())")
            #expect(r.guest.first?.memoryChecksum == want.checksum)
            let f = try Snapshot.File(path: path)
            #expect(r.memoryNeededBytes == f.hello.runtimeSize + written)
            // The checksum read all 64 MiB; the data mapping holds the written pages only (and
            // a little slack for the table of the strided pattern: none).
            let resident = try #require(r.dataResidentBytes)
            #expect(resident <= written + (256 << 10), "resident \(resident) bytes")
            if !lazy { #expect(r.pagesLoadedEagerly == 1024) }
            // The same restore with a limit one byte short of what it needs is refused, naming both.
            o.memoryLimit = r.memoryNeededBytes - 1
            do { _ = try Snapshot.restore(from: path, options: o); Issue.record("restored over --memory-limit") } catch {
                #expect("\(error)".contains("--memory-limit"))
                #expect("\(error)".contains("\(ByteCount(r.memoryNeededBytes))"))
            }
        }
    }

    @Test("a snapshot that cannot be written fails before the guest runs and leaves no PATH.partial")
    func noStrayPartial() throws {
        let dir = temporaryPath("snapdir")
        mkdir(dir, 0o755)
        defer { rmdir(dir) }
        do { _ = try Snapshot.save(Self.small, afterNanos: 1_000_000, to: dir); Issue.record("saved over a directory") } catch {
            #expect("\(error)".contains("is a directory"))
        }
        #expect(access(dir + ".partial", F_OK) != 0)
        do { _ = try Snapshot.save(Self.small, afterNanos: 1_000_000, to: "/nonexistent-dir/snap"); Issue.record("saved") } catch {
            #expect("\(error)".contains("/nonexistent-dir/snap.partial"))
        }
    }
}

@Suite("Snapshot and working-set files: what is not a file, line endings")
struct SnapshotFileTests {
    @Test("a directory given as a snapshot, working-set or kernel file is refused as a directory")
    func directories() throws {
        let dir = temporaryPath("adir")
        mkdir(dir, 0o755)
        defer { rmdir(dir) }
        do { _ = try Snapshot.File(path: dir); Issue.record("opened") } catch { #expect("\(error)" == "\(dir) is a directory, not a snapshot file") }
        do { _ = try Snapshot.readWorkingSet(dir); Issue.record("read") } catch { #expect("\(error)".contains("is a directory")) }
        do { _ = try Multiboot.read(path: dir); Issue.record("read") } catch { #expect("\(error)" == "\(dir) is a directory, not a kernel file") }
        do { _ = try WorkingSetFile(creating: dir); Issue.record("created") } catch { #expect("\(error)".contains("is a directory")) }
        do { _ = try WorkingSetFile(creating: "/nonexistent-dir/ws"); Issue.record("created") } catch { #expect("\(error)".contains("/nonexistent-dir/ws")) }
        // A FIFO is refused, not waited on.
        let fifo = temporaryPath("afifo")
        #expect(mkfifo(fifo, 0o644) == 0)
        defer { unlink(fifo) }
        do { _ = try Snapshot.File(path: fifo); Issue.record("opened") } catch { #expect("\(error)" == "\(fifo) is a FIFO, not a snapshot file") }
        do { _ = try Snapshot.readWorkingSet(fifo); Issue.record("read") } catch { #expect("\(error)".contains("is a FIFO")) }
    }

    @Test("a working-set file with CRLF line ends reads the same as with LF", arguments: ["\n", "\r\n"])
    func lineEnds(eol: String) throws {
        let path = temporaryPath("ws-\(eol.count)")
        defer { unlink(path) }
        let pages = [7, 0, 123_456, 3]
        let text = "memvirt-working-set 1 pages=4" + eol + pages.map { "\($0)" + eol }.joined()
        SnapshotCraft.write(Array(text.utf8), path)
        #expect(try Snapshot.readWorkingSet(path) == pages)
        // Written and read back.
        try Snapshot.writeWorkingSet(pages, to: path)
        #expect(try Snapshot.readWorkingSet(path) == pages)
        // A bad line is named by its number.
        SnapshotCraft.write(Array(("memvirt-working-set 1" + eol + "4" + eol + "x" + eol).utf8), path)
        do { _ = try Snapshot.readWorkingSet(path); Issue.record("read") } catch { #expect("\(error)".contains("\(path):3: 'x'")) }
    }
}
