import ArgumentParser
import Foundation
import MemVirtCore
import MemVirtKVM

/// `memvirt kvm snapshot`: run a workload, stop it, write memory and vCPU state to a file.
struct KVMSnapshotCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "snapshot",
        abstract: "Run a workload in a VM for a while, then write a snapshot (guest memory and full vCPU state) to a file.")

    @OptionGroup var workload: WorkloadOptions

    @Option(name: .long, help: "The snapshot file to write (written as FILE.partial, renamed when complete).")
    var file: String

    @Option(name: .long, help: "Run this long before the snapshot, e.g. 500ms, 2s.")
    var after: String = "1s"

    @Option(name: .customLong("access-rate"), help: "Pace each guest thread to N accesses per second.")
    var accessRate: UInt64?

    @Flag(name: .long, help: "Print the report as JSON (schema memvirt.snapshot/1).")
    var json = false

    func run() throws {
        let spec = try workload.spec()
        let after = try KVMMigrateCommand.duration(self.after, "--after")
        if let r = accessRate, r == 0 { throw ValidationError("--access-rate 0: use a positive rate") }
        let r: SnapshotSaveReport
        do { r = try Snapshot.save(spec, afterNanos: after, to: file, accessesPerSecond: accessRate) } catch {
            printError("memvirt kvm snapshot: \(error)")
            throw ExitCode.failure
        }
        print(json ? r.json.rendered(pretty: true) : r.json.rendered())
    }
}

/// `memvirt kvm restore`: a snapshot back into a new VM, eagerly or lazily, and run it.
struct KVMRestoreCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "restore",
        abstract: "Restore a snapshot into a new VM (eagerly, or lazily through userfaultfd) and run the guest to the end of its workload.")

    @Option(name: .long, help: "The snapshot file (from `memvirt kvm snapshot`).")
    var file: String

    @Flag(name: .long, help: "Map guest memory on first touch through userfaultfd (default: read it all first).")
    var lazy = false

    @Option(name: .long, help: "With --lazy: a working-set file (from --record-working-set) to copy in while the guest starts.")
    var prefetch: String?

    @Option(name: .customLong("record-working-set"), help: "With --lazy: write the pages the guest touched, in order, to this file.")
    var recordWorkingSet: String?

    @Option(name: .customLong("run-for"), help: "Stop the guest after this long, e.g. 200ms (default: run to the end).")
    var runFor: String?

    @Flag(name: .long, help: "Print the report as JSON (schema memvirt.restore/1).")
    var json = false

    func run() throws {
        var o = RestoreOptions()
        o.lazy = lazy
        if (prefetch != nil || recordWorkingSet != nil) && !lazy { throw ValidationError("--prefetch and --record-working-set need --lazy") }
        if let r = runFor { o.runNanos = try KVMMigrateCommand.duration(r, "--run-for") }
        let r: RestoreReport
        do {
            if let p = prefetch { o.prefetch = try Snapshot.readWorkingSet(p) }
            r = try Snapshot.restore(from: file, options: o)
            if let w = recordWorkingSet { try Snapshot.writeWorkingSet(r.touchOrder, to: w) }
        } catch {
            printError("memvirt kvm restore: \(error)")
            throw ExitCode.failure
        }
        print(json ? r.json.rendered(pretty: true) : r.json.rendered())
    }
}
