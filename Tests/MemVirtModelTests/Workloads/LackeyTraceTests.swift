#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import MemVirtCore
import MemVirtModel
import Testing

// Tests for `LackeyTraceReader`: hand-written traces for each rule of the format, traces larger
// than the reader's buffer, and one real trace from valgrind checked against an independent
// (slow, String-based) parse of the same file.

@Suite("Lackey trace reader")
struct LackeyTraceTests {

    // MARK: - Given a hand-written trace

    @Test("all four kinds replay in order; header, blank and summary lines are skipped")
    func allFourKinds() throws {
        let trace = """
            ==4242== Lackey, an example Valgrind tool
            ==4242== Command: /bin/true
            ==4242== 
            I  0400d7d4,8
             L 04010a78,8
             S 7ff0001f0,8

             M 0421ddd8,4
            ==4242== Counted 1 call to main()

            """
        let file = try LackeyTempFile(trace)
        let reader = try LackeyTraceReader(path: file.path)
        let got = try readAll(reader)
        #expect(got == [
            Access(address: GuestVirtualAddress(rawValue: 0x0400_d7d4), kind: .execute, size: 8),
            Access(address: GuestVirtualAddress(rawValue: 0x0401_0a78), kind: .read, size: 8),
            Access(address: GuestVirtualAddress(rawValue: 0x7_ff00_01f0), kind: .write, size: 8),
            Access(address: GuestVirtualAddress(rawValue: 0x0421_ddd8), kind: .read, size: 4),
            Access(address: GuestVirtualAddress(rawValue: 0x0421_ddd8), kind: .write, size: 4),
        ])
        #expect(reader.linesRead == 4)
        #expect(reader.lineNumber == 9)
        // End of file is sticky.
        #expect(try reader.next() == nil)
        #expect(try reader.next() == nil)
    }

    @Test("an empty file and a header-only file give no accesses")
    func emptyTraces() throws {
        for text in ["", "\n\n", "==1== only a header\n==1== \n"] {
            let file = try LackeyTempFile(text)
            let reader = try LackeyTraceReader(path: file.path)
            #expect(try reader.next() == nil)
            #expect(reader.linesRead == 0)
        }
    }

    @Test("a last line without a newline, CRLF line ends, tabs and upper-case hex are accepted")
    func lenientWhitespace() throws {
        let file = try LackeyTempFile(" L 00A0,8\r\n\t S\t00B0,4  \r\nI  00C0,2")
        let got = try readAll(LackeyTraceReader(path: file.path))
        #expect(got == [
            Access(address: GuestVirtualAddress(rawValue: 0xA0), kind: .read, size: 8),
            Access(address: GuestVirtualAddress(rawValue: 0xB0), kind: .write, size: 4),
            Access(address: GuestVirtualAddress(rawValue: 0xC0), kind: .execute, size: 2),
        ])
    }

    @Test(
        "an access that crosses a 4 KiB boundary touches both pages, the second part starting at the boundary",
        arguments: [
            // (line, expected (address, kind, size) list)
            (" L 00000ffc,8", [(0xFFC, AccessKind.read, 4), (0x1000, .read, 4)]),
            ("I  1ffe,4", [(0x1FFE, .execute, 2), (0x2000, .execute, 2)]),
            (" S 2fff,2", [(0x2FFF, .write, 1), (0x3000, .write, 1)]),
            (" M 2ff8,16", [(0x2FF8, .read, 8), (0x3000, .read, 8), (0x2FF8, .write, 8), (0x3000, .write, 8)]),
            // Ends exactly at the boundary: one page, no split.
            (" S 3ff8,8", [(0x3FF8, .write, 8)]),
            (" L 4000,4096", [(0x4000, .read, 4096)]),
            (" L 4001,4096", [(0x4001, .read, 4095), (0x5000, .read, 1)]),
            (" M 5000,4096", [(0x5000, .read, 4096), (0x5000, .write, 4096)]),
            (" L fffffffffffffff8,8", [(0xFFFF_FFFF_FFFF_FFF8, .read, 8)]),
        ] as [(String, [(UInt64, AccessKind, UInt16)])]
    )
    func pageCrossing(line: String, expected: [(UInt64, AccessKind, UInt16)]) throws {
        let file = try LackeyTempFile("==1== header\n" + line + "\n I  7000,1\n")
        let reader = try LackeyTraceReader(path: file.path)
        let got = try readAll(reader)
        let want = expected.map { Access(address: GuestVirtualAddress(rawValue: $0.0), kind: $0.1, size: $0.2) }
            + [Access(address: GuestVirtualAddress(rawValue: 0x7000), kind: .execute, size: 1)]
        #expect(got == want)
        #expect(reader.linesRead == 2)
        // Every byte of the original access is covered once, and no part crosses a page.
        for a in got.dropLast() {
            #expect(a.address.rawValue >> 12 == (a.address.rawValue + (UInt64(a.size) - 1)) >> 12)
        }
    }

    @Test(
        "a malformed line is an InputError naming the file, the line number and the text",
        arguments: [
            (" X 12zz,8", "kind"),
            (" L 12zz,8", "hexadecimal"),
            (" L 1000", "SIZE"),
            (" L 1000,", "size"),
            (" L ,8", "address"),
            ("L1000,8", "space"),
            (" L 1000,0", "size 0"),
            (" L 1000,4097", "size 4097"),
            (" L 1000,123456789012", "size"),
            (" L 1000,8 junk", "after the size"),
            (" L 1000,-8", "size"),
            (" L 0x1000,8", "hexadecimal"),
            (" L 12345678901234567,8", "16"),
            (" L fffffffffffffffc,8", "end of the 64-bit address space"),
            ("=1= not a valgrind message", "kind"),
            ("garbage", "kind"),
        ]
    )
    func malformed(line: String, reason: String) throws {
        let file = try LackeyTempFile("==7== header\nI  1000,4\n L 2000,8\n" + line + "\n S 3000,8\n")
        let reader = try LackeyTraceReader(path: file.path)
        // The good lines before it replay normally.
        #expect(try reader.next()?.address.rawValue == 0x1000)
        #expect(try reader.next()?.address.rawValue == 0x2000)
        let error = #expect(throws: InputError.self) { try reader.next() }
        let message = error?.message ?? ""
        #expect(message.hasPrefix("\(file.path):4: bad line '\(line)': "), "\(message)")
        #expect(message.contains(reason), "\(message)")
    }

    @Test("a missing or unreadable file is a clear InputError naming the path")
    func missingFile() {
        let path = "/nonexistent-dir/no-such-trace.txt"
        let error = #expect(throws: InputError.self) { try LackeyTraceReader(path: path) }
        #expect(error?.message.contains(path) == true)
        #expect(error?.message.contains("No such file") == true, "\(error?.message ?? "")")

        let dirError = #expect(throws: InputError.self) {
            let reader = try LackeyTraceReader(path: "/")
            _ = try reader.next()
        }
        #expect(dirError?.message.hasPrefix("/") == true)
    }

    // MARK: - Given traces larger than the reader's buffer

    @Test("a trace several times the buffer size replays exactly, across every refill")
    func largeSyntheticTrace() throws {
        // 300k lines of varied length (~5 MB), mixed kinds, some page-crossers, headers.
        var rng = SplitMix64(seed: 7)
        var text = "==9== header\n"
        var expected: [Access] = []
        var lines = 0
        text.reserveCapacity(6 << 20)
        for i in 0..<300_000 {
            if i % 50_000 == 17 { text += "==9== a message in the middle\n\n" }
            let addr = (rng.next() >> UInt64(rng.bounded(40))) & 0x0000_FFFF_FFFF_FFFF
            let size = 1 + Int(rng.bounded(16))
            let k = rng.bounded(4)
            let prefix = ["I  ", " L ", " S ", " M "][Int(k)]
            text += prefix + String(addr, radix: 16) + "," + String(size) + "\n"
            lines += 1
            let kinds: [AccessKind] = k == 0 ? [.execute] : k == 1 ? [.read] : k == 2 ? [.write] : [.read, .write]
            for kind in kinds { expected += referenceSplit(addr, size, kind) }
        }
        text.removeLast()  // and the last line has no newline
        let file = try LackeyTempFile(text)
        let reader = try LackeyTraceReader(path: file.path)
        var n = 0
        var mismatches = 0
        while let a = try reader.next() {
            if n >= expected.count || expected[n] != a { mismatches += 1 }
            n += 1
        }
        #expect(mismatches == 0)
        #expect(n == expected.count)
        #expect(reader.linesRead == lines)
        #expect(reader.lineNumber == lines + 1 + 6 * 2)
    }

    @Test("a malformed line deep in a large trace reports its exact line number")
    func errorLineNumberAfterRefills() throws {
        var text = "==3== header\n"
        for i in 0..<200_000 { text += " L " + String(0x1000 + UInt64(i) * 8, radix: 16) + ",8\n" }
        text += " L 1000,8,8\n I  2000,4\n"
        let file = try LackeyTempFile(text)
        let reader = try LackeyTraceReader(path: file.path)
        var n = 0
        let error = #expect(throws: InputError.self) { while try reader.next() != nil { n += 1 } }
        #expect(n == 200_000)
        #expect(error?.message.hasPrefix("\(file.path):200002: bad line ' L 1000,8,8': ") == true, "\(error?.message ?? "")")
        // The reader goes on after the bad line.
        #expect(try reader.next() == Access(address: GuestVirtualAddress(rawValue: 0x2000), kind: .execute, size: 4))
        #expect(try reader.next() == nil)
    }

    @Test("a valgrind message longer than the buffer is skipped; an over-long access line is an error")
    func overlongLines() throws {
        let long = String(repeating: "x", count: LackeyTraceReader.bufferSize + 100)
        let ok = try LackeyTempFile("I  1000,4\n==5== " + long + "\n S 2000,8\n")
        let reader = try LackeyTraceReader(path: ok.path)
        #expect(try readAll(reader).map(\.address.rawValue) == [0x1000, 0x2000])
        #expect(reader.lineNumber == 3)

        // The same at the very end of the file, without a newline.
        let tail = try LackeyTempFile("I  1000,4\n==5== " + long)
        let r3 = try LackeyTraceReader(path: tail.path)
        #expect(try readAll(r3).map(\.address.rawValue) == [0x1000])
        #expect(r3.lineNumber == 2)

        let bad = try LackeyTempFile("I  1000,4\n L 2000," + long + "\n")
        let r2 = try LackeyTraceReader(path: bad.path)
        _ = try r2.next()
        let error = #expect(throws: InputError.self) { try r2.next() }
        #expect(error?.message.hasPrefix("\(bad.path):2: bad line ' L 2000,xxx") == true, "\(error?.message.prefix(120) ?? "")")
    }

    // MARK: - Given a real trace from valgrind

    static let valgrind = "/usr/bin/valgrind"
    static var valgrindInstalled: Bool { access(valgrind, X_OK) == 0 }

    @Test(
        "a real lackey trace of /bin/true replays every I/L/S/M line and touches the same 4 KiB pages",
        .enabled(if: LackeyTraceTests.valgrindInstalled, "valgrind is not installed at /usr/bin/valgrind"),
        .timeLimit(.minutes(2))
    )
    func realValgrindTrace() throws {
        let out = try LackeyTempFile("")
        let status = try spawn(Self.valgrind, ["--tool=lackey", "--trace-mem=yes", "--log-file=\(out.path)", "/bin/true"])
        #expect(status == 0)

        // Independent oracle: split the file into Strings and parse each line the slow way.
        let bytes = try readFile(out.path)
        var oracleLines = 0
        var oracleAccesses = 0
        var oraclePages = Set<UInt64>()
        var headerLines = 0
        for raw in bytes.split(separator: UInt8(ascii: "\n"), omittingEmptySubsequences: false) {
            let line = String(decoding: raw, as: UTF8.self)
            if line.hasPrefix("==") { headerLines += 1; continue }
            let fields = line.split(separator: " ")
            guard fields.count == 2, ["I", "L", "S", "M"].contains(fields[0]) else { continue }
            let parts = fields[1].split(separator: ",")
            let addr = try #require(UInt64(parts[0], radix: 16), "\(line)")
            let size = try #require(UInt64(parts[1]), "\(line)")
            oracleLines += 1
            let first = addr / 4096
            let last = (addr + size - 1) / 4096
            for p in first...last { oraclePages.insert(p) }
            oracleAccesses += (fields[0] == "M" ? 2 : 1) * Int(last - first + 1)
        }
        #expect(headerLines > 0)
        #expect(oracleLines > 10_000, "lackey traced only \(oracleLines) lines of /bin/true")

        let reader = try LackeyTraceReader(path: out.path)
        var pages = Set<UInt64>()
        var accesses = 0
        var kinds: [AccessKind: Int] = [:]
        while let a = try reader.next() {
            accesses += 1
            pages.insert(a.address.pageNumber)
            kinds[a.kind, default: 0] += 1
        }
        #expect(reader.linesRead == oracleLines)
        #expect(accesses == oracleAccesses)
        #expect(pages == oraclePages)
        #expect(kinds[.execute, default: 0] > 0 && kinds[.read, default: 0] > 0 && kinds[.write, default: 0] > 0)

        // The whole program through the model (memvirt run --workload lackey:FILE): demand
        // faults equal the distinct 4 KiB pages of the trace, natively and under shadow paging.
        for kind in [PagingKind.native, .shadow] {
            var config = ModelConfig()
            config.paging = kind
            let r = try ModelEngine.run(spec: WorkloadSpec(pattern: .lackey(path: out.path)), config: config)
            #expect(r.counters[.guestPageFaults] == UInt64(oraclePages.count), "\(kind)")
            #expect(r.counters[.accesses] == UInt64(oracleAccesses), "\(kind)")
        }
    }

    @Test(
        "scripts/make-lackey-trace writes a trace the reader replays",
        .enabled(if: LackeyTraceTests.valgrindInstalled, "valgrind is not installed at /usr/bin/valgrind"),
        .timeLimit(.minutes(2))
    )
    func makeLackeyTraceScript() throws {
        let script = packageRoot() + "/scripts/make-lackey-trace"
        try #require(access(script, X_OK) == 0, "\(script) is missing or not executable")
        let out = try LackeyTempFile("")
        #expect(try spawn(script, [out.path, "/bin/true"]) == 0)
        let reader = try LackeyTraceReader(path: out.path)
        while try reader.next() != nil {}
        #expect(reader.linesRead > 10_000)
        // No arguments: a usage error, not a trace.
        #expect(try spawn(script, []) != 0)
    }
}

