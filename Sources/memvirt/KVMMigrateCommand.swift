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

    @Option(name: .long, help: "Address to bind (default loopback only; another address needs --key-file or --insecure).")
    var bind: String = "127.0.0.1"

    @OptionGroup var link: MigrationLinkOptions

    @Flag(name: .long, help: "Allow --bind of a non-loopback address without --key-file (anyone who reaches the port can forge or replay a guest).")
    var insecure = false

    @Flag(name: .long, help: "Print the report as JSON.")
    var json = false

    func run() throws {
        let r: MigrationReport
        do {
            let l = try link.link()
            r = try LiveMigration.listen(address: bind, port: port, link: l, insecure: insecure) { p in printError("memvirt kvm listen: listening on \(bind):\(p)") }
        } catch {
            printError("memvirt kvm listen: \(error)")
            if json { print(JSONValue.object([("side", "destination"), ("migrated", .bool(false)), ("error", .string("\(error)"))]).rendered(pretty: true)) }
            throw ExitCode.failure
        }
        print(json ? r.json.rendered(pretty: true) : r.json.rendered())
        if !r.migrated || r.error != nil { throw ExitCode.failure }
    }
}

/// `--timeout` and `--key-file`, the same on both sides of a migration.
struct MigrationLinkOptions: ParsableArguments {
    @Option(name: .long, help: "Fail when the peer sends or takes nothing this long, or a connect takes longer, e.g. 30s, 500ms.")
    var timeout: String = "30s"

    @Option(name: .customLong("key-file"), help: "Pre-shared key (16 to 4096 bytes): every message is authenticated with HMAC-SHA256 and a per-session nonce. Give both sides the same file.")
    var keyFile: String?

    func link() throws -> MigrationLink {
        var l = MigrationLink()
        l.timeoutNanos = try KVMMigrateCommand.duration(timeout, "--timeout")
        guard l.timeoutNanos >= 1_000_000, l.timeoutNanos <= MigrationLink.maxTimeoutNanos else {
            throw ValidationError("--timeout '\(timeout)': use 1ms to 86400s")
        }
        if let k = keyFile { l.key = try MigrationLink.readKey(path: k) }
        return l
    }
}

/// `memvirt kvm migrate`: run a workload, then migrate it live to a listener.
struct KVMMigrateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "migrate", abstract: "Run a workload in a VM and migrate it live to `memvirt kvm listen` over TCP.")

    @OptionGroup var workload: WorkloadOptions

    @OptionGroup var kernel: KernelOptions

    @OptionGroup var link: MigrationLinkOptions

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

    @Option(name: .long, help: "Try again this many times (0...10) when a migration fails before the switch (the guest goes on here meanwhile).")
    var retries: Int = 0

    @Option(name: .customLong("retry-delay"), help: "Wait this long before trying again, e.g. 1s.")
    var retryDelay: String = "1s"

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
        o.link = try link.link()
        guard (0...10).contains(retries) else { throw ValidationError("--retries \(retries): use 0...10") }
        o.retries = retries
        o.retryDelayNanos = try Self.duration(retryDelay, "--retry-delay")
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
            if json { print(JSONValue.object([("side", "source"), ("migrated", .bool(false)), ("error", .string("\(error)"))]).rendered(pretty: true)) }
            throw ExitCode.failure
        }
        print(json ? r.json.rendered(pretty: true) : r.json.rendered())
        // Not migrated (the guest finished here), lost after the switch, or hashes that
        // differ: each is a failure.
        if !r.migrated || r.error != nil { throw ExitCode.failure }
    }
}
