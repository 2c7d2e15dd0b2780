import ArgumentParser
import Foundation
import MemVirtCore
import MemVirtKVM

/// `memvirt kvm ...`: the KVM engine.
struct KVMCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "kvm", abstract: "Real VMs on /dev/kvm.",
        subcommands: [KVMRunCommand.self, KVMProbeCommand.self, KVMListenCommand.self, KVMMigrateCommand.self,
                      KVMSnapshotCommand.self, KVMRestoreCommand.self, KVMImageCommand.self, KVMCalibrateCommand.self, KVMOpsCommand.self])

    /// A duration flag: 500ms, 2s, 250us, 1.5min, 1h (MemVirtCore's `Duration64` units).
    static func duration(_ s: String, _ flag: String) throws -> UInt64 {
        do { return try Duration64(parsing: s).rawValue } catch {
            throw ValidationError("\(flag): \(error.message)")
        }
    }

    /// A byte-count flag: 64MiB, 4GiB, 100MB.
    static func bytes(_ s: String, _ flag: String) throws -> UInt64 {
        do { return try ByteCount(parsing: s).rawValue } catch { throw ValidationError("\(flag): \(error.message)") }
    }

    /// Flushes stdout and fails when the output could not be written (a full disk, /dev/full,
    /// a closed pipe): a report that was lost is not a success.
    static func finishOutput(_ command: String) throws {
        // fflush(NULL): every stream (Swift 6 does not let us name C's global `stdout`); what is
        // left in stdout's buffer fails to write again on a device that refused the first part.
        if fflush(nil) != 0 {
            printError("\(command): cannot write the output: \(String(cString: strerror(errno)))")
            throw ExitCode.failure
        }
    }

    /// Reports a failed KVM command on stderr (and, with --json, as `{"error": ...}` on stdout)
    /// and gives the exit code.
    static func failure(_ command: String, _ error: any Error, json: Bool) -> ExitCode {
        printError("\(command): \(error)")
        if json { print(JSONValue.object([("error", .string("\(error)"))]).rendered(pretty: true)) }
        return ExitCode.failure
    }
}