// MARK: - Helpers (independent of the reader)

/// The reference split of one trace access into page pieces, written directly from the rule.
private func referenceSplit(_ addr: UInt64, _ size: Int, _ kind: AccessKind) -> [Access] {
    var out: [Access] = []
    var a = addr
    var left = UInt64(size)
    while left > 0 {
        let pageEnd = (a / 4096 + 1) * 4096
        let n = min(left, pageEnd - a)
        out.append(Access(address: GuestVirtualAddress(rawValue: a), kind: kind, size: UInt16(n)))
        a += n
        left -= n
    }
    return out
}

private func readAll(_ reader: LackeyTraceReader) throws -> [Access] {
    var out: [Access] = []
    while let a = try reader.next() { out.append(a) }
    return out
}

/// A file in /tmp holding `text`, removed when the value goes away.
private final class LackeyTempFile {
    let path: String
    init(_ text: String) throws {
        var template = Array("/tmp/memvirt-lackey-XXXXXX".utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        try #require(fd >= 0, "mkstemp failed")
        path = template.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
        var bytes = Array(text.utf8)
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeMutableBytes { write(fd, $0.baseAddress! + done, $0.count - done) }
            try #require(n > 0, "write to \(path) failed")
            done += n
        }
        close(fd)
        bytes.removeAll()
    }
    deinit { unlink(path) }
}

