#if canImport(Glibc)
import Glibc
#endif
import MemVirtCore
import MemVirtModel
import Testing

// Issue 17, defects 4 and 9 (model side): a run reports what it ran. A lackey run reports the
// trace's accesses, footprint and write ratio (counted by hand from the trace text below), not
// the flags' defaults; a trace with no accesses is refused; --accesses x --threads past 2^64 is
// refused instead of trapping.

@Suite("Model runs report what they ran")
struct LackeyRunReportTests {
    /// 3 distinct 4 KiB pages (0x400000, 0x401000 twice, 0x7ff000), 5 accesses (M = read + write),
    /// 2 writes: footprint 12 KiB, write ratio 2/5.
    static let trace = """
        ==42== Lackey, an example Valgrind tool
        I  00400000,4
         L 00401008,8
         M 00401010,8
         S 7ff000,8

        ==42== summary
        """

    @Test("a lackey run reports the trace's accesses, footprint and write ratio, and no seed")
    func lackeyReportsTheTrace() throws {
        let file = try TraceFile(Self.trace)
        // Flags' defaults that must not be reported: 64 MiB, 1,000,000 accesses, seed 1.
        let spec = WorkloadSpec(pattern: .lackey(path: file.path))
        for paging in [PagingKind.native, .shadow] {
            var config = ModelConfig()
            config.paging = paging
            let r = try ModelEngine.run(spec: spec, config: config)
            #expect(r.workload.accesses == 5, "\(paging)")
            #expect(r.workload.footprint == ByteCount(3 * 4096), "\(paging)")
            #expect(r.workload.writeRatio == 2.0 / 5.0, "\(paging)")
            guard case .object(let kv) = r.json, let w = kv.first(where: { $0.0 == "workload" })?.1,
                  case .object(let wkv) = w else { Issue.record("no workload object in the run JSON"); return }
            #expect(wkv.first(where: { $0.0 == "seed" })?.1 == .null)
            #expect(wkv.first(where: { $0.0 == "accesses" })?.1 == .uint(5))
            #expect(wkv.first(where: { $0.0 == "footprint_bytes" })?.1 == .uint(12288))
        }
    }

    @Test(
        "an empty, header-only or CR-only trace is refused, naming the file",
        arguments: ["", "\n\n", "\r\r\r", "\r\n\r\n", "==1== only a header\n"]
    )
    func emptyTraceRefused(text: String) throws {
        let file = try TraceFile(text)
        do {
            _ = try ModelEngine.run(spec: WorkloadSpec(pattern: .lackey(path: file.path)), config: ModelConfig())
            Issue.record("a trace with no accesses ran")
        } catch let e as InputError {
            #expect(e.message.hasPrefix(file.path), "\(e.message)")
            #expect(e.message.contains("no accesses"), "\(e.message)")
        }
    }

    @Test("--accesses x --threads beyond 2^64 - 1 is an error, not a trap")
    func accessesTimesThreadsOverflow() throws {
        let spec = WorkloadSpec(pattern: .uniform, footprint: .kib(64), accesses: UInt64.max / 2 + 1, threads: 2)
        do {
            _ = try ModelEngine.run(spec: spec, config: ModelConfig())
            Issue.record("an overflowing access count ran")
        } catch let e as InputError {
            #expect(e.message.contains("2 threads"), "\(e.message)")
            #expect(e.message.contains("2^64"), "\(e.message)")
        }
    }
}

/// A temporary file holding `text`, removed when the value goes away.
private final class TraceFile {
    let path: String
    init(_ text: String) throws {
        var template = Array("/tmp/memvirt-trace-XXXXXX".utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        try #require(fd >= 0, "mkstemp failed")
        path = template.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
        let bytes = Array(text.utf8)
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeBytes { write(fd, $0.baseAddress! + done, $0.count - done) }
            try #require(n > 0, "write to \(path) failed")
            done += n
        }
        close(fd)
    }
    deinit { unlink(path) }
}
