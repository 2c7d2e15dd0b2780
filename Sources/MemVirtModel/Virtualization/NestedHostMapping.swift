import MemVirtCore

/// Nested paging seen from the host (moved from NestedPaging.swift): the HostMappingOwner side
/// (zap and accessed-bit harvesting for reclaim, the async-PF prefault), the guest kernel's own
/// accesses through EPT, and software EPT look-ups.
extension NestedPaging {
    // MARK: HostMappingOwner

    @discardableResult
    public func zap(gfn: UInt64) -> Bool {
        guard let ea = leafAddress(gfn: gfn) else { return false }
        let e = EPTEntry(rawValue: host.read64(ea))
        guard e.isPresent else { return false }
        host.write64(ea, 0)
        leafPages[0] -= 1
        flushAllVCPUs()
        return accessedDirty ? e.rawValue & EPTEntry.Flags.dirty.rawValue != 0 : e.isWritable
    }

    public func accessedAndClear(gfn: UInt64) -> Bool {
        guard let ea = leafAddress(gfn: gfn) else { return false }
        let raw = host.read64(ea)
        guard EPTEntry(rawValue: raw).isPresent else { return false }
        guard accessedDirty else { return true }
        let a = EPTEntry.Flags.accessed.rawValue
        if raw & a == 0 { return false }
        host.write64(ea, raw & ~a)
        return true
    }

    /// Installs the EPT entry for `gpa` if the host has the page ready (KVM's
    /// kvm_arch_async_page_ready prefault after an async page fault's I/O). True if mapped.
    @discardableResult
    public func prefault(_ gpa: UInt64) -> Bool {
        guard hostMemory.isReady(owner: ownerIndex, gfn: gpa >> 12, now: now) else { return false }
        if let hpa = walkEPTSilently(gpa), hpa != 0 { return true }
        let saved = deferIO
        deferIO = true
        defer { deferIO = saved }
        cpu.ledger.charge(.hypervisorFaults, cpu.costs.eptViolationHandler)
        guard case .map(let frame, let writable, let kind, _) = hostMemory.fault(owner: ownerIndex, gfn: gpa >> 12, write: false, now: now) else { return false }
        if kind == .fresh { cpu.ledger.charge(.hostFaults, cpu.costs.hostDemandZero4K) }
        cpu.ledger.charge(.hostFaults, hostMemory.takeCycles())
        _ = installEPT((gpa >> 12) << 12, size: .size4K, leaf: hostLeaf(gfn: gpa >> 12, frame: frame, writable: writable, write: false))
        return true
    }

    /// Host-physical address of `gpa` for the guest kernel's own accesses (backing it first;
    /// a kernel-mode access never goes async). Sets EPT A, and D for a write, as the hardware
    /// does for the access.
    func hostAddress(_ gpa: UInt64, write: Bool) -> UInt64 {
        while true {
            if let ea = leafAddress(gfn: gpa >> 12) {
                let raw = host.read64(ea)
                let e = EPTEntry(rawValue: raw)
                if e.isPresent && (!write || e.isWritable) {
                    if accessedDirty {
                        var u = raw | EPTEntry.Flags.accessed.rawValue
                        if write { u |= EPTEntry.Flags.dirty.rawValue }
                        if u != raw {
                            host.write64(ea, u)
                            if pmlLogging && write && raw & EPTEntry.Flags.dirty.rawValue == 0 { logDirty?.logPML(gfn: gpa >> 12) }
                        }
                    }
                    return e.pageBase(.size4K) | (gpa & 4095)
                }
            } else if let hpa = walkEPTSilently(gpa) {
                return hpa  // a large host page
            }
            let saved = deferIO
            deferIO = false
            defer { deferIO = saved }
            do { try handleViolation(gpa, write: write) } catch {
                if hostFailure == nil { hostFailure = error }
                return scratchFrame | (gpa & 4095)
            }
        }
    }

    /// A software EPT look-up (the hypervisor's view; no references counted, no A/D).
    func walkEPTSilently(_ gpa: UInt64) -> UInt64? {
        let s = TableWalk.descend(.ept, root: eptRoot, levels: eptLevels, address: gpa) { host.read64($0) }
        guard let s, s.isLeaf else { return nil }
        return EPTEntry(rawValue: s.raw).pageBase(s.size) | (gpa & s.size.offsetMask)
    }

    /// Host-physical address of `gpa` if mapped now (no fault, no A/D): for inspection.
    public func mappedHostAddress(_ gpa: GuestPhysicalAddress) -> UInt64? { walkEPTSilently(gpa.rawValue) }
}
