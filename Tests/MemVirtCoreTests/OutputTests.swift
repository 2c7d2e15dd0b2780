#if canImport(Glibc)
import Glibc
#endif
import MemVirtCore
import Testing

// Issue 17 defect 9: write errors were ignored (`run --json > /dev/full` and
// `kvm image --out /dev/full` exited 0). Output.writeFile and Output.standardOutput check every
// write; the CLI's exit check catches what `print` buffered.
@Suite("Output: writes that fail are errors")
struct OutputTests {
    @Test("writing a file to a full device throws, naming the path and the reason")
    func fullDevice() throws {
        try #require(access("/dev/full", W_OK) == 0, "no writable /dev/full")
        do {
            try Output.writeFile("/dev/full", [UInt8](repeating: 0x41, count: 10_000))
            Issue.record("a write to /dev/full succeeded")
        } catch {
            #expect(error.message.hasPrefix("/dev/full"), "\(error.message)")
            #expect(error.message.contains("No space left"), "\(error.message)")
        }
    }

    @Test("writing to a directory or a missing directory throws, naming the path")
    func badPaths() {
        for path in ["/tmp", "/nonexistent-memvirt-dir/file"] {
            #expect(throws: InputError.self) { try Output.writeFile(path, [1, 2, 3]) }
        }
    }

    @Test("a file written whole reads back the same bytes")
    func roundTrip() throws {
        let path = "/tmp/memvirt-output-test-\(getpid())"
        defer { unlink(path) }
        let bytes = (0..<100_000).map { UInt8(truncatingIfNeeded: $0 &* 31) }
        try Output.writeFile(path, bytes)
        let fd = open(path, O_RDONLY)
        try #require(fd >= 0)
        defer { close(fd) }
        var back = [UInt8](repeating: 0, count: bytes.count + 1)
        var got = 0
        while true {
            let n = back.withUnsafeMutableBytes { read(fd, $0.baseAddress! + got, $0.count - got) }
            if n <= 0 { break }
            got += n
        }
        #expect(got == bytes.count)
        #expect(Array(back[0..<got]) == bytes)
    }

    /// The CLI end to end (skipped when the debug binary is not built): stdout on /dev/full
    /// must give a non-zero exit, for the JSON and the text report and for `kvm image --out`.
    @Test("memvirt with its output on /dev/full exits non-zero")
    func cliFullDevice() throws {
        let bin = packageRoot() + "/.build/debug/memvirt"
        guard access(bin, X_OK) == 0, access("/dev/full", W_OK) == 0 else {
            print("skipped: \(bin) not built or no /dev/full")
            return
        }
        let run = ["run", "--workload", "uniform", "--footprint", "64KiB", "--accesses", "1000", "--quiet"]
        #expect(try spawnStatus(bin, run + ["--json"], stdout: "/dev/full") != 0)
        #expect(try spawnStatus(bin, run, stdout: "/dev/full") != 0)
        #expect(try spawnStatus(bin, run + ["--json"], stdout: "/dev/null") == 0)
        #expect(try spawnStatus(bin, ["kvm", "image", "--out", "/dev/full"], stdout: "/dev/null") != 0)
    }
}

/// Runs `program args...` with stdout to `stdout` and stderr to /dev/null; its exit status.
private func spawnStatus(_ program: String, _ args: [String], stdout: String) throws -> Int32 {
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_addopen(&actions, 1, stdout, O_WRONLY, 0)
    posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0)
    let argv: [UnsafeMutablePointer<CChar>?] = ([program] + args).map { strdup($0) } + [nil]
    defer { for p in argv { free(p) } }
    var pid: pid_t = 0
    let rc = posix_spawn(&pid, program, &actions, nil, argv, environ)
    try #require(rc == 0, "posix_spawn \(program) failed: \(rc)")
    var status: Int32 = 0
    while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
    return status & 0x7F == 0 ? (status >> 8) & 0xFF : 128 + (status & 0x7F)
}

/// The package root, from this file's path (Tests/MemVirtCoreTests/OutputTests.swift).
private func packageRoot(file: String = #filePath) -> String {
    var parts = file.split(separator: "/", omittingEmptySubsequences: false)
    parts.removeLast(3)
    return parts.joined(separator: "/")
}
