import MemVirtCore

/// Log-dirty state of a shadow MMU while a migration runs.
final class ShadowLogDirty {
    let xenStyle: Bool
    let method: HarvestMethod
    let groupSize: UInt64
    let costs: DirtyTrackingCosts
    /// Pages dirtied since the last harvest.
    var dirty: GfnBitmap
    /// Ring entries pushed since the last ring-full exit (ring harvest only).
    var ringFill = 0
    var stats = DirtyTrackingStats()
    /// The vCPU charged for ring-full exits (set on every fault).
    unowned(unsafe) var cpu: ModelCPU?

    init(xenStyle: Bool, method: HarvestMethod, groupSize: Int, costs: DirtyTrackingCosts, frames: UInt64) {
        self.xenStyle = xenStyle
        self.method = method
        self.groupSize = UInt64(max(1, groupSize))
        self.costs = costs
        dirty = GfnBitmap(frames: frames)
    }

    /// Marks `gfn` dirty (mark_page_dirty); a ring that reaches its soft limit exits.
    @inline(__always) func note(_ gfn: UInt64) {
        guard gfn < dirty.frames, dirty.insert(gfn) else { return }
        if method == .ring {
            ringFill += 1
            if ringFill >= costs.ringSoftFull, let c = cpu {
                ringFill = 0
                stats.logFullExits &+= 1
                let cycles = c.costs.vmExitRoundTrip + costs.ringFullHandler
                stats.logFullCycles += cycles
                c.counters.add(.exits, 1)
                c.ledger.charge(.vmExits, c.costs.vmExitRoundTrip)
                c.ledger.charge(.hypervisorFaults, costs.ringFullHandler)
            }
        }
    }
}

extension ShadowPaging: DirtyTracker {
    public var trackingMode: DirtyTrackingMode { (logDirty?.xenStyle ?? logDirtyXenStyle) ? .shadowDropAll : .shadowWriteProtect }
    public var guestFrames: UInt64 { guestCapacity >> 12 }
    public var sourceMemory: PhysicalMemory { host }
    public var trackingStats: DirtyTrackingStats { logDirty?.stats ?? logDirtyStatsAfterStop }
    public func sourcePage(_ gfn: UInt64) -> UInt64? { backedPage(gfn) }

    public func backedFrames() -> [UInt64] {
        var out: [UInt64] = []
        for gfn in 0..<guestFrames where p2m.read64(gfn << 3) != 0 { out.append(gfn) }
        return out
    }

    /// Xen style (`shadowDropAll`) or KVM style (`shadowWriteProtect`), chosen by `xenStyle`.
    public func startLogging(cpu: ModelCPU, xenStyle: Bool, method: HarvestMethod = .bitmap, groupSize: Int = 1, costs: DirtyTrackingCosts = DirtyTrackingCosts()) {
        let ld = ShadowLogDirty(xenStyle: xenStyle, method: method, groupSize: groupSize, costs: costs, frames: guestFrames)
        ld.cpu = cpu
        logDirty = ld
        var cycles = 0.0
        // Huge mappings go: they are rebuilt at 4 KiB (KVM splits them; Xen drops everything).
        let huge = max(0, leafCounts[1]) + max(0, leafCounts[2])
        if xenStyle || huge > 0 {
            let dropped = UInt64(max(0, liveCount - cachedRoots.count))
            dropAllShadows(cpu: cpu)
            ld.stats.shadowPagesDropped &+= dropped
            ld.stats.dropCycles += Double(dropped) * costs.shadowPageZap
            ld.stats.hugePagesSplit &+= UInt64(huge)
            cycles += Double(huge) * costs.hugePageSplit
        }
        if !xenStyle {
            // kvm_mmu_slot_remove_write_access: every writable leaf loses W.
            var n: UInt64 = 0
            for (_, sptes) in rmap {
                for a in sptes {
                    let e = host.read64(a)
                    if e & 1 != 0 && e & 2 != 0 { host.write64(a, e & ~2); n += 1 }
                }
            }
            ld.stats.reprotected &+= n
            cycles += Double(n) * costs.reprotectPerEntry
        }
        flushTLBs(cpu)
        cycles += costs.remoteTLBFlush
        ld.stats.harvestCycles += cycles
    }

    public func startLogging(cpu: ModelCPU, method: HarvestMethod, groupSize: Int, costs: DirtyTrackingCosts) {
        startLogging(cpu: cpu, xenStyle: logDirtyXenStyle, method: method, groupSize: groupSize, costs: costs)
    }

