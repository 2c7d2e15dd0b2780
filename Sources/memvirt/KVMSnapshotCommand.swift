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

    @Option(name: .long, help: "Run this long before the snapshot, e.g. 500ms, 2s, 1min.")
    var after: String = "1s"

    @Option(name: .customLong("memory-limit"), help: "Refuse when the guest would need more host memory than this, e.g. 4GiB.")
    var memoryLimit: String?

    @Option(name: .customLong("access-rate"), help: "Pace each guest thread to N accesses per second.")
    var accessRate: UInt64?

    @Flag(name: .long, help: "Print the report as JSON (schema memvirt.snapshot/1).")
    var json = false

    func run() throws {
        let spec = try workload.spec()
        if workload.pageSize != nil { throw ValidationError("--page-size: snapshots hold 4K guest pages only") }
        let after = try KVMCommand.duration(self.after, "--after")
        let limit = try memoryLimit.map { try KVMCommand.bytes($0, "--memory-limit") }
        if let r = accessRate, r == 0 { throw ValidationError("--access-rate 0: use a positive rate") }
        let r: SnapshotSaveReport
        do { r = try Snapshot.save(spec, afterNanos: after, to: file, accessesPerSecond: accessRate, memoryLimit: limit) } catch {
            throw KVMCommand.failure("memvirt kvm snapshot", error, json: json)
        }
        print(json ? r.json.rendered(pretty: true) : r.json.rendered())
        try KVMCommand.finishOutput("memvirt kvm snapshot")
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

    @Option(name: .customLong("memory-limit"), help: "Refuse when the restore would need more host memory than this, e.g. 4GiB.")
    var memoryLimit: String?

    @Flag(name: .long, help: "Print the report as JSON (schema memvirt.restore/1).")
    var json = false

    func run() throws {
        var o = RestoreOptions()
        o.lazy = lazy
        if (prefetch != nil || recordWorkingSet != nil) && !lazy { throw ValidationError("--prefetch and --record-working-set need --lazy") }
        if let r = runFor { o.runNanos = try KVMCommand.duration(r, "--run-for") }
        o.memoryLimit = try memoryLimit.map { try KVMCommand.bytes($0, "--memory-limit") }
        let r: RestoreReport
        do {
            if let p = prefetch { o.prefetch = try Snapshot.readWorkingSet(p) }
            // Opened before the restore: a bad path fails now, not after the guest ran.
            let record = try recordWorkingSet.map { (w) throws(KVMError) in try WorkingSetFile(creating: w) }
            r = try Snapshot.restore(from: file, options: o)
            try record?.write(r.touchOrder)
        } catch {
            throw KVMCommand.failure("memvirt kvm restore", error, json: json)
        }
        print(json ? r.json.rendered(pretty: true) : r.json.rendered())
        try KVMCommand.finishOutput("memvirt kvm restore")
    }
}
