import MemVirtCore
@testable import MemVirtExperiments
import MemVirtKVM
import MemVirtModel
import Testing

/// The model side of `validate` without /dev/kvm: over prebuilt guest tables (A/D clear) and
/// the host's zero page, the shadow MMU's counts follow from the access stream alone. The
/// oracle replays the stream here and counts pages by their first access.
@Suite("validate: the model side against a replay of the stream")
struct ValidationModelTests {
    @Test("pf_fixed, pf_taken and tlb_flush over prebuilt tables follow from each page's first access",
          arguments: [WorkloadSpec.Pattern.uniform, .gups, .sequential])
    func countsFromTheStream(_ pattern: WorkloadSpec.Pattern) throws {
        let spec = WorkloadSpec(pattern: pattern, footprint: .mib(2), accesses: 20_000, writeRatio: 0.3, seed: 5)
        let c = ValidationCase(name: "t", spec: spec, kind: .prebuilt)
        let model = try ValidationEngines.runModel(c, machine: .pvmShadow, ringBytes: nil)
        // Replay: a read first maps the zero page read-only (guest D clear: read-only anyway);
        // a later write then costs a retried fault (the copy's zap) and a second fixed one.
        var g = try AccessGenerator(spec: spec, thread: 0)
        let rmw: Bool = { if case .gups = pattern { true } else { false } }()
        var firstWasRead: [UInt64: Bool] = [:]
        var written = Set<UInt64>()
        for _ in 0..<spec.accesses {
            let a = g.next()
            let page = a.address.rawValue >> 12
            let write = a.kind == .write
            if firstWasRead[page] == nil { firstWasRead[page] = !write || rmw }
            if write { written.insert(page) }
        }
        let touched = UInt64(firstWasRead.count)
        let readThenWritten = UInt64(firstWasRead.filter { $0.value && written.contains($0.key) }.count)
        #expect(readThenWritten > 0, "the stream reads some page before writing it")
        #expect(model.counters[.pfFixed] == touched + readThenWritten)
        #expect(model.counters[.pfTaken] == touched + 2 * readThenWritten)
        #expect(model.counters[.tlbFlush] == readThenWritten)
        #expect(model.counters[.pfGuest] == 0)
        #expect(model.counters[.hostMinorFaults] == touched + readThenWritten)
        // The same reads as the stream's own replay (GuestDataRules).
        #expect(model.readSum == (try GuestDataRules.replay(spec)).readSum)
    }

    @Test("host_faults cycles: hostDemandZero4K per page first written, hostZeroPageCopy per page read then written, nothing per page only read",
          arguments: [WorkloadSpec.Pattern.uniform, .gups, .sequential])
    func hostFaultCosts(_ pattern: WorkloadSpec.Pattern) throws {
        let spec = WorkloadSpec(pattern: pattern, footprint: .mib(2), accesses: 20_000, writeRatio: 0.3, seed: 9)
        let c = ValidationCase(name: "t", spec: spec, kind: .prebuilt)
        var machine = ReproductionMachine.pvmShadow
        // Distinct values, so each count's share of the category is identifiable.
        machine.costs.hostDemandZero4K = 1_234
        machine.costs.hostZeroPageCopy = 56_789
        machine.costs.guestDemandZero4K = 7  // the guest's own demand-zero: not the host's
        let model = try ValidationEngines.runModel(c, machine: machine, ringBytes: nil)
        var g = try AccessGenerator(spec: spec, thread: 0)
        let rmw: Bool = { if case .gups = pattern { true } else { false } }()
        var firstWasRead: [UInt64: Bool] = [:]
        var written = Set<UInt64>()
        for _ in 0..<spec.accesses {
            let a = g.next()
            let page = a.address.rawValue >> 12
            if firstWasRead[page] == nil { firstWasRead[page] = a.kind != .write || rmw }
            if a.kind == .write { written.insert(page) }
        }
        let firstWritten = Double(firstWasRead.filter { !$0.value }.count)
        let readThenWritten = Double(firstWasRead.filter { $0.value && written.contains($0.key) }.count)
        #expect(readThenWritten > 0)
        let hostFaults = model.breakdown.first { $0.0 == "host_faults" }?.1 ?? 0
        #expect(hostFaults == firstWritten * 1_234 + readThenWritten * 56_789, "host_faults \(hostFaults): \(firstWritten) first writes, \(readThenWritten) zero-page copies")
    }
}

