import Foundation
import MemVirtCore
import MemVirtExperiments
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Sweep files that aborted the process (SIGABRT) or were silently truncated when sweep files
/// were parsed by TOMLKit's bundled C++ parser (issue 17 item 3): each must now be an error
/// naming the file and the line of the bad byte, in this process and in `memvirt sweep plan`.
@Suite("Malformed sweep files are errors with file and line, never a crash")
struct SweepFileMalformedTests {
    /// The headers that aborted TOMLKit, and a stray '[' on its own line.
    static let abortHeaders = ["[.]", "[=]", "[é]", "[$x]", "["]

    /// `bad` on line 3 of an otherwise valid sweep file.
    static func withBadLine(_ bad: String) -> String {
        "[base]\nworkload.pattern = \"uniform\"\n\(bad)\n[axes]\nworkload.seed = [1, 2]\n"
    }

    /// Bytes that are not UTF-8, each placed on line 3 of a valid sweep file: a byte never used
    /// in UTF-8, a lone continuation byte, an overlong '/', a UTF-16 surrogate, a sequence cut short.
    static let notUTF8: [[UInt8]] = [[0xFF], [0x80], [0xC0, 0xAF], [0xED, 0xA0, 0x80], [0xE2, 0x82]]

    static func bytes(line3 bad: [UInt8]) -> [UInt8] {
        Array("[base]\nworkload.pattern = \"uniform\"\n# ".utf8) + bad + Array("\n[axes]\nworkload.seed = [1, 2]\n".utf8)
    }

    func error(_ body: () throws -> SweepFile) -> String {
        do {
            let f = try body()
            return "no error (\(f.axes.count) axes)"
        } catch {
            return "\(error)"
        }
    }

    @Test("The control file (the same lines without the bad one) is accepted")
    func control() throws {
        let f = try SweepFile(text: Self.withBadLine("# fine"), path: "ok.toml")
        #expect(f.axes.map(\.key) == ["workload.seed"])
        #expect(f.base["workload.pattern"] == .string("uniform"))
        let g = try SweepFile(data: Data(Self.bytes(line3: Array("é".utf8))), path: "ok.toml")
        #expect(g.axes.first?.values == [.int(1), .int(2)])
    }

    @Test("Headers that aborted TOMLKit ([.] [=] [é] [$x] and a stray [) name the file and line", arguments: abortHeaders)
    func abortingHeaders(_ header: String) {
        // Alone: the 3-4 byte files of the issue.
        let alone = error { try SweepFile(text: header + "\n", path: "bad.toml") }
        #expect(alone.hasPrefix("bad.toml:1: "), "\(alone)")
        // On line 3 of a valid file.
        let inFile = error { try SweepFile(text: Self.withBadLine(header), path: "bad.toml") }
        #expect(inFile.hasPrefix("bad.toml:3: "), "\(inFile)")
        #expect(inFile.contains("key") || inFile.contains("header"), "says what is wrong: \(inFile)")
    }

    @Test("A NUL byte is refused with its line, not read as the end of the file")
    func nulByte() throws {
        // Everything before the NUL is a valid sweep file: a parser that stops there would accept it.
        let prefix = "[base]\nworkload.pattern = \"uniform\"\n[axes]\nworkload.seed = [1, 2]\n"
        _ = try SweepFile(text: prefix, path: "ok.toml")
        let text = prefix + "\0platform.paging = [\"native\"]\n"
        let fromText = error { try SweepFile(text: text, path: "nul.toml") }
        #expect(fromText.hasPrefix("nul.toml:5: ") && fromText.contains("NUL"), "\(fromText)")
        let fromData = error { try SweepFile(data: Data(text.utf8), path: "nul.toml") }
        #expect(fromData.hasPrefix("nul.toml:5: ") && fromData.contains("NUL"), "\(fromData)")
        // Inside a string value on line 2.
        let inString = error { try SweepFile(text: "[base]\nworkload.pattern = \"uni\0form\"\n", path: "nul.toml") }
        #expect(inString.hasPrefix("nul.toml:2: ") && inString.contains("NUL"), "\(inString)")
    }

