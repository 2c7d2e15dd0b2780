import ArgumentParser
import Foundation
import MemVirtCore
import TOMLKit

/// The workload flags that `memvirt run` and `memvirt kvm run` share, and the TOML scenario
/// file that can set them (flags given on the command line win over the file).
///
/// A scenario file:
///
///     [workload]
///     pattern = "zipf:0.99"     # uniform|sequential|strided[:STRIDE]|zipf[:THETA]|chase|gups|lackey:PATH
///     footprint = "64MiB"
///     accesses = "2M"
///     write_ratio = 0.3
///     seed = 1
///     threads = 1
///     compute_per_access = 0
///
///     [platform]
///     paging = "native"         # native|shadow|nested
///     page_size = "4K"
struct WorkloadOptions: ParsableArguments {
    @Option(name: .long, help: "A TOML scenario file; flags given here override it.")
    var config: String?

    @Option(name: .long, help: "uniform|sequential|strided[:STRIDE]|zipf[:THETA]|chase|gups|lackey:PATH")
    var workload: String?

    @Option(name: .long, help: "Memory the workload spreads over, e.g. 64MiB, 1GiB, 100MB.")
    var footprint: String?

    @Option(name: .long, help: "Accesses per thread, e.g. 2M (decimal: 2,000,000), 500K, 10000.")
    var accesses: String?

    @Option(name: .customLong("write-ratio"), help: "Fraction of accesses that write, 0...1.")
    var writeRatio: Double?

    @Option(name: .long, help: "Seed of the SplitMix64 stream (same seed, same addresses, both engines).")
    var seed: UInt64?

    @Option(name: .long, help: "Threads, each with its own stream over the same memory.")
    var threads: Int?

    @Option(name: .customLong("compute-per-access"), help: "Cycles of compute between accesses.")
    var computePerAccess: UInt64?

    @Option(name: .customLong("page-size"), help: "Guest page size backing the workload: 4K, 2M or 1G.")
    var pageSize: String?

    /// The TOML scenario, read once.
    func scenario() throws -> TOMLTable? {
        guard let path = config else { return nil }
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else {
            throw CLIError("cannot read scenario file '\(path)'")
        }
        do {
            return try TOMLTable(string: text)
        } catch let e as TOMLParseError {
            throw CLIError("\(path):\(e.source.begin.line):\(e.source.begin.column): \(e.description)")
        } catch {
            throw CLIError("\(path): \(error)")
        }
    }

    /// A string value from the scenario's `[section] key`, accepting numbers too.
    static func value(_ table: TOMLTable?, _ section: String, _ key: String, file: String?) throws -> String? {
        guard let t = table, let sec = t[section] else { return nil }
        guard let st = sec.table else { throw CLIError("\(file ?? "scenario"): [\(section)] must be a table") }
        guard let v = st[key] else { return nil }
        if let s = v.string { return s }
        if let i = v.int { return String(i) }
        if let d = v.double { return String(d) }
        throw CLIError("\(file ?? "scenario"): [\(section)] \(key) has an unsupported type")
    }

    func spec() throws -> WorkloadSpec {
        let t = try scenario()
        func pick(_ flag: String?, _ key: String) throws -> String? {
            if let f = flag { return f }
            return try Self.value(t, "workload", key, file: config)
        }
        var s = WorkloadSpec()
        do {
            if let w = try pick(workload, "pattern") { s.pattern = try WorkloadSpec.Pattern(parsing: w) }
            if let f = try pick(footprint, "footprint") { s.footprint = try ByteCount(parsing: f) }
            if let a = try pick(accesses, "accesses") { s.accesses = try parseCount(a) }
            if let w = try pick(writeRatio.map { String($0) }, "write_ratio") {
                guard let v = Double(w) else { throw InputError("write ratio '\(w)' is not a number") }
                s.writeRatio = v
            }
            if let v = try pick(seed.map { String($0) }, "seed") {
                guard let n = UInt64(v) else { throw InputError("seed '\(v)' is not a whole number") }
                s.seed = n
            }
            if let v = try pick(threads.map { String($0) }, "threads") {
                guard let n = Int(v) else { throw InputError("threads '\(v)' is not a whole number") }
                s.threads = n
            }
            if let v = try pick(computePerAccess.map { String($0) }, "compute_per_access") {
                s.computePerAccess = try parseCount(v)
            }
            try s.validate()
        } catch let e as InputError {
            throw CLIError(e.message)
        }
        return s
    }

    func resolvedPageSize() throws -> PageSize {
        let text = try pageSize ?? Self.value(try scenario(), "platform", "page_size", file: config) ?? "4K"
        guard let p = PageSize(parsing: text) else { throw CLIError("page size '\(text)': use 4K, 2M or 1G") }
        return p
    }

    /// `[platform] key` from the scenario, when no flag gave it.
    func platformValue(_ key: String) throws -> String? {
        try Self.value(try scenario(), "platform", key, file: config)
    }
}
