import MemVirtCore

/// Log-dirty under nested paging, in its own type beside `NestedPaging` (which it reads and
/// edits through its internal EPT API: `eptRoot`, `host`, `walkEPTSilently`, `flushAllVCPUs`).
///
/// The architectural mechanism is the EPT dirty flag in every mode: the CPU sets D on the EPT
/// leaf of each guest write (data writes, the guest walker's A/D updates, the guest kernel's
/// stores), and a leaf whose D is clear cannot be written through a cached translation (the
/// TLB and nested TLB hold "dirty-ok" and are flushed when D is cleared). What differs between
/// the modes is what the hardware and KVM do around it, and so what is counted and charged:
/// - `ept-wp`: the leaf is write-protected; the first write to a page (to a page group) each
///   round is an EPT violation on KVM's fast path (exit + `writeProtectFault`). Counted from
///   the D flags at harvest (one fault per page, or per group, written in the round) and
///   charged to the vCPU then: the same totals as faulting at the write, one round later on
///   the model's clock. No W bit is cleared: NestedPaging's violation handler would route the
///   fault through HostMemory as a host fault.
/// - `ept-dbit`: no exits; the harvest scans every EPT leaf (cost grows with memory size).
/// - `ept-pml`: one exit per 512 logged pages (`vmx_flush_pml_buffer`), the partial buffer
///   drained at harvest; the harvest then costs per dirty page (bitmap or ring).
public final class NestedDirtyTracker: DirtyTracker {
    public let nested: NestedPaging
    public let trackingMode: DirtyTrackingMode
    public let guestFrames: UInt64
    var method: HarvestMethod = .bitmap
    var groupSize: UInt64 = 1
    var costs = DirtyTrackingCosts()
    var logging = false
    /// PML entries logged and not yet drained (carried between harvests).
    var pmlFill = 0
    public private(set) var trackingStats = DirtyTrackingStats()

    public init(nested: NestedPaging, mode: DirtyTrackingMode, guestCapacity: UInt64) throws(InputError) {
        guard mode.paging == .nested else { throw InputError("\(mode.rawValue) is not a nested-paging tracking mode") }
        guard nested.accessedDirty else { throw InputError("nested dirty tracking needs EPT accessed/dirty flags") }
        self.nested = nested
        trackingMode = mode
        guestFrames = guestCapacity >> 12
    }

    public var sourceMemory: PhysicalMemory { nested.host }

    public func sourcePage(_ gfn: UInt64) -> UInt64? {
        guard let hpa = nested.walkEPTSilently(gfn << 12) else { return nil }
        return hpa & ~0xfff
    }

    public func backedFrames() -> [UInt64] {
        var out: [UInt64] = []
        visitLeaves { gfn, _, _, size in
            for i in 0..<size.frames where gfn + i < guestFrames { out.append(gfn + i) }
        }
        return out
    }

    /// Calls `body(first gfn, entry address, raw entry, size)` for every present EPT leaf, in
    /// gfn order.
    func visitLeaves(_ body: (UInt64, UInt64, UInt64, PageSize) -> Void) {
        func visit(_ table: UInt64, _ level: Int, _ gfnBase: UInt64) {
            let span = UInt64(1) << UInt64(9 * (level - 1))
            for idx in 0..<UInt64(512) {
                let ea = table + idx * 8
                let raw = nested.host.read64(ea)
                let e = EPTEntry(rawValue: raw)
                guard e.isPresent else { continue }
                let gfn = gfnBase + idx * span
                if gfn >= guestFrames { return }
                if level == 1 || (level <= 3 && e.isLargePage) {
                    body(gfn, ea, raw, PageSize(leafLevel: level)!)
                } else {
                    visit(e.address, level - 1, gfn)
                }
            }
        }
        visit(nested.eptRoot, nested.eptLevels, 0)
    }

    /// Replaces the huge leaf at `ea` by a table of 4 KiB leaves (same frames, same rights, D
    /// clear). 2 MiB only: a 1 GiB leaf is split to 2 MiB leaves first (recursively).
    func split(_ ea: UInt64, raw: UInt64, size: PageSize) -> Bool {
        guard let t = nested.hostMemory.allocateTableFrame() else { return false }
        let child: PageSize = size == .size1G ? .size2M : .size4K
        let keep = raw & ~(EPTEntry.addressMask | EPTEntry.Flags.dirty.rawValue | (child == .size4K ? EPTEntry.Flags.pageSize.rawValue : 0))
        let base = raw & EPTEntry.addressMask & ~size.offsetMask
        for i in 0..<UInt64(512) { nested.host.write64(t + i * 8, base + i * child.bytes | keep) }
        nested.host.write64(ea, EPTEntry(frameAddress: t, flags: .readWriteExecute).rawValue)
        trackingStats.hugePagesSplit &+= 1
        if child == .size2M {
            for i in 0..<UInt64(512) { _ = split(t + i * 8, raw: nested.host.read64(t + i * 8), size: .size2M) }
        }
        return true
    }

