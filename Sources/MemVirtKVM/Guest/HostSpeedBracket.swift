import CKVM
import MemVirtCore
#if canImport(Glibc)
import Glibc
#endif

/// The host's speed on the CPU a one-vCPU run used, just before and just after its measured
/// phase. On kvm_pvm the host is itself a VM, and each of its CPUs runs, for seconds to minutes,
/// in one of two states: in the slow one exits, faults and emulated CPL0 take ~1.4x as long
/// while native code does not move (two `kvm probe`s run at once on CPU 0 and CPU 1 saw one CPU
/// slow and the other fast: the state is per CPU, docs/calibrate.md). `kvm calibrate` prices
/// both states (`CalibratedCost.slowStateNanos`); this says which one a run was in, by the same
/// reference the calibration classifies its rounds with: `cpl0_instruction`, one KVM_RUN of
/// 2 x 51 CPL0 instructions less one of 2, over 100.
public struct HostSpeedBracket: Sendable, Equatable {
    /// The CPU the run was pinned to.
    public var cpu: Int
    /// Nanoseconds per emulated CPL0 instruction before and after the phase (median of
    /// `samples` each).
    public var beforeNanos: Double
    public var afterNanos: Double

    public init(cpu: Int, beforeNanos: Double, afterNanos: Double) {
        self.cpu = cpu
        self.beforeNanos = beforeNanos
        self.afterNanos = afterNanos
    }

    /// Samples per side.
    public static let samples = 7

    /// The share of the phase in the slow state, estimated from the two ends: each end's
    /// place between `fastNanos` and `slowNanos` (the calibration's reference in each state),
    /// clamped to 0...1, averaged. 0 when the calibration saw no slow state (`slowNanos` not
    /// above `fastNanos`).
    public func slowShare(fastNanos: Double, slowNanos: Double) -> Double {
        guard slowNanos > fastNanos, fastNanos > 0 else { return 0 }
        func place(_ x: Double) -> Double { min(1, max(0, (x - fastNanos) / (slowNanos - fastNanos))) }
        return (place(beforeNanos) + place(afterNanos)) / 2
    }

    /// One side: the reference `samples` times on vCPU 0 of `g`, their median.
    static func reference(_ g: GuestVM) throws(KVMError) -> Double {
        _ = try g.timeCPL0Loop(vcpu: 0, iterations: 1)
        var xs: [Double] = []
        for _ in 0..<samples {
            let one = try g.timeCPL0Loop(vcpu: 0, iterations: 1)
            let many = try g.timeCPL0Loop(vcpu: 0, iterations: 51)
            xs.append((Double(many) - Double(one)) / 100)
        }
        xs.sort()
        return xs[xs.count / 2]
    }

    /// Pins the calling thread (and so the vCPU threads it starts, which inherit its mask) to
    /// the CPU it is on; returns that CPU and the mask to restore, nil when refused.
    static func pinToCurrentCPU() -> (cpu: Int, restore: UInt64)? {
        guard let mask = currentAffinityMask() else { return nil }
        let cpu = Int(ckvm_current_cpu())
        guard cpu >= 0 && cpu < 64, mask & (1 << UInt64(cpu)) != 0, setAffinityMask(1 << UInt64(cpu)) else { return nil }
        return (cpu, mask)
    }
}

extension HostSpeedBracket {
    /// Runs `body` pinned to the CPU the caller is on (threads it starts inherit the pin) with
    /// the reference taken on that CPU just before and just after, in a small VM of its own
    /// (for runs whose own VM this code does not drive). The bracket is nil when the reference
    /// could not be taken or the pin was refused; `body`'s result and errors pass through.
    public static func around<T>(_ body: () throws -> T) rethrows -> (T, HostSpeedBracket?) {
        guard let pin = pinToCurrentCPU() else { return (try body(), nil) }
        defer { setAffinityMask(pin.restore) }
        let vm: GuestVM? = try? GuestVM(kvm: KVM(), config: GuestConfig(dataSize: 16 * 4096))
        let before = vm.flatMap { try? reference($0) }
        let result = try body()
        let after = vm.flatMap { try? reference($0) }
        guard let before, let after else { return (result, nil) }
        return (result, HostSpeedBracket(cpu: pin.cpu, beforeNanos: before, afterNanos: after))
    }
}
