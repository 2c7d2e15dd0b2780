import MemVirtCore
import MemVirtExperiments
import MemVirtKVM
import MemVirtModel
import Testing

/// The guest runtime's loop run natively (validate's native baseline) is the guest's stream: the
/// same values read as the model's independent Swift generator (`AccessGenerator`) reads, for
/// every pattern. No /dev/kvm needed: the C function runs in this process.
@Suite("validate: the guest loop run natively")
struct NativeGuestLoopTests {
    static let patterns: [WorkloadSpec.Pattern] = [.sequential, .strided(stride: 24_576), .uniform, .zipf(theta: 0.99), .chase, .gups]

    @Test("read_sum, reads and writes equal the model's for the same spec", arguments: patterns)
    func sameStream(_ pattern: WorkloadSpec.Pattern) throws {
        let spec = WorkloadSpec(pattern: pattern, footprint: .mib(1), accesses: 20_000, writeRatio: 0.3, seed: 11)
        let native = try NativeGuestLoop.measure(spec, runs: 2)
        var config = ModelConfig()
        config.paging = .native
        let model = try ModelEngine.run(spec: spec, config: config)
        #expect(native.readSum == model.facts.readSum, "\(pattern): native read_sum \(native.readSum), model \(model.facts.readSum)")
        #expect(native.reads + native.writes == spec.accesses)
        #expect(native.writes == model.counters[.writes], "\(pattern): native writes \(native.writes), model \(model.counters[.writes])")
        #expect(native.seconds.count == 2 && native.seconds.allSatisfy { $0 > 0 }, "\(native.seconds)")
        #expect(native.medianSeconds >= native.seconds.min()! && native.medianSeconds <= native.seconds.max()!)
    }

    @Test("bad input is an error, not a crash")
    func badInput() {
        let spec = WorkloadSpec(pattern: .uniform, footprint: .mib(1), accesses: 10, writeRatio: 0, seed: 1)
        #expect(throws: KVMError.self) { try NativeGuestLoop.measure(spec, runs: 0) }
    }
}

@Suite("validate: --case")
struct ValidationCaseSelectionTests {
    @Test("only the named cases, in the run's order; an unknown name lists the allowed ones")
    func caseFilter() throws {
        let v = try Validation(quick: true, only: ["gups", "uniform"])
        #expect(v.cases.map(\.name) == ["uniform", "gups"])
        #expect(try Validation(quick: true, only: []).cases.count == Validation(quick: true).cases.count)
        do {
            _ = try Validation(quick: true, only: ["uniform", "nope"])
            Issue.record("an unknown case was accepted")
        } catch {
            #expect("\(error)".contains("nope") && "\(error)".contains("allowed: sequential"), "\(error)")
        }
    }
}