    public func startLogging(cpu: ModelCPU, method: HarvestMethod, groupSize: Int, costs: DirtyTrackingCosts) {
        self.method = method
        self.groupSize = UInt64(max(1, groupSize))
        self.costs = costs
        logging = true
        pmlFill = 0
        // Split huge leaves, clear every D (write-protect every leaf, in ept-wp).
        var leaves = 0.0
        var huge: [(UInt64, UInt64, PageSize)] = []
        visitLeaves { _, ea, raw, size in
            if size != .size4K { huge.append((ea, raw, size)); return }
            leaves += 1
            if raw & EPTEntry.Flags.dirty.rawValue != 0 { nested.host.write64(ea, raw & ~EPTEntry.Flags.dirty.rawValue) }
        }
        for (ea, raw, size) in huge { _ = split(ea, raw: raw, size: size) }
        nested.flushAllVCPUs()
        trackingStats.reprotected &+= UInt64(leaves)
        trackingStats.harvestCycles += leaves * costs.reprotectPerEntry + Double(huge.count) * costs.hugePageSplit + costs.remoteTLBFlush
    }

    public func harvest(cpu: ModelCPU) -> [UInt64] {
        guard logging else { return [] }
        var written = GfnBitmap(frames: guestFrames)
        var scanned = 0.0
        var huge: [(UInt64, UInt64, PageSize)] = []
        visitLeaves { gfn, ea, raw, size in
            if size != .size4K {
                // A huge leaf mapped while logging (a first touch): all its pages are new.
                huge.append((ea, raw, size))
                for i in 0..<size.frames where gfn + i < guestFrames { written.insert(gfn + i) }
                return
            }
            scanned += 1
            if raw & EPTEntry.Flags.dirty.rawValue != 0 {
                nested.host.write64(ea, raw & ~EPTEntry.Flags.dirty.rawValue)
                written.insert(gfn)
            }
        }
        for (ea, raw, size) in huge { _ = split(ea, raw: raw, size: size) }
        var list = written.members
        let writtenCount = list.count
        var cycles = 0.0
        switch trackingMode {
        case .nestedWriteProtect:
            // One fault per page group written this round; the group is reported dirty.
            var faults = 0
            if groupSize > 1 {
                var groups = GfnBitmap(frames: guestFrames)
                var lastGroup = UInt64.max
                for g in list {
                    let first = g / groupSize * groupSize
                    if first == lastGroup { continue }
                    lastGroup = first
                    faults += 1
                    for x in first..<min(first + groupSize, guestFrames) where x == g || sourcePage(x) != nil { groups.insert(x) }
                }
                list = groups.members
            } else {
                faults = list.count
            }
            let perFault = cpu.costs.vmExitRoundTrip + costs.writeProtectFault
            cpu.counters.add(.exits, UInt64(faults))
            cpu.counters.add(.pfTaken, UInt64(faults))
            cpu.counters.add(.pfFast, UInt64(faults))
            cpu.ledger.charge(.vmExits, cpu.costs.vmExitRoundTrip * Double(faults))
            cpu.ledger.charge(.hypervisorFaults, costs.writeProtectFault * Double(faults))
            trackingStats.writeFaults &+= UInt64(faults)
            trackingStats.writeFaultCycles += perFault * Double(faults)
            cycles += methodCost(list.count)
        case .nestedPML:
            pmlFill += writtenCount
            let exits = pmlFill / costs.pmlEntries
            pmlFill %= costs.pmlEntries
            let perExit = cpu.costs.vmExitRoundTrip + costs.pmlDrain
            cpu.counters.add(.exits, UInt64(exits))
            cpu.ledger.charge(.vmExits, cpu.costs.vmExitRoundTrip * Double(exits))
            cpu.ledger.charge(.hypervisorFaults, costs.pmlDrain * Double(exits))
            trackingStats.logFullExits &+= UInt64(exits)
            trackingStats.logFullCycles += perExit * Double(exits)
            // The harvest kicks the vCPU to drain its partial buffer (kvm_flush_pml_buffers).
            cycles += costs.pmlDrain * Double(pmlFill) / Double(costs.pmlEntries) + methodCost(list.count)
            pmlFill = 0
        case .nestedDirtyBits:
            // Every leaf scanned, then the bitmap copied out as with any harvest.
            cycles += scanned * costs.dirtyBitScanPerLeaf + methodCost(list.count)
        default:
            break
        }
        if method == .ring && trackingMode != .nestedDirtyBits {
            // Ring-full exits: the vCPU exits each time its ring reaches the soft limit.
            let exits = list.count / max(1, costs.ringSoftFull)
            cpu.counters.add(.exits, UInt64(exits))
            cpu.ledger.charge(.vmExits, cpu.costs.vmExitRoundTrip * Double(exits))
            cpu.ledger.charge(.hypervisorFaults, costs.ringFullHandler * Double(exits))
            trackingStats.logFullExits &+= UInt64(exits)
            trackingStats.logFullCycles += (cpu.costs.vmExitRoundTrip + costs.ringFullHandler) * Double(exits)
        }
        if writtenCount > 0 || !huge.isEmpty { nested.flushAllVCPUs() }
        cycles += costs.remoteTLBFlush + Double(huge.count) * costs.hugePageSplit
        trackingStats.reprotected &+= UInt64(writtenCount)
        trackingStats.harvests &+= 1
        trackingStats.harvestCycles += cycles
        trackingStats.pagesHarvested &+= UInt64(list.count)
        return list
    }

    func methodCost(_ n: Int) -> Double {
        switch method {
        case .bitmap: costs.bitmapPerGiB * Double(guestFrames) / 262_144 + costs.bitmapPerDirtyPage * Double(n)
        case .ring:
            // Ring-full exits: one per soft-full worth of entries (charged with the harvest).
            costs.ringFixed + costs.ringPerEntry * Double(n)
        }
    }

    public func stopLogging(cpu: ModelCPU) { logging = false }
}
