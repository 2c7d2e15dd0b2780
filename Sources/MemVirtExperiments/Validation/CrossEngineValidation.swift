import MemVirtCore
import MemVirtKVM
import MemVirtModel
import MemVirtReport

/// `validate-values` (KVM engine; `validate` is `Validation`): the model against the real thing. Each workload runs as guest code
/// on /dev/kvm and in the model (native, shadow, nested): the values read (read_sum) and the
/// final memory (memory_checksum) must be equal, and the model's shadow-mode hidden faults
/// (`pf_fixed`) are set beside KVM's own counter for the same run.
public struct CrossEngineValidation: Experiment {
    public static let name = "validate-values"
    public static let summary = "Model vs KVM: same reads, same final memory, pf_fixed side by side"
    let accesses: UInt64
    let footprint: ByteCount

    public init(quick: Bool) {
        accesses = quick ? 100_000 : 2_000_000
        footprint = quick ? .mib(4) : .mib(64)
    }

    public func run(progress: @Sendable (String) -> Void) throws -> ExperimentReport {
        var t = TextTable(header: ["workload", "read_sum", "memory", "KVM pf_fixed", "model shadow pf_fixed", "model/KVM", "KVM wall s", "model shadow wall s"])
        var rows: [JSONValue] = []
        var allEqual = true
        for pattern in [WorkloadSpec.Pattern.uniform, .zipf(theta: 0.99), .chase, .gups] {
            progress("\(Self.name): \(pattern)")
            let spec = WorkloadSpec(pattern: pattern, footprint: footprint, accesses: accesses, writeRatio: 0.3, seed: 1)
            var options = KVMRunOptions()
            options.verify = true
            let kvm: KVMRunReport
            do { kvm = try KVMRunner.run(spec, options: options) } catch { throw InputError("the KVM run failed: \(error)") }
            guard let guest = kvm.guests.first, let kvmMemory = guest.memoryChecksum else { throw InputError("the KVM run reported no checksum") }
            var readsEqual = true
            var memoryEqual = true
            var shadowFixed: UInt64 = 0
            var shadowWall = 0.0
            for kind in PagingKind.allCases {
                var config = ModelConfig()
                config.paging = kind
                config.memoryChecksum = true
                let r = try ModelEngine.run(spec: spec, config: config)
                readsEqual = readsEqual && r.facts.readSum == guest.readSum
                memoryEqual = memoryEqual && r.facts.memoryChecksum == kvmMemory
                if kind == .shadow {
                    shadowFixed = r.counters[.pfFixed]
                    shadowWall = r.wallSeconds
                }
            }
            allEqual = allEqual && readsEqual && memoryEqual
            let kvmFixed = kvm.result.counters[.pfFixed]
            t.add([pattern.description, readsEqual ? "equal" : "DIFFERENT", memoryEqual ? "equal" : "DIFFERENT", formatGrouped(kvmFixed),
                   formatGrouped(shadowFixed), formatFixed(Double(shadowFixed) / Double(max(kvmFixed, 1)), digits: 3),
                   formatFixed(kvm.result.wallSeconds, digits: 2), formatFixed(shadowWall, digits: 2)])
            rows.append(.object([
                ("workload", .string(pattern.description)), ("read_sum_equal", .bool(readsEqual)), ("memory_equal", .bool(memoryEqual)),
                ("kvm_pf_fixed", .uint(kvmFixed)), ("model_shadow_pf_fixed", .uint(shadowFixed)),
                ("kvm_wall_seconds", .double(kvm.result.wallSeconds)), ("model_shadow_wall_seconds", .double(shadowWall)),
            ]))
        }
        return ExperimentReport(
            name: Self.name, title: Self.summary, tables: [t],
            notes: [
                "Both engines draw the same SplitMix64 stream (MemVirtCore/Workload.swift) and apply the same data rules (read_sum, v(i) writes); the guest runtime is C at CPL3, the model Swift.",
                "KVM builds the guest's page tables before the run, so its pf_fixed counts shadow faults only; the model's guest starts empty and takes demand-zero faults, each followed by one hidden fault.",
            ],
            json: .object([("schema", "memvirt.reproduce/1"), ("name", .string(Self.name)), ("all_equal", .bool(allEqual)), ("rows", .array(rows))]))
    }
}
