import MemVirtCore
import MemVirtKVM
import MemVirtModel
import Testing

/// The model against the real thing: the same WorkloadSpec run in the model engine and as
/// guest code on /dev/kvm must read the same values (read_sum) and leave the same memory
/// (memory_checksum). The guest runtime is C, the model Swift: two implementations of one
/// documented stream, checked against each other.
@Suite("Model engine against the KVM engine", .serialized, .enabled(if: KVM.isUsable, Comment(rawValue: KVM.unavailableReason ?? "")))
struct CrossEngineTests {
    @Test("Same reads and same final memory in both engines, every pattern, every paging mode",
          arguments: [WorkloadSpec.Pattern.uniform, .sequential, .strided(stride: 24576), .zipf(theta: 0.9), .chase, .gups])
    func sameResult(_ pattern: WorkloadSpec.Pattern) throws {
        let spec = WorkloadSpec(pattern: pattern, footprint: .mib(4), accesses: 100_000, writeRatio: 0.3, seed: 7)
        var options = KVMRunOptions()
        options.verify = true
        let kvm = try KVMRunner.run(spec, options: options)
        let guest = try #require(kvm.guests.first)
        let kvmMemory = try #require(guest.memoryChecksum)
        #expect(guest.accesses == spec.accesses)
        for kind in PagingKind.allCases {
            var config = ModelConfig()
            config.paging = kind
            config.memoryChecksum = true
            let model = try ModelEngine.run(spec: spec, config: config)
            #expect(model.extra.first { $0.0 == "read_sum" }?.1 == .uint(guest.readSum), "\(kind) read_sum")
            #expect(model.extra.first { $0.0 == "memory_checksum" }?.1 == .string("0x" + String(kvmMemory, radix: 16)), "\(kind) memory")
            #expect(model.counters[.writes] == guest.writes, "\(kind) writes")
        }
    }
}