/// Pricing a workload case at the host's two speeds: the share of the slow state from a run's
/// two ends, and the mix of two model runs, which must be the run at the mixed costs (the
/// ledger is counts times costs, so a run on interpolated costs is the interpolated run).
@Suite("validate: the host's two speeds")
struct ValidationHostStateTests {
    @Test("slow share: each end's place between the states' references, clamped, averaged")
    func slowShare() {
        let b = HostSpeedBracket(cpu: 0, beforeNanos: 350, afterNanos: 550)
        #expect(abs(b.slowShare(fastNanos: 350, slowNanos: 550) - 0.5) < 1e-12)
        #expect(abs(HostSpeedBracket(cpu: 0, beforeNanos: 300, afterNanos: 700).slowShare(fastNanos: 350, slowNanos: 550) - 0.5) < 1e-12)
        #expect(abs(HostSpeedBracket(cpu: 0, beforeNanos: 450, afterNanos: 450).slowShare(fastNanos: 350, slowNanos: 550) - 0.5) < 1e-12)
        #expect(HostSpeedBracket(cpu: 1, beforeNanos: 600, afterNanos: 560).slowShare(fastNanos: 350, slowNanos: 550) == 1)
        // No slow state seen by the calibration: the base speed.
        #expect(b.slowShare(fastNanos: 350, slowNanos: 350) == 0)
    }

    @Test("the mix of the runs at two machines' costs is the run at the mixed costs", arguments: [ValidationCase.Kind.prebuilt, .dirtyLog(.bitmap)])
    func mixIsLinear(_ kind: ValidationCase.Kind) throws {
        let spec = WorkloadSpec(pattern: .uniform, footprint: .mib(2), accesses: 20_000, writeRatio: 0.3, seed: 5)
        let c = ValidationCase(name: "t", spec: spec, kind: kind)
        let fast = ReproductionMachine.pvmShadow
        var slow = fast
        slow.costs.vmExitRoundTrip *= 1.4
        slow.costs.shadowFaultHandler *= 1.5
        slow.costs.hostDemandZero4K *= 1.3
        slow.dirty.remoteTLBFlush *= 2
        let share = 0.3
        var mid = fast
        func m(_ a: Double, _ b: Double) -> Double { a + share * (b - a) }
        mid.costs.vmExitRoundTrip = m(fast.costs.vmExitRoundTrip, slow.costs.vmExitRoundTrip)
        mid.costs.shadowFaultHandler = m(fast.costs.shadowFaultHandler, slow.costs.shadowFaultHandler)
        mid.costs.hostDemandZero4K = m(fast.costs.hostDemandZero4K, slow.costs.hostDemandZero4K)
        mid.dirty.remoteTLBFlush = m(fast.dirty.remoteTLBFlush, slow.dirty.remoteTLBFlush)
        let a = try ValidationEngines.runModel(c, machine: fast, ringBytes: nil)
        let b = try ValidationEngines.runModel(c, machine: slow, ringBytes: nil)
        let direct = try ValidationEngines.runModel(c, machine: mid, ringBytes: nil)
        let mixed = a.mixed(with: b, share: share)
        #expect(b.cycles > a.cycles, "the slow machine costs more")
        #expect(abs(mixed.cycles - direct.cycles) <= 1e-9 * direct.cycles, "mixed \(mixed.cycles) direct \(direct.cycles)")
        #expect(abs(mixed.seconds - direct.seconds) <= 1e-9 * direct.seconds)
        #expect(mixed.counters[.pfFixed] == direct.counters[.pfFixed] && mixed.counters[.pfTaken] == direct.counters[.pfTaken])
        for (name, v) in direct.breakdown {
            let w = mixed.breakdown.first { $0.0 == name }?.1 ?? 0
            #expect(abs(w - v) <= 1e-9 * max(v, 1), "\(name): mixed \(w) direct \(v)")
        }
    }
}
