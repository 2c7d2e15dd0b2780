import ArgumentParser

/// `memvirt kvm ...`: the KVM engine (filled in by the KVM engine work).
struct KVMCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "kvm", abstract: "Real VMs on /dev/kvm.")
}