/// `memvirt kvm run`: a workload in a real VM.
struct KVMRunCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run", abstract: "Run a workload in a real VM on /dev/kvm and report KVM's counters.")

    @OptionGroup var workload: WorkloadOptions

    @OptionGroup var kernel: KernelOptions

    @Flag(name: .long, help: "Print the result as JSON (schema memvirt.run/1).")
    var json = false

    @Option(name: .customLong("resident-limit"), help: "Serve guest RAM through a userfaultfd pager with at most this much resident, e.g. 16MiB.")
    var residentLimit: String?

    @Option(name: .long, help: "With the pager: pages mapped ahead of each faulting page.")
    var readahead: Int?

    @Flag(name: .long, help: "Serve guest RAM through the userfaultfd pager (implied by --resident-limit and --readahead).")
    var userfaultfd = false

    @Flag(name: .long, help: "Back guest RAM with transparent huge pages (default: 4K, MADV_NOHUGEPAGE).")
    var thp = false

    @Option(name: .customLong("dirty-log"), help: "Track the workload's dirty pages: off, bitmap, bitmap-manual or ring.")
    var dirtyLog: String = "off"

    @Flag(name: .long, help: "After the run, checksum the workload memory in the guest.")
    var verify = false

    @Flag(name: .long, help: "Mark guest RAM MADV_MERGEABLE (KSM) and report KSM's counters.")
    var mergeable = false

    @Option(name: .customLong("ksm-scans"), help: "With --mergeable: run ksmd (settings restored after) until N full scans after the workload.")
    var ksmScans = 0

    @Option(name: .customLong("max-run"), help: "Stop the guest and fail when it has not finished after this long, e.g. 30s, 2min (default: no limit for a workload, 600s for --kernel).")
    var maxRun: String?

    @Option(name: .customLong("memory-limit"), help: "Refuse the run when it would need more host memory than this, e.g. 4GiB (it is always refused beyond the host's available memory).")
    var memoryLimit: String?

    /// Flags given that only a workload run (no --kernel) uses.
    var workloadOnlyFlags: [String] {
        var f: [String] = []
        let w = workload
        if w.config != nil { f.append("--config") }
        if w.workload != nil { f.append("--workload") }
        if w.footprint != nil { f.append("--footprint") }
        if w.accesses != nil { f.append("--accesses") }
        if w.writeRatio != nil { f.append("--write-ratio") }
        if w.seed != nil { f.append("--seed") }
        if w.threads != nil { f.append("--threads") }
        if w.computePerAccess != nil { f.append("--compute-per-access") }
        if w.pageSize != nil { f.append("--page-size") }
        if residentLimit != nil { f.append("--resident-limit") }
        if readahead != nil { f.append("--readahead") }
        if userfaultfd { f.append("--userfaultfd") }
        if thp { f.append("--thp") }
        if dirtyLog != "off" { f.append("--dirty-log") }
        if verify { f.append("--verify") }
        if mergeable { f.append("--mergeable") }
        if ksmScans != 0 { f.append("--ksm-scans") }
        return f
    }

    func validate() throws {
        if kernel.kernel != nil {
            let ignored = workloadOnlyFlags
            if !ignored.isEmpty {
                throw ValidationError("--kernel boots a multiboot image whose workload comes from --append: \(ignored.joined(separator: ", ")) would be ignored; give the workload in --append (e.g. --append \"pattern=uniform footprint=64MiB\")")
            }
        } else {
            var ignored: [String] = []
            if kernel.append != nil { ignored.append("--append") }
            if kernel.memory != nil { ignored.append("--memory") }
            if !ignored.isEmpty {
                throw ValidationError("\(ignored.joined(separator: " and ")) \(ignored.count == 1 ? "applies" : "apply") to --kernel only: a workload run sizes its VM from --footprint")
            }
        }
    }

    func run() throws {
        let maxRunNanos = try maxRun.map { try KVMCommand.duration($0, "--max-run") }
        if let m = maxRunNanos, m == 0 { throw ValidationError("--max-run 0: give a positive duration") }
        let limit = try memoryLimit.map { try KVMCommand.bytes($0, "--memory-limit") }
        if kernel.kernel != nil { return try kernel.run(json: json, maxRunNanos: maxRunNanos, memoryLimit: limit) }
        let spec = try workload.spec()
        var o = KVMRunOptions()
        o.pageSize = try workload.resolvedPageSize()
        o.transparentHugePages = thp
        o.verify = verify
        o.userfaultfd = userfaultfd
        if let r = readahead {
            guard r >= 0 else { throw ValidationError("--readahead \(r): must be 0 or more pages") }
            o.readAhead = r
        }
        if let l = residentLimit {
            do { o.residentLimit = try ByteCount(parsing: l).rawValue } catch { throw ValidationError("--resident-limit: \(error.message)") }
            guard o.residentLimit! >= 4096 else { throw ValidationError("--resident-limit \(l): at least 4KiB") }
        }
        guard let mode = DirtyLogMode(rawValue: dirtyLog) else {
            throw ValidationError("--dirty-log '\(dirtyLog)': use off, bitmap, bitmap-manual or ring")
        }
        o.dirtyLog = mode
        o.mergeable = mergeable
        o.ksmScans = ksmScans
        o.maxRunNanos = maxRunNanos
        o.memoryLimit = limit
        let report: KVMRunReport
        do { report = try KVMRunner.run(spec, options: o) } catch {
            throw KVMCommand.failure("memvirt kvm run", error, json: json)
        }
        if json {
            print(report.result.json.rendered(pretty: true))
        } else {
            printText(report)
        }
        try KVMCommand.finishOutput("memvirt kvm run")
    }

    func printText(_ r: KVMRunReport) {
        let res = r.result
        print("engine kvm (\(res.paging) paging), \(res.workload.pattern), footprint \(res.workload.footprint), \(formatGrouped(res.workload.accesses)) accesses x \(res.workload.threads)")
        print("wall \(formatFixed(res.wallSeconds, digits: 3)) s")
        for (c, v) in res.counters.reported {
            var line = "  " + c.name.padding(toLength: 26, withPad: " ", startingAt: 0) + formatGrouped(v).leftPad(14)
            if res.wallSeconds > 0 && v > 0 { line += "  " + formatGrouped(UInt64(Double(v) / res.wallSeconds)).leftPad(14) + "/s" }
            print(line)
        }
        for g in r.guests {
            print("guest: read_sum \(g.readSum)" + (g.memoryChecksum.map { ", memory_checksum \($0)" } ?? ""))
        }
        if let p = r.pager { print("pager: \(p.json.rendered())") }
        if let d = r.dirty { print("dirty log: \(d.json.rendered())") }
        if let k = r.ksm { print("ksm: \(k.rendered())") }
    }
}

extension String {
    func leftPad(_ n: Int) -> String { count >= n ? self : String(repeating: " ", count: n - count) + self }
}
