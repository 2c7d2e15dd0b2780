import ArgumentParser
import Foundation
import MemVirtCore
import MemVirtKVM

/// `memvirt kvm ...`: the KVM engine.
struct KVMCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "kvm", abstract: "Real VMs on /dev/kvm.",
        subcommands: [KVMRunCommand.self, KVMProbeCommand.self, KVMListenCommand.self, KVMMigrateCommand.self,
                      KVMSnapshotCommand.self, KVMRestoreCommand.self, KVMImageCommand.self, KVMCalibrateCommand.self])
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

    func run() throws {
        if kernel.kernel != nil { return try kernel.run(json: json) }
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
        let report: KVMRunReport
        do { report = try KVMRunner.run(spec, options: o) } catch {
            printError("memvirt kvm run: \(error)")
            throw ExitCode.failure
        }
        if json {
            print(report.result.json.rendered(pretty: true))
        } else {
            printText(report)
        }
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