    public func harvest(cpu: ModelCPU) -> [UInt64] {
        guard let ld = logDirty else { return [] }
        let list = ld.dirty.members
        ld.dirty.removeAll()
        ld.ringFill = 0
        let n = Double(list.count)
        var cycles: Double
        switch ld.method {
        case .bitmap: cycles = ld.costs.bitmapPerGiB * Double(guestCapacity) / Double(1 << 30) + ld.costs.bitmapPerDirtyPage * n
        case .ring: cycles = ld.costs.ringFixed + ld.costs.ringPerEntry * n
        }
        if ld.xenStyle {
            // shadow_blow_tables on the CLEAN op: every shadow goes, rebuilt by later faults.
            let dropped = UInt64(max(0, liveCount - cachedRoots.count))
            dropAllShadows(cpu: cpu)
            ld.stats.shadowPagesDropped &+= dropped
            ld.stats.dropCycles += Double(dropped) * ld.costs.shadowPageZap
        } else {
            // Re-protect through the rmap (the per-page cost is in the harvest's per-page part).
            var flushed = false
            for gfn in list {
                guard let sptes = rmap[gfn] else { continue }
                for a in sptes {
                    let e = host.read64(a)
                    if e & 1 != 0 && e & 2 != 0 {
                        host.write64(a, e & ~2)
                        ld.stats.reprotected &+= 1
                        flushed = true
                    }
                }
            }
            if flushed { flushTLBs(cpu) }
        }
        cycles += ld.costs.remoteTLBFlush
        ld.stats.harvests &+= 1
        ld.stats.harvestCycles += cycles
        ld.stats.pagesHarvested &+= UInt64(list.count)
        return list
    }

    public func stopLogging(cpu: ModelCPU) {
        if let ld = logDirty { logDirtyStatsAfterStop = ld.stats }
        logDirty = nil
    }

    /// KVM's fast_page_fault for a write to a present spte that lost W only for logging: mark
    /// the page (its group) dirty and restore W, no guest walk. False if not that case.
    func logDirtyFastPath(_ va: UInt64, space: AddressSpace, cpu: ModelCPU, _ ld: ShadowLogDirty) -> Bool {
        guard currentRoot >= 0 else { return false }
        let s = TableWalk.descend(.paging, root: pages[currentRoot].table, levels: cpu.paging.levels, address: va) { host.read64($0) }
        guard let s, s.isLeaf else { return false }
        let ea = s.entryAddress, e = s.raw
        guard s.level == 1, e & 2 == 0, e & Self.mmuWritableBit != 0,
              let gfn = gfnOfHost[(e & PageTableEntry.addressMask) >> 12], !isWriteProtected(gfn) else { return false }
        ld.cpu = cpu
        let before = cpu.ledger.total
        cpu.counters.add(.exits, 1)
        cpu.counters.add(.pfTaken, 1)
        cpu.counters.add(.pfFast, 1)
        cpu.ledger.charge(.vmExits, cpu.costs.vmExitRoundTrip)
        // Xen has no fast path: its log-dirty fault is a full shadow fault.
        cpu.ledger.charge(.hypervisorFaults, ld.xenStyle ? cpu.costs.shadowFaultHandler : ld.costs.writeProtectFault)
        host.write64(ea, e | 2)
        markGroupDirty(gfn, except: gfn, cpu: cpu, ld)
        ld.stats.writeFaults &+= 1
        ld.stats.writeFaultCycles += cpu.ledger.total - before
        cpu.tlb.invalidatePage(va, pcid: space.pcid)
        return true
    }

    /// A write is being mapped for `gfn` during logging: true if W may be set (the page is
    /// dirty already, or this write dirties it).
    func logDirtyPermitsWrite(_ gfn: UInt64, write: Bool, cpu: ModelCPU) -> Bool {
        guard let ld = logDirty else { return true }
        if write {
            ld.cpu = cpu
            markGroupDirty(gfn, except: gfn, cpu: cpu, ld)
            return true
        }
        return ld.dirty.contains(gfn)
    }

    /// Page groups (seed 004): the whole aligned group of `groupSize` pages around `gfn` is
    /// marked dirty and made writable; pages never backed are skipped (nothing to send).
    func markGroupDirty(_ gfn: UInt64, except: UInt64, cpu: ModelCPU, _ ld: ShadowLogDirty) {
        ld.note(gfn)
        guard ld.groupSize > 1 else { return }
        let first = gfn / ld.groupSize * ld.groupSize
        let end = min(first + ld.groupSize, guestFrames)
        var opened = 0.0
        for g in first..<end where g != except {
            guard backedPage(g) != nil else { continue }
            ld.note(g)
            guard let sptes = rmap[g] else { continue }
            for a in sptes {
                let e = host.read64(a)
                if e & 1 != 0 && e & 2 == 0 && e & Self.mmuWritableBit != 0 {
                    host.write64(a, e | 2)
                    opened += 1
                }
            }
        }
        let c = opened * ld.costs.reprotectPerEntry
        cpu.ledger.charge(.hypervisorFaults, c)
        ld.stats.writeFaultCycles += c
    }
}
