import ArgumentParser
import Foundation
import MemVirtConfig
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
        subcommands: [RunCommand.self, BenchCommand.self, ReproduceCommand.self, ValidateCommand.self, ReportCommand.self, ProfileCommand.self, SweepCommand.self, KVMCommand.self]
    )

    /// ArgumentParser's main, except that with `--json` a failure that reaches here (a bad flag,
    /// a value a command refused) prints `{"error": ...}` on stdout instead of text on stderr.
    /// `ExitCode`s pass through: the command has reported already.
    /// Output `print`ed but not written (a full disk, a closed pipe) makes the process fail
    /// (issue 17 defect 9): checked at exit.
    static func main() {
        atexit {
            if !Output.flushAll() {
                let message = "memvirt: cannot write the output: \(String(cString: strerror(errno)))\n"
                _ = message.withCString { write(2, $0, strlen($0)) }
                _exit(1)
            }
        }
        let json = CommandLine.arguments.dropFirst().contains("--json")
        do {
            var command = try parseAsRoot()
            try command.run()
        } catch {
            let code = exitCode(for: error)
            if json && code != .success && !(error is ExitCode) {
                print(JSONValue.object([("error", .string(message(for: error)))]).rendered())
                Foundation.exit(code.rawValue)
            }
            exit(withError: error)
        }
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

/// The message of any error a command reports.
func errorMessage(_ error: any Error) -> String {
    switch error {
    case let e as CLIError: e.description
    case let e as InputError: e.message
    case let e as ConfigError: e.description
    case let e as ProfileError: e.message
    default: String(describing: error)
    }
}

/// The one error style of MemVirt's commands: a failure is `Error: MESSAGE` on stderr and exit
/// status 1 (through ArgumentParser), or with `--json` one object `{"error": MESSAGE}` on stdout
/// and exit status 1. `ExitCode`s thrown by `body` pass through unchanged.
func reportingErrors(json: Bool, _ body: () throws -> Void) throws {
    do {
        try body()
    } catch let e as ExitCode {
        throw e
    } catch {
        guard json else { throw error is CLIError ? error : CLIError(errorMessage(error)) }
        print(JSONValue.object([("error", .string(errorMessage(error)))]).rendered())
        throw ExitCode.failure
    }
}
