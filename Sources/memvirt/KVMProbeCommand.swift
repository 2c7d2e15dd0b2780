import ArgumentParser
import Foundation
import MemVirtCore
import MemVirtKVM

/// `memvirt kvm probe`: what this host's KVM is and what its memory events cost.
struct KVMProbeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "probe", abstract: "Platform, API version, capabilities and micro-measurements of /dev/kvm.")

    @Flag(name: .long, help: "Print JSON.")
    var json = false

    @Option(name: .long, help: "Pages touched by each fault measurement.")
    var pages: Int = 4096

    func run() throws {
        guard pages >= 64, pages <= 1 << 20 else { throw ValidationError("--pages \(pages): use 64...1048576") }
        let p: KVMProbe
        do { p = try KVMProbe.run(pages: pages) } catch {
            throw KVMCommand.failure("memvirt kvm probe", error, json: json)
        }
        print(json ? p.json.rendered(pretty: true) : p.text)
        try KVMCommand.finishOutput("memvirt kvm probe")
    }
}
