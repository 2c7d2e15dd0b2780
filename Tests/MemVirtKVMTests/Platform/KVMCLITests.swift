import Foundation
import MemVirtCore
import Testing
@testable import MemVirtKVM

/// The `memvirt` binary of this build (`swift build --build-tests` builds it next to the tests).
let memvirtBinary: String? = {
    let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().deletingLastPathComponent()
    for config in ["debug", "release"] {
        let p = root.appendingPathComponent(".build/\(config)/memvirt").path
        if FileManager.default.isExecutableFile(atPath: p) { return p }
    }
    return nil
}()
let memvirtReason = "needs the memvirt binary in .build/debug (swift build --build-tests builds it)"

/// Runs memvirt with `args`: exit status, stdout, stderr, seconds.
func memvirt(_ args: [String], stdoutTo file: String? = nil) throws -> (status: Int32, out: String, err: String, seconds: Double) {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: memvirtBinary!)
    p.arguments = args
    let out = Pipe(), err = Pipe()
    p.standardOutput = file.map { FileHandle(forWritingAtPath: $0)! as Any } ?? out
    p.standardError = err
    let t0 = Date()
    try p.run()
    if file != nil { try out.fileHandleForWriting.close() }
    let o = out.fileHandleForReading.readDataToEndOfFile()
    let e = err.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    return (p.terminationStatus, String(decoding: o, as: UTF8.self), String(decoding: e, as: UTF8.self), Date().timeIntervalSince(t0))
}

@Suite("memvirt kvm: flags an engine would ignore, and bad values, are refused", .enabled(if: memvirtBinary != nil, Comment(rawValue: memvirtReason)))
struct KVMCLIRefusalTests {
    @Test("kvm run --kernel refuses workload, pager, dirty-log and --config flags", arguments: [
        ["--footprint", "4MiB"], ["--workload", "uniform"], ["--config", "/dev/null"], ["--resident-limit", "16MiB"],
        ["--dirty-log", "ring"], ["--threads", "2"], ["--page-size", "2M"], ["--mergeable"],
    ])
    func kernelIgnores(flag: [String]) throws {
        let r = try memvirt(["kvm", "run", "--kernel", "/nonexistent.elf"] + flag)
        #expect(r.status != 0)
        #expect(r.err.contains("\(flag[0]) would be ignored"), "\(r.err)")
    }

    @Test("kvm run without --kernel refuses --append and --memory")
    func workloadIgnores() throws {
        let a = try memvirt(["kvm", "run", "--append", "pattern=uniform"])
        #expect(a.status != 0 && a.err.contains("--append applies to --kernel only"), "\(a.err)")
        let m = try memvirt(["kvm", "run", "--memory", "256MiB", "--append", "x"])
        #expect(m.status != 0 && m.err.contains("--append and --memory apply to --kernel only"), "\(m.err)")
    }

    @Test("durations take every unit of MemVirtCore (1min) and bad ones say which units exist")
    func durations() throws {
        let bad = try memvirt(["kvm", "snapshot", "--file", "/tmp/x", "--after", "1fortnight"])
        #expect(bad.status != 0 && bad.err.contains("--after: '1fortnight': unknown time unit"), "\(bad.err)")
        let maxRun = try memvirt(["kvm", "run", "--max-run", "0s"])
        #expect(maxRun.status != 0 && maxRun.err.contains("--max-run 0"), "\(maxRun.err)")
    }

    @Test("reproduce --vcpus is checked against the KVM engine's 1...8 and refused where it is ignored")
    func vcpus() throws {
        let nine = try memvirt(["reproduce", "apf", "--engine", "kvm", "--vcpus", "9"])
        #expect(nine.status != 0 && nine.err.contains("--vcpus 9: the KVM engine runs 1...\(GuestLayout.maxVCPUs) vCPUs"), "\(nine.err)")
        let model = try memvirt(["reproduce", "apf", "--engine", "model", "--vcpus", "2"])
        #expect(model.status != 0 && model.err.contains("--vcpus applies to `apf --engine kvm` only"), "\(model.err)")
    }

    @Test("kvm image reports a failed write (/dev/full, a directory)")
    func imageWriteErrors() throws {
        let full = try memvirt(["kvm", "image", "--out", "/dev/full"])
        #expect(full.status != 0 && full.err.contains("No space left on device"), "\(full.err)")
        let dir = try memvirt(["kvm", "image", "--out", "/tmp"])
        #expect(dir.status != 0 && dir.err.contains("Is a directory"), "\(dir.err)")
    }
}

@Suite("memvirt kvm on /dev/kvm: snapshot and restore from the command line", .serialized,
       .enabled(if: memvirtBinary != nil && KVM.isUsable, Comment(rawValue: memvirtReason + "; " + kvmReason)))
struct KVMCLISnapshotTests {
    @Test("kvm snapshot --after 1min of a short workload returns when it finishes; restore --run-for 10ms of it returns")
    func afterMinutes() throws {
        let path = temporaryPath("cli-snap")
        defer { unlink(path) }
        let s = try memvirt(["kvm", "snapshot", "--workload", "sequential", "--footprint", "4MiB", "--accesses", "10000",
                             "--write-ratio", "1", "--after", "1min", "--file", path])
        #expect(s.status == 0, "\(s.err)")
        #expect(s.seconds < 30)
        let r = try memvirt(["kvm", "restore", "--file", path, "--lazy", "--run-for", "10ms"])
        #expect(r.status == 0, "\(r.err)")
        #expect(r.out.contains("\"finished\":true"), "\(r.out)")
    }

    @Test("a report that cannot be written (stdout on /dev/full) is a failure")
    func outputErrors() throws {
        let r = try memvirt(["kvm", "run", "--workload", "uniform", "--footprint", "4MiB", "--accesses", "1000", "--json"], stdoutTo: "/dev/full")
        #expect(r.status != 0 && r.err.contains("cannot write the output: No space left on device"), "\(r.err)")
        let ok = try memvirt(["kvm", "run", "--workload", "uniform", "--footprint", "4MiB", "--accesses", "1000", "--json"])
        #expect(ok.status == 0 && ok.out.contains("\"engine\""), "\(ok.err)")
    }

    @Test("restore --record-working-set to a bad path fails before the guest runs; --json failures print an error object")
    func recordPathUpFront() throws {
        let path = temporaryPath("cli-long")
        defer { unlink(path) }
        // A guest that never finishes on its own.
        let s = try memvirt(["kvm", "snapshot", "--workload", "uniform", "--footprint", "8MiB", "--accesses", "1000000000000",
                             "--after", "200ms", "--file", path])
        #expect(s.status == 0, "\(s.err)")
        let r = try memvirt(["kvm", "restore", "--file", path, "--lazy", "--record-working-set", "/nonexistent-dir/ws",
                             "--run-for", "20s", "--json"])
        #expect(r.status != 0)
        #expect(r.err.contains("/nonexistent-dir/ws"), "\(r.err)")
        #expect(r.seconds < 10, "took \(r.seconds) s: the guest ran first")
        #expect(r.out.contains("\"error\""), "\(r.out)")
    }
}
