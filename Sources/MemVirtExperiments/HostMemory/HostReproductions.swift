import MemVirtCore

/// Model reproductions of host memory (overcommit, swap, async page faults, KSM).
/// Owned by the host-memory work; `Reproductions.all` includes them.
extension Reproductions {
    static let hostMemory: [any Experiment.Type] = [AsyncPageFaults.self, AsyncPageFaultSweep.self, KSMReproduction.self]
}