    @Test("Bytes that are not UTF-8 are refused with their line", arguments: notUTF8)
    func invalidUTF8(_ bad: [UInt8]) {
        let e = error { try SweepFile(data: Data(Self.bytes(line3: bad)), path: "bin.toml") }
        #expect(e.hasPrefix("bin.toml:3: ") && e.contains("UTF-8"), "\(e)")
    }

    @Test("SweepFile.load reads files the same way: NUL, bad UTF-8, bad headers, directories")
    func loadFromDisk() throws {
        let dir = temporaryDirectory("malformed")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let cases: [(String, [UInt8], String)] = [
            ("nul.toml", Array("[base]\n\0".utf8), ":2: "),
            ("utf8.toml", Self.bytes(line3: [0xFF]), ":3: "),
            ("dot.toml", Array("[.]\n".utf8), ":1: "),
            ("bracket.toml", Array(Self.withBadLine("[").utf8), ":3: "),
        ]
        for (name, bytes, line) in cases {
            let path = dir + "/" + name
            try Data(bytes).write(to: URL(fileURLWithPath: path))
            let e = error { try SweepFile.load(path: path) }
            #expect(e.hasPrefix(path + line), "\(e)")
        }
        let d = error { try SweepFile.load(path: dir) }
        #expect(d.hasPrefix(dir + ": ") && d.contains("directory"), "\(d)")
        let missing = error { try SweepFile.load(path: dir + "/missing.toml") }
        #expect(missing.contains(dir + "/missing.toml"), "\(missing)")
    }

    @Test("Errors name the line of the value itself, also inside multi-line lists")
    func valueLines() {
        let dup = error { try SweepFile(text: "[axes]\nworkload.seed = [\n  1,\n  2,\n  1,\n]\n", path: "m.toml") }
        #expect(dup.hasPrefix("m.toml:5: ") && dup.contains("twice"), "\(dup)")
        let sub = error { try SweepFile(text: "[base.workload]\npattern = \"uniform\"\n\nfootprnt = \"1MiB\"\n", path: "m.toml") }
        #expect(sub.hasPrefix("m.toml:4: ") && sub.contains("workload.footprint"), "\(sub)")
        let exList = error {
            try SweepFile(text: "[axes]\nworkload.seed = [1, 2]\n[[exclude]]\nworkload.seed = [\n  1,\n  7,\n]\n", path: "m.toml")
        }
        #expect(exList.hasPrefix("m.toml:6: ") && exList.contains("not one of"), "\(exList)")
    }

    @Test("memvirt sweep plan --json on each malformed file exits 1 with an error naming file and line",
          .enabled(if: memvirtBinary != nil, "the memvirt binary is not built (swift build) and MEMVIRT_BIN is not set"))
    func cliLives() throws {
        let bin = try #require(memvirtBinary)
        let dir = temporaryDirectory("malformed-cli")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var files: [(String, [UInt8], String)] = Self.abortHeaders.enumerated().map { i, h in ("h\(i).toml", Array(Self.withBadLine(h).utf8), ":3: ") }
        files.append(("nul.toml", Array("[base]\nworkload.pattern = \"uniform\"\n\0".utf8), ":3: "))
        files.append(("utf8.toml", Self.bytes(line3: [0xC0, 0xAF]), ":3: "))
        for (name, bytes, line) in files {
            let path = dir + "/" + name
            try Data(bytes).write(to: URL(fileURLWithPath: path))
            let pid = try ChildProcess.spawn([bin, "sweep", "plan", path, "--json"], stdout: path + ".out", stderr: path + ".err")
            let status = try ChildProcess.wait(pid)
            #expect(ChildProcess.describeFailure(status) == "exit status 1", "\(name): \(ChildProcess.describeFailure(status) ?? "exit 0")")
            let out = (try? Data(contentsOf: URL(fileURLWithPath: path + ".out"))) ?? Data()
            let object = try? JSONSerialization.jsonObject(with: out) as? [String: Any]
            let message = object?["error"] as? String ?? ""
            #expect(message.hasPrefix(path + line), "\(name): \(String(decoding: out, as: UTF8.self))")
        }
    }
}
