import MemVirtCore

/// Reproductions that run on the KVM engine (`memvirt reproduce NAME --engine kvm`).
/// Owned by the KVM engine work; `Reproductions.kvm` lists them.
extension Reproductions {
    public static let kvm: [any Experiment.Type] = [KVMAsyncPageFaults.self, KVMAsyncPageFaultsSweep.self, KVMKSM.self, KVMMigration.self]
}
