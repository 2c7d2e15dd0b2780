import CKVM
import MemVirtCore
import Testing
#if canImport(Glibc)
import Glibc
#endif
@testable import MemVirtKVM

func temporaryPath(_ name: String) -> String { "/tmp/memvirt-test-\(getpid())-\(name)" }

@Suite("KVM engine: snapshot and lazy restore", .serialized, .enabled(if: KVM.isUsable, Comment(rawValue: kvmReason)))
struct KVMSnapshotTests {
    static let spec = WorkloadSpec(pattern: .uniform, footprint: .mib(16), accesses: 3_000_000, writeRatio: 0.4, seed: 9)

    @Test("eager and lazy restore continue the guest to the oracle's result; a recorded working set cuts faults")
    func restore() throws {
        let path = temporaryPath("snap")
        defer { unlink(path) }
        let s = try Snapshot.save(Self.spec, afterNanos: 40_000_000, to: path)
        print("save: \(s.json.rendered())")
        #expect(s.vcpusDone == [false])
        let want = try oracle(Self.spec)
        var eager = RestoreOptions()
        eager.lazy = false
        let e = try Snapshot.restore(from: path, options: eager)
        print("eager: \(e.json.rendered())")
        #expect(e.finished && e.faults == 0)
        #expect(e.snapshotHash == s.memoryHash)
        #expect(e.guest.first?.readSum == want.readSum)
        #expect(e.guest.first?.memoryChecksum == want.checksum)
        var lazy = RestoreOptions()
        lazy.lazy = true
        let l = try Snapshot.restore(from: path, options: lazy)
        print("lazy: \(l.json.rendered())")
        #expect(l.finished && l.faults > 0 && l.pagesLoadedEagerly == 0)
        #expect(l.guest.first?.readSum == want.readSum)
        #expect(l.guest.first?.memoryChecksum == want.checksum)
        #expect(l.touchOrder.count == Int(l.faults))
        // Again with the recorded working set prefetched: fewer faults, same result.
        lazy.prefetch = l.touchOrder
        let p = try Snapshot.restore(from: path, options: lazy)
        print("prefetch: \(p.json.rendered())")
        #expect(p.prefetched > 0 && p.faults < l.faults)
        #expect(p.guest.first?.memoryChecksum == want.checksum)
    }

    @Test("a truncated, corrupt or foreign snapshot is refused with a clear error", arguments: ["truncated", "page", "meta", "magic"])
    func refused(kind: String) throws {
        let path = temporaryPath("bad-\(kind)")
        defer { unlink(path) }
        let small = WorkloadSpec(pattern: .sequential, footprint: .mib(4), accesses: 200_000, writeRatio: 1, seed: 1)
        let s = try Snapshot.save(small, afterNanos: 1_000_000_000, to: path)
        let fd = open(path, O_RDWR)
        try #require(fd >= 0, "cannot open the snapshot just saved at \(path)")
        var st = stat()
        fstat(fd, &st)
        func poke(_ off: Int) { var b: UInt8 = 0; pread(fd, &b, 1, off_t(off)); b ^= 0x5a; pwrite(fd, &b, 1, off_t(off)) }
        switch kind {
        case "truncated": ftruncate(fd, st.st_size - 4096 * 3)
        case "page": poke(Int(st.st_size) - Int(s.memoryBytes) + 8)  // data page 0, written by the guest
        case "meta": poke(64 + 40)
        default: poke(0)
        }
        close(fd)
        for lazy in [false, true] {
            var o = RestoreOptions()
            o.lazy = lazy
            do {
                _ = try Snapshot.restore(from: path, options: o)
                Issue.record("\(kind) snapshot accepted (lazy \(lazy))")
            } catch {
                print("\(kind) lazy=\(lazy): \(error)")
                switch kind {
                case "truncated": #expect("\(error)".contains("truncated"))
                case "page": #expect("\(error)".contains("page 0 does not match its hash"))
                case "meta": #expect("\(error)".contains("meta checksum mismatch"))
                default: #expect("\(error)".contains("not a memvirt snapshot"))
                }
            }
        }
    }

    @Test("lazy restore of a 256 MiB guest reaches its first instruction at least 10x sooner than eager")
    func lazyIsSooner() throws {
        let path = temporaryPath("big")
        defer { unlink(path) }
        // One write per page, one pass: every page has content when the guest finishes (restore
        // reads only pages with content, so a snapshot taken mid-pass would be partly holes).
        let big = WorkloadSpec(pattern: .strided(stride: 4096), footprint: .mib(256), accesses: 65536, writeRatio: 1, seed: 3)
        let s = try Snapshot.save(big, afterNanos: 300_000_000_000, to: path)
        print("save 256 MiB: \(s.json.rendered())")
        #expect(s.vcpusDone == [true] && s.zeroPages < s.pages / 50)
        var o = RestoreOptions()
        o.runNanos = 20_000_000
        let e = try Snapshot.restore(from: path, options: o)
        o.lazy = true
        let l = try Snapshot.restore(from: path, options: o)
        print("eager: \(e.json.rendered())\nlazy: \(l.json.rendered())")
        #expect(e.pagesLoadedEagerly == 65536 && l.pagesLoadedEagerly == 0)
        #expect(l.guest.first?.memoryChecksum == e.guest.first?.memoryChecksum)
        #expect(e.timeToFirstInstructionNanos >= 10 * l.timeToFirstInstructionNanos,
                "eager \(e.timeToFirstInstructionNanos) ns, lazy \(l.timeToFirstInstructionNanos) ns")
    }
}
