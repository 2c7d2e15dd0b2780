import MemVirtCore

/// Log-dirty under nested paging, in its own type beside `NestedPaging` (which it reads and
/// edits through its internal EPT API: `eptRoot`, `host`, `walkEPTSilently`, `flushAllVCPUs`,
/// and which calls back into it from the EPT-violation handler and the walker's D-flag update).
///
/// Each mode works where the hardware and KVM do the work, on the model's clock at that moment:
/// - `ept-wp`: at enable and after each harvest the EPT leaves of the pages to watch lose W and
///   carry the software bit `NestedPaging.logDirtyWriteProtected` (KVM's MMU-writable bit: the
///   host allows writes, only logging forbids them). The guest's first write to such a page is
///   an EPT violation that the handler recognises by that bit and fixes on KVM's fast path
///   (exit + `writeProtectFault`: W restored, the page marked dirty), with page groups: the
///   fault un-protects every protected page of its group and marks them dirty. A write to a
///   leaf without the bit (a KSM page) is a host fault, as before.
/// - `ept-dbit`: no exits; the harvest scans every EPT leaf for D (cost grows with memory size).
/// - `ept-pml`: the walker appends the gfn of each D-flag 0->1 transition to the running vCPU's
///   512-entry log; when the log is full the vCPU exits and KVM drains it into the dirty set
///   (`vmx_flush_pml_buffer`); the harvest kicks every vCPU to drain its partial log.
/// With the dirty ring, each page marked dirty is pushed on the running vCPU's ring, and the
/// vCPU exits when its ring reaches the soft limit (the entries are collected then).
/// A page mapped by a host fault while logging is logged if the fault was a write; after a read
/// fault it is mapped write-protected (ept-wp) or with D clear, so its first write is caught.
public final class NestedDirtyTracker: DirtyTracker {
    public let nested: NestedPaging
    public let trackingMode: DirtyTrackingMode
    public let guestFrames: UInt64
    var method: HarvestMethod = .bitmap
    var groupSize: UInt64 = 1
    var costs = DirtyTrackingCosts()
    var logging = false
    /// Pages marked dirty since the last harvest (ept-wp and ept-pml; ept-dbit reads D).
    var dirty: GfnBitmap
    public private(set) var trackingStats = DirtyTrackingStats()