private func readFile(_ path: String) throws -> [UInt8] {
    let f = try #require(fopen(path, "rb"), "cannot open \(path)")
    defer { fclose(f) }
    var out: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 1 << 16)
    while true {
        let n = chunk.withUnsafeMutableBytes { fread($0.baseAddress!, 1, $0.count, f) }
        if n == 0 { break }
        out += chunk[0..<n]
    }
    return out
}

/// Runs `program args...` with stdout and stderr to /dev/null; its exit status.
private func spawn(_ program: String, _ args: [String]) throws -> Int32 {
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
    posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0)
    let argv: [UnsafeMutablePointer<CChar>?] = ([program] + args).map { strdup($0) } + [nil]
    defer { for p in argv { free(p) } }
    var pid: pid_t = 0
    let rc = posix_spawn(&pid, program, &actions, nil, argv, environ)
    try #require(rc == 0, "posix_spawn \(program) failed: \(rc)")
    var status: Int32 = 0
    while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
    // WIFEXITED / WEXITSTATUS are macros; decode by hand.
    return status & 0x7F == 0 ? (status >> 8) & 0xFF : 128 + (status & 0x7F)
}

/// The package root, from this file's path (Tests/MemVirtModelTests/Workloads/LackeyTraceTests.swift:
/// four components; it was three before the tests moved into folders).
private func packageRoot(file: String = #filePath) -> String {
    // Tests/MemVirtModelTests/Workloads/LackeyTraceTests.swift: four components below the root.
    var parts = file.split(separator: "/", omittingEmptySubsequences: false)
    parts.removeLast(4)
    return parts.joined(separator: "/")
}
