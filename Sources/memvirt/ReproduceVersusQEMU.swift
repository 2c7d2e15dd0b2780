import ArgumentParser
import Foundation
import MemVirtCore
import MemVirtExperiments
import MemVirtKVM
import MemVirtReport

extension ReproduceCommand {
    /// `reproduce migration --engine kvm --vs-qemu`.
    func runVersusQEMU() throws {
        guard name == "migration", engine == "kvm" || engine == nil else {
            throw CLIError("--vs-qemu goes with `reproduce migration --engine kvm`")
        }
        if let why = KVM.unavailableReason {
            printError("migration --vs-qemu: skipped (\(why))")
            if json { print(JSONValue.object([("schema", "memvirt.reproduce/1"), ("name", .string(QEMUComparison.name)), ("skipped", .string(why))]).rendered()) }
            return
        }
        let showProgress = !quiet
        let line = ProgressLine(total: 1)
        if showProgress { line.begin(1, QEMUComparison.name) }
        let report = try QEMUComparison(quick: quick).run { msg in
            if showProgress { line.update(msg) }
        }
        if showProgress { line.end(); line.clear() }
        print(json ? report.savedJSON.rendered() : report.text)
    }
}