    public init(nested: NestedPaging, mode: DirtyTrackingMode, guestCapacity: UInt64) throws(InputError) {
        guard mode.paging == .nested else { throw InputError("\(mode.rawValue) is not a nested-paging tracking mode") }
        guard nested.accessedDirty else { throw InputError("nested dirty tracking needs EPT accessed/dirty flags") }
        self.nested = nested
        trackingMode = mode
        guestFrames = guestCapacity >> 12
        dirty = GfnBitmap(frames: guestFrames)
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

    /// The leaf `raw` with D clear and, in ept-wp, write-protected for logging (only if the host
    /// lets the guest write it: a read-only KSM leaf stays a host fault).
    func protected(_ raw: UInt64) -> UInt64 {
        var r = raw & ~EPTEntry.Flags.dirty.rawValue
        if trackingMode == .nestedWriteProtect && r & EPTEntry.Flags.write.rawValue != 0 {
            r = (r & ~EPTEntry.Flags.write.rawValue) | NestedPaging.logDirtyWriteProtected
        }
        return r
    }

    /// Replaces the huge leaf at `ea` by a table of 4 KiB leaves (same frames, same rights, D
    /// clear, protected in ept-wp). 2 MiB only: a 1 GiB leaf is split to 2 MiB leaves first
    /// (recursively).
    func split(_ ea: UInt64, raw: UInt64, size: PageSize) -> Bool {
        guard let t = nested.hostMemory.allocateTableFrame() else { return false }
        let child: PageSize = size == .size1G ? .size2M : .size4K
        var keep = raw & ~(EPTEntry.addressMask | EPTEntry.Flags.dirty.rawValue | (child == .size4K ? EPTEntry.Flags.pageSize.rawValue : 0))
        if child == .size4K { keep = protected(keep) }
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
        dirty.removeAll()
        for v in nested.vcpus { v.pml.removeAll(keepingCapacity: true); v.ringFill = 0 }
        // Split huge leaves, clear every D, write-protect every leaf (ept-wp).
        var leaves = 0.0
        var huge: [(UInt64, UInt64, PageSize)] = []
        visitLeaves { _, ea, raw, size in
            if size != .size4K { huge.append((ea, raw, size)); return }
            leaves += 1
            let r = protected(raw)
            if r != raw { nested.host.write64(ea, r) }
        }
        for (ea, raw, size) in huge { _ = split(ea, raw: raw, size: size) }
        nested.logDirty = self
        nested.pmlLogging = trackingMode == .nestedPML
        nested.flushAllVCPUs()
        trackingStats.reprotected &+= UInt64(leaves)
        trackingStats.harvestCycles += leaves * costs.reprotectPerEntry + Double(huge.count) * costs.hugePageSplit + costs.remoteTLBFlush
    }

    // MARK: Called by NestedPaging at the moment of the guest's access

    /// Marks `gfn` dirty (mark_page_dirty) for the vCPU `v`; with the ring, pushes an entry on
    /// its ring, which exits when it reaches the soft limit.
    func note(_ gfn: UInt64, on v: NestedPaging.VCPUState) {
        guard gfn < guestFrames, dirty.insert(gfn), method == .ring else { return }
        v.ringFill += 1
        if v.ringFill >= max(1, costs.ringSoftFull) {
            v.ringFill = 0
            logFullExit(v.cpu, handler: costs.ringFullHandler)
        }
    }

    /// A vCPU exits because its log (PML buffer or dirty ring) is full: the exit and `handler`
    /// charged to it now.
    func logFullExit(_ c: ModelCPU, handler: Double) {
        c.counters.add(.exits, 1)
        c.ledger.charge(.vmExits, c.costs.vmExitRoundTrip)
        c.ledger.charge(.hypervisorFaults, handler)
        trackingStats.logFullExits &+= 1
        trackingStats.logFullCycles += c.costs.vmExitRoundTrip + handler
    }

    /// The ept-wp fast path for a write to the write-protected leaf at `ea` (gfn `gfn`): W back
    /// on every protected page of the group, those pages dirty; the exit and the fix charged to
    /// the running vCPU now.
    func writeProtectFault(gfn: UInt64) {
        let v = nested.cur
        let c = v.cpu
        let first = gfn / groupSize * groupSize
        for x in first..<min(first + groupSize, guestFrames) {
            guard let ea = nested.leafAddress(gfn: x) else { continue }
            let raw = nested.host.read64(ea)
            guard EPTEntry(rawValue: raw).isPresent else { continue }
            if raw & NestedPaging.logDirtyWriteProtected != 0 {
                nested.host.write64(ea, (raw | EPTEntry.Flags.write.rawValue) & ~NestedPaging.logDirtyWriteProtected)
            }
            if logging { note(x, on: v) }
        }
        c.counters.add(.exits, 1)
        c.counters.add(.pfTaken, 1)
        c.counters.add(.pfFast, 1)
        c.ledger.charge(.vmExits, c.costs.vmExitRoundTrip)
        c.ledger.charge(.hypervisorFaults, costs.writeProtectFault)
        if logging {
            trackingStats.writeFaults &+= 1
            trackingStats.writeFaultCycles += c.costs.vmExitRoundTrip + costs.writeProtectFault
        }
    }

    /// ept-pml: the CPU logs `gfn` (its leaf's D went from 0 to 1) in the running vCPU's log; a
    /// full log exits and is drained into the dirty set.
    func logPML(gfn: UInt64) {
        let v = nested.cur
        v.pml.append(gfn)
        guard v.pml.count >= max(1, costs.pmlEntries) else { return }
        logFullExit(v.cpu, handler: costs.pmlDrain)
        drainPML(v)
    }

    func drainPML(_ v: NestedPaging.VCPUState) {
        for g in v.pml { note(g, on: v) }
        v.pml.removeAll(keepingCapacity: true)
    }

    /// A leaf installed by a host fault while logging: logged now if the fault was a write;
    /// otherwise returned protected, so that its first write is caught.
    func mapped(gfn: UInt64, leaf: UInt64, write: Bool) -> UInt64 {
        guard logging else { return leaf }
        if write {
            if trackingMode == .nestedWriteProtect { note(gfn, on: nested.cur) }
            return leaf
        }
        return protected(leaf)
    }

    // MARK: Harvest

    public func harvest(cpu: ModelCPU) -> [UInt64] {
        guard logging else { return [] }
        var cycles = 0.0
        var huge: [(UInt64, UInt64, PageSize)] = []
        var list: [UInt64]
        if trackingMode == .nestedDirtyBits {
            // Every leaf scanned for D, cleared where set, then the bitmap copied out.
            var written = GfnBitmap(frames: guestFrames)
            var scanned = 0.0
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
            list = written.members
            cycles += scanned * costs.dirtyBitScanPerLeaf
        } else {
            if trackingMode == .nestedPML {
                // The harvest kicks each vCPU to drain its partial log (kvm_flush_pml_buffers).
                for v in nested.vcpus where !v.pml.isEmpty {
                    cycles += costs.pmlDrain * Double(v.pml.count) / Double(max(1, costs.pmlEntries))
                    drainPML(v)
                }
            }
            if nested.hostPageSize != .size4K {
                // Huge leaves mapped while logging (first touches): all their pages are new.
                visitLeaves { gfn, ea, raw, size in
                    guard size != .size4K else { return }
                    huge.append((ea, raw, size))
                    for i in 0..<size.frames where gfn + i < guestFrames { dirty.insert(gfn + i) }
                }
            }
            list = dirty.members
            dirty.removeAll()
            // Re-protect what was dirtied (KVM_CLEAR_DIRTY_LOG): D cleared, W too in ept-wp.
            for g in list {
                guard let ea = nested.leafAddress(gfn: g) else { continue }
                let raw = nested.host.read64(ea)
                guard EPTEntry(rawValue: raw).isPresent else { continue }
                let r = protected(raw)
                if r != raw { nested.host.write64(ea, r) }
            }
            for v in nested.vcpus { v.ringFill = 0 }
        }
        for (ea, raw, size) in huge { _ = split(ea, raw: raw, size: size) }
        cycles += methodCost(list.count)
        if !list.isEmpty || !huge.isEmpty { nested.flushAllVCPUs() }
        cycles += costs.remoteTLBFlush + Double(huge.count) * costs.hugePageSplit
        trackingStats.reprotected &+= UInt64(list.count)
        trackingStats.harvests &+= 1
        trackingStats.harvestCycles += cycles
        trackingStats.pagesHarvested &+= UInt64(list.count)
        return list
    }

    func methodCost(_ n: Int) -> Double {
        switch method {
        case .bitmap: costs.bitmapPerGiB * Double(guestFrames) / 262_144 + costs.bitmapPerDirtyPage * Double(n)
        case .ring: costs.ringFixed + costs.ringPerEntry * Double(n)
        }
    }

    public func stopLogging(cpu: ModelCPU) {
        logging = false
        nested.pmlLogging = false
        for v in nested.vcpus { v.pml.removeAll(keepingCapacity: true) }
        // Leaves still write-protected regain W lazily: their next write takes the fast path.
    }
}
