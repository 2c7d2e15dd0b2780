import ArgumentParser
import Foundation
import MemVirtCore
import MemVirtKVM

/// `memvirt kvm ops NAME`: a named guest op script on a guest that edits its own page tables.
struct KVMOpsCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ops",
        abstract: "Run a named guest op script (a guest editing its own page tables) on /dev/kvm and report the guest's counts and KVM's counters.",
        discussion: "Scripts: \(GuestOpScript.names.joined(separator: ", ")). docs/guest-ops.md describes them.")

    @Argument(help: "The script: \(GuestOpScript.names.joined(separator: ", ")).")
    var name: String

    @Flag(name: .long, help: "The quick size (about a second).")
    var quick = false

    @Option(name: .long, help: "Seed of the uniform touches.")
    var seed: UInt64 = 1

    @Option(name: .long, help: "Pages flushed one INVLPG each at most; more take a CR3 reload (Linux's tlb_single_page_flush_ceiling).")
    var ceiling: Int = 33

    @Flag(name: .long, help: "Print JSON.")
    var json = false

    func run() throws {
        guard let script = GuestOpScript.named(name, quick: quick, seed: seed) else {
            throw KVMCommand.failure("memvirt kvm ops", ValidationError("unknown script '\(name)'; use one of \(GuestOpScript.names.joined(separator: ", "))"), json: json)
        }
        var o = GuestOpsOptions()
        o.singlePageFlushCeiling = ceiling
        let r: GuestOpsResult
        do { r = try GuestOpsRunner.run(script, options: o) } catch {
            throw KVMCommand.failure("memvirt kvm ops", error, json: json)
        }
        if json {
            var fields: [(String, JSONValue)] = [("script", .string(name)), ("quick", .bool(quick))]
            if case .object(let rest) = r.json { fields += rest }
            print(JSONValue.object(fields).rendered(pretty: true))
        } else {
            print("\(name)\(quick ? " (quick)" : ""): " + r.text, terminator: "")
        }
        try KVMCommand.finishOutput("memvirt kvm ops")
    }
}
