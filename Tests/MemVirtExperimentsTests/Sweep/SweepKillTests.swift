import Foundation
import MemVirtCore
import MemVirtReport
import MemVirtExperiments
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The memvirt binary next to the test bundle's package (.build/debug or release), or
/// $MEMVIRT_BIN.
let memvirtBinary: String? = {
    if let b = ProcessInfo.processInfo.environment["MEMVIRT_BIN"], access(b, X_OK) == 0 { return b }
    let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().deletingLastPathComponent().path
    for c in ["debug", "release"] {
        let b = "\(root)/.build/\(c)/memvirt"
        if access(b, X_OK) == 0 { return b }
    }
    return nil
}()

@Suite("memvirt sweep local, killed and rerun", .serialized,
       .enabled(if: memvirtBinary != nil, "the memvirt binary is not built (swift build) and MEMVIRT_BIN is not set"))
struct SweepKillTests {
    static let text = """
        [base]
        workload.pattern = "uniform"
        workload.accesses = "200K"
        workload.footprint = "4MiB"
        [axes]
        platform.paging = ["native", "nested"]
        workload.seed = [1, 2, 3, 4, 5, 6, 7, 8]
        """

    @Test("Killing a local sweep half-way and running it again: every point present, none run twice, results untouched")
    func killAndResume() throws {
        let bin = try #require(memvirtBinary)
        let dir = temporaryDirectory("kill")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let file = dir + "/sweep.toml"
        try Self.text.write(toFile: file, atomically: true, encoding: .utf8)
        let out = dir + "/results"
        let plan = try SweepPlan(file: SweepFile(text: Self.text, path: file))
        let argv = [bin, "sweep", "local", file, "--out", out, "--jobs", "2"]
        func results() -> [String] {
            ((try? FileManager.default.contentsOfDirectory(atPath: out)) ?? []).filter { $0.hasSuffix(".json") }
        }
        // First run, in its own process group; killed (SIGKILL, the whole group) after 3 results.
        let pid = try ChildProcess.spawn(argv, stdout: dir + "/1.out", stderr: dir + "/1.err", newProcessGroup: true)
        let deadline = Date().addingTimeInterval(240)
        while results().count < 3 && Date() < deadline { usleep(20_000) }
        kill(-pid, SIGKILL)
        let status = try ChildProcess.wait(pid)
        #expect(ChildProcess.describeFailure(status) == "killed by signal 9")
        usleep(200_000)  // the group's children die with it
        let before = results()
        #expect(before.count >= 3 && before.count < plan.points.count, "killed after \(before.count) of \(plan.points.count) points")
        // What is there is whole.
        var inodes: [String: UInt64] = [:]
        for name in before {
            let v = try JSONReader.parse(try String(contentsOfFile: "\(out)/\(name)", encoding: .utf8))
            #expect(v["result"]?["counters"]?["accesses"]?.asDouble == 200_000)
            inodes[name] = try FileManager.default.attributesOfItem(atPath: "\(out)/\(name)")[.systemFileNumber] as? UInt64
        }
        // The same command again runs to the end.
        let again = try ChildProcess.spawn(argv, stdout: dir + "/2.out", stderr: dir + "/2.err")
        #expect(try ChildProcess.wait(again) == 0, "\((try? String(contentsOfFile: dir + "/2.err", encoding: .utf8)) ?? "")")
        let summary = try String(contentsOfFile: dir + "/2.out", encoding: .utf8)
        #expect(summary.contains("\(before.count) already present"), "\(summary)")
        #expect(Set(results()) == Set(plan.points.map { "\($0.id).json" }))
        for (name, inode) in inodes {
            #expect(try FileManager.default.attributesOfItem(atPath: "\(out)/\(name)")[.systemFileNumber] as? UInt64 == inode)
        }
        // runs.log: every point finished exactly once over both runs.
        let done = lines(out + "/runs.log").filter { $0.hasPrefix("done ") }.map { String($0.split(separator: " ")[1]) }
        #expect(done.sorted() == plan.points.map(\.id).sorted(), "\(done)")
        let status2 = SweepStatus(plan: plan, out: out)
        #expect(status2.done.count == plan.points.count && status2.failed.isEmpty && status2.missing.isEmpty)
    }
}
