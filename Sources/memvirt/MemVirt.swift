import ArgumentParser
import Foundation
import MemVirtCore

/// `memvirt`: parse arguments, call an engine or an experiment, print. No logic lives here.
@main
struct MemVirt: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "memvirt",
        abstract: "Memory virtualization made visible, measurable and real.",
        discussion: """
            Two engines over one vocabulary: the model engine (a simulator of x86-64 paging, \
            shadow and nested MMUs, host memory and migration) and the KVM engine (real VMs on \
            /dev/kvm). Counters carry KVM's stat names where KVM has the event.
            """,
        subcommands: [RunCommand.self, BenchCommand.self, ReproduceCommand.self, KVMCommand.self]
    )

    /// ArgumentParser's entry point, after registering the exit check: output `print`ed but
    /// not written (a full disk, a closed pipe) makes the process fail (issue 17 defect 9).
    static func main() {
        atexit {
            if !Output.flushAll() {
                let message = "memvirt: cannot write the output: \(String(cString: strerror(errno)))\n"
                _ = message.withCString { write(2, $0, strlen($0)) }
                _exit(1)
            }
        }
        main(nil)
    }
}

/// Prints `message` to stderr.
func printError(_ message: String) {
    FileHandle.standardError.write(Data((message + "\n").utf8))
}

/// A bad value found while running a command: ArgumentParser prints "Error: <message>" and
/// exits 1, without the usage text a `ValidationError` would add (the flags parsed fine; a
/// value did not make sense).
struct CLIError: Error, CustomStringConvertible {
    var description: String
    init(_ message: String) { description = message }
}
