import ArgumentParser
import Foundation
import MemVirtCore
import MemVirtKVM

/// `memvirt kvm listen`: the destination of one live migration.
struct KVMListenCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "listen", abstract: "Accept one live migration, run the guest to the end of its workload, report, exit.")

    @Option(name: .long, help: "TCP port to listen on (0: any; the bound port is printed on stderr).")
    var port: UInt16

    @Option(name: .long, help: "Address to bind (default loopback only).")
    var bind: String = "127.0.0.1"

    @Flag(name: .long, help: "Print the report as JSON.")
    var json = false

    func run() throws {
        let r: MigrationReport
        do {
            r = try LiveMigration.listen(address: bind, port: port) { p in printError("memvirt kvm listen: listening on \(bind):\(p)") }
        } catch {
            printError("memvirt kvm listen: \(error)")
            throw ExitCode.failure
        }
        print(json ? r.json.rendered(pretty: true) : r.json.rendered())
    }
}

/// `memvirt kvm migrate`: run a workload, then migrate it live to a listener.
struct KVMMigrateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "migrate", abstract: "Run a workload in a VM and migrate it live to `memvirt kvm listen` over TCP.")

    @OptionGroup var workload: WorkloadOptions

    @OptionGroup var kernel: KernelOptions

    @Option(name: .long, help: "HOST:PORT of the listener.")
    var to: String

    @Option(name: .long, help: "Run this long before migrating, e.g. 500ms, 2s.")
    var after: String = "1s"

    @Option(name: .long, help: "precopy, postcopy or hybrid.")
    var mode: String = "precopy"

    @Option(name: .long, help: "Bytes per second to send at most, e.g. 100MiB (default: no limit).")
    var bandwidth: String?

    @Option(name: .customLong("downtime-target"), help: "Pre-copy stops iterating when the rest fits in this, e.g. 30ms.")
    var downtimeTarget: String = "30ms"

    @Option(name: .customLong("max-rounds"), help: "Most pre-copy rounds.")
    var maxRounds: Int = 30

    @Option(name: .customLong("group-pages"), help: "Page groups (seed 004): N pages sent and left writable together (power of two).")
    var groupPages: Int = 1

    @Option(name: .customLong("access-rate"), help: "Pace each guest thread to N accesses per second (a uniform writer with --write-ratio 1 at 2560 dirties 10 MiB/s).")
    var accessRate: UInt64?

    @Option(name: .customLong("request-round-trip"), help: "Post-copy: serve each page the destination asks for this long after its request (a link longer than loopback), e.g. 2ms.")
    var requestRoundTrip: String?

    @Flag(name: .customLong("guest-kernel"), help: "Run the guest under the guest kernel: per vCPU the workload thread and a counting thread sharing it by the guest timer; the schedulers migrate with the vCPUs.")
    var guestKernel = false

    @Flag(name: .customLong("async-pf"), help: "With --guest-kernel: async page faults on both sides (in post-copy the faulting thread waits parked while its page comes, the counting thread runs).")
    var asyncPF = false

    @Flag(name: .long, help: "Print the report as JSON.")
    var json = false

    static func duration(_ s: String, _ flag: String) throws -> UInt64 {
        let units: [(String, Double)] = [("ms", 1e6), ("us", 1e3), ("ns", 1), ("s", 1e9)]
        for (u, f) in units where s.hasSuffix(u) {
            if let v = Double(s.dropLast(u.count)), v >= 0, v < 1e6 { return UInt64(v * f) }
        }
        throw ValidationError("\(flag) '\(s)': a duration like 500ms, 2s, 250us")
    }

    func run() throws {
        let spec = try workload.spec()
        guard let colon = to.lastIndex(of: ":"), let port = UInt16(to[to.index(after: colon)...]) else {
            throw ValidationError("--to '\(to)': use HOST:PORT")
        }
        var host = String(to[..<colon])
        if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        var o = MigrationOptions()
        guard let m = MigrationOptions.Mode(rawValue: mode) else { throw ValidationError("--mode '\(mode)': use precopy, postcopy or hybrid") }
        o.mode = m
        o.afterNanos = try Self.duration(after, "--after")
        o.downtimeTargetNanos = try Self.duration(downtimeTarget, "--downtime-target")
        o.maxRounds = maxRounds
        o.groupPages = groupPages
        o.accessesPerSecond = accessRate
        if asyncPF && !guestKernel { throw ValidationError("--async-pf needs --guest-kernel (a guest kernel parks and wakes the threads)") }
        if guestKernel && kernel.kernel != nil { throw ValidationError("--guest-kernel runs MemVirt's own runtime: not with --kernel") }
        if let r = requestRoundTrip { o.requestRoundTripNanos = try Self.duration(r, "--request-round-trip") }
        o.guestKernel = guestKernel
        o.asyncPF = asyncPF
        if let b = bandwidth {
            do { o.bandwidth = try ByteCount(parsing: b).rawValue } catch { throw ValidationError("--bandwidth: \(error.message)") }
        }
        let r: MigrationReport
        do {
            if let k = kernel.kernel {
                r = try LiveMigration.migrate(kernel: try Multiboot.read(path: k), memory: try kernel.memoryBytes(), cmdline: kernel.cmdline(k),
                                              to: host, port: port, options: o)
            } else {
                r = try LiveMigration.migrate(spec, to: host, port: port, options: o)
            }
        } catch {
            printError("memvirt kvm migrate: \(error)")
            throw ExitCode.failure
        }
        print(json ? r.json.rendered(pretty: true) : r.json.rendered())
        if !r.migrated { throw ExitCode.failure }
    }
}
