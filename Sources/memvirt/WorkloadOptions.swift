import ArgumentParser
import Foundation
import MemVirtConfig
import MemVirtCore

/// The workload flags that `memvirt run` and `memvirt kvm run` share, and the TOML scenario
/// file that can set them (flags given on the command line win over the file). The file's
/// format and its strict decoding live in `MemVirtConfig.Scenario`.
struct WorkloadOptions: ParsableArguments {
    @Option(name: .long, help: "A TOML scenario file ([workload] and [platform]); flags given here override it.")
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

    /// The scenario file, read and decoded once per command however often its steps ask (nil
    /// without --config).
    func loadScenario() throws -> Scenario? {
        guard let path = config else { return nil }
        return try ScenarioCache.shared.scenario(path)
    }

    var overrides: WorkloadOverrides {
        WorkloadOverrides(pattern: workload, footprint: footprint, accesses: accesses, writeRatio: writeRatio, seed: seed,
                          threads: threads, computePerAccess: computePerAccess)
    }

    func spec(_ scenario: Scenario?) throws -> WorkloadSpec {
        do { return try Scenario.workload(scenario, overrides: overrides) } catch { throw CLIError(error.message) }
    }

    func pageSize(_ scenario: Scenario?) throws -> PageSize {
        if let text = pageSize {
            guard let p = PageSize(parsing: text) else { throw CLIError("--page-size '\(text)': use 4K, 2M or 1G") }
            return p
        }
        return scenario?.pageSize ?? .size4K
    }

    /// The KVM engine's workload (`kvm run`, `kvm migrate`, `kvm snapshot`): [platform] keys
    /// other than page_size are refused (the file is read once per call).
    func spec() throws -> WorkloadSpec {
        let s = try loadScenario()
        do { try s?.checkForKVMEngine() } catch { throw CLIError(error.description) }
        return try spec(s)
    }

    func resolvedPageSize() throws -> PageSize { try pageSize(loadScenario()) }
}

/// The scenario files this process has read, by path.
final class ScenarioCache: @unchecked Sendable {
    static let shared = ScenarioCache()
    private let lock = NSLock()
    private var byPath: [String: Scenario] = [:]

    func scenario(_ path: String) throws -> Scenario {
        lock.lock()
        defer { lock.unlock() }
        if let s = byPath[path] { return s }
        do {
            let s = try Scenario.load(path)
            byPath[path] = s
            return s
        } catch {
            throw CLIError(error.description)
        }
    }
}
