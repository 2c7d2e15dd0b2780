import MemVirtCore

/// The shadow MMU's fault path and guest TLB operations (moved from ShadowPaging.swift): the
/// hidden fault (FNAME(page_fault): guest walk, FNAME(fetch)), emulated and unsync guest
/// page-table writes, resync, INVLPG and CR3 writes.
extension ShadowPaging {
    // MARK: the fault path

    /// Guest tables read through the p2m by the hypervisor's software walk (FNAME(walk_addr)):
    /// records each level's table and sets guest A/D bits as KVM does.
    struct GuestWalkMemory: PageTableMemory {
        let mode: ShadowPaging
        var tables: (UInt64, UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0, 0)
        var reads = 0
        mutating func readEntry(_ address: UInt64, level: Int) -> UInt64? {
            let t = address & ~0xfff
            switch level {
            case 1: tables.0 = t
            case 2: tables.1 = t
            case 3: tables.2 = t
            case 4: tables.3 = t
            default: tables.4 = t
            }
            reads += 1
            return mode.host.read64(mode.hostAddress(address))
        }
        mutating func writeEntry(_ address: UInt64, _ value: UInt64) {
            mode.logDirty?.note(address >> 12)
            mode.host.write64(mode.hostAddress(address), value)
        }
        func table(_ level: Int) -> UInt64 {
            switch level {
            case 1: tables.0
            case 2: tables.1
            case 3: tables.2
            case 4: tables.3
            default: tables.4
            }
        }
    }

    public func resolveMiss(_ va: UInt64, kind: AccessKind, space: AddressSpace, cpu: ModelCPU) -> MissOutcome {
        cpuForGuestWrites = cpu
        if currentRoot < 0 { switchAddressSpace(to: space, cpu: cpu) }
        cpu.walksStarted &+= 1
        var mem = ChargedTableMemory(DirectTableMemory(host), cpu: cpu)
        let r = PageWalker.walk(
            va, root: pages[currentRoot].table, kind: kind, mode: cpu.privilege, pcid: space.pcid, config: cpu.paging,
            caches: cpu.walkCaches.enabled ? cpu.walkCaches : nil, memory: &mem)
        switch r.kind {
        case .translated:
            return .translated(r.entry, global: r.global, refs: r.refs, walkCacheHit: r.walkCacheHit)
        case .stopped:
            preconditionFailure("shadow tables are in host memory; a walk never stops")
        case .fault:
            return shadowFault(va, kind: kind, space: space, cpu: cpu, refs: r.refs)
        }
    }

    /// The hypervisor's page-fault handler (kvm_mmu_page_fault -> FNAME(page_fault)); while
    /// logging, a write to a log-protected spte takes the fast path first.
    func shadowFault(_ va: UInt64, kind: AccessKind, space: AddressSpace, cpu: ModelCPU, refs: Int) -> MissOutcome {
        guard let ld = logDirty else { return shadowFaultSlow(va, kind: kind, space: space, cpu: cpu, refs: refs) }
        if kind == .write && logDirtyFastPath(va, space: space, cpu: cpu, ld) { return .retry(refs: refs) }
        let before = cpu.ledger.total
        let r = shadowFaultSlow(va, kind: kind, space: space, cpu: cpu, refs: refs)
        if case .retry = r {
            ld.stats.reshadowFaults &+= 1
            ld.stats.reshadowCycles += cpu.ledger.total - before
        }
        return r
    }

    func shadowFaultSlow(_ va: UInt64, kind: AccessKind, space: AddressSpace, cpu: ModelCPU, refs: Int) -> MissOutcome {
        cpu.counters.add(.exits, 1)
        cpu.counters.add(.pfTaken, 1)
        cpu.ledger.charge(.vmExits, cpu.costs.vmExitRoundTrip)
        cpu.ledger.charge(.hypervisorFaults, cpu.costs.shadowFaultHandler)
        var gw = GuestWalkMemory(mode: self)
        let g = PageWalker.walk(va, root: space.root, kind: kind, mode: cpu.privilege, pcid: space.pcid, config: cpu.paging, caches: nil, memory: &gw)
        cpu.ledger.charge(.hypervisorFaults, Double(gw.reads) * cpu.costs.walkRefL2)
        guard case .translated = g.kind else {
            if case .fault(let code) = g.kind {
                // A genuine guest fault: inject it (the guest kernel handles it).
                cpu.counters.add(.pfGuest, 1)
                cpu.ledger.charge(.vmExits, cpu.costs.faultInjection)
                return .guestFault(code, refs: refs)
            }
            preconditionFailure("guest walk stopped")
        }
        let write = kind == .write
        let leafGPA = g.entry.base | (va & g.entry.size.offsetMask)
        let dataGfn = leafGPA >> 12
        // A write to a guest page table through a data mapping: emulate (KVM: the gfn is
        // write-protected, so the access cannot be fixed by a writable spte).
        if write && isWriteProtected(dataGfn) {
            emulatedTableWrite(gpa: leafGPA & ~7, cpu: cpu, value: nil)
            let hpa = hostAddress(leafGPA)
            return .emulated(TLBEntry(base: hpa & ~0xfff, size: .size4K, writable: true, user: true, dirty: true, noExecute: false), refs: refs)
        }
        // A frame under a resident limit: served by the pager first; a fault during which the
        // pager evicted is stale and retried (Host/ShadowResidentPager.swift).
        if let pager = residentPager, pager.faultIn(dataGfn, mode: self, cpu: cpu) { return .retry(refs: refs) }
        // A write to a frame KSM merged: the host's copy-on-write break, then a retry (Host/ShadowKSM.swift).
        let ksmShared = ksmState?.isShared(dataGfn) ?? false
        if ksmShared && write { ksmState!.breakCOW(dataGfn, mode: self, cpu: cpu); return .retry(refs: refs) }
        // The host's zero page (options.hostZeroPage): a write to a page mapped on it copies
        // the page inside this fault; the copy's mmu notifier zaps the spte and flushes, and
        // the fault is retried (not fixed).
        var zeroPageRead = false
        if options.hostZeroPage && hostPageSize == .size4K {
            if write, zeroPageMapped.remove(dataGfn) != nil {
                hostFaults &+= 1
                cpu.ledger.charge(.hostFaults, cpu.costs.demandZero(.size4K))
                for a in rmap[dataGfn] ?? [] {
                    let e = host.read64(a)
                    if e & 1 != 0 {
                        dropLeaf(a, entry: e, level: 1)
                        host.write64(a, 0)
                    }
                }
                flushTLBs(cpu)
                return .retry(refs: refs)
            }
            if !write && backedPage(dataGfn) == nil {
                zeroPageMapped.insert(dataGfn)
                zeroPageRead = true
            }
        }
        // Build the shadow path (FNAME(fetch)).
        let guestLeafLevel = g.entry.size.leafLevel
        // Huge mappings are split to 4 KiB while logging (dirty pages are tracked per 4 KiB).
        let mapSize = logDirty != nil ? .size4K : g.entry.size.rawValue <= hostPageSize.rawValue ? g.entry.size : hostPageSize
        var sp = currentRoot
        var level = cpu.paging.levels
        while level > mapSize.leafLevel {
            pages[sp].writeFlooding = 0
            let idx = GuestVirtualAddress(va).tableIndex(level: level)
            let ea = pages[sp].table + UInt64(idx) * 8
            let direct = level <= guestLeafLevel
            // The guest table (or, below a guest large page, the first gfn) the child shadows.
            let childGfn = direct ? (leafGPA & ~PageSize(leafLevel: level)!.offsetMask) >> 12 : gw.table(level - 1) >> 12
            let e = host.read64(ea)
            var child = -1
            if e & 1 != 0, let c = childIndex(of: e), pages[c].live, pages[c].gfn == childGfn, pages[c].direct == direct {
                // Already linked (FNAME(fetch) only looks a child up when the entry is absent).
                child = c
                touch(c)
                pages[c].writeFlooding = 0
            } else {
                child = shadowPage(gfn: childGfn, level: level - 1, direct: direct, cpu: cpu)
                if e & 1 != 0, let old = childIndex(of: e) {
                    pages[old].parents.removeAll { $0.0 == sp && $0.1 == idx }
                    cpu.counters.add(.mmuPdeZapped, 1)
                }
                host.write64(ea, pages[child].table | 0x7)
                pages[child].parents.append((sp, idx))
                byTable[pages[child].table] = child
            }
            sp = child
            level -= 1
        }
        // The leaf: data frame from the p2m, permissions from the guest walk.
        backingZeroPageMap = zeroPageRead
        let hostBase = hostAddress(leafGPA & ~mapSize.offsetMask) & ~mapSize.offsetMask
        backingZeroPageMap = false
        for i in 0..<mapSize.frames { gfnOfHost[(hostBase >> 12) + i] = ((leafGPA & ~mapSize.offsetMask) >> 12) + i }
        let idx = GuestVirtualAddress(va).tableIndex(level: level)
        let ea = pages[sp].table + UInt64(idx) * 8
        let old = host.read64(ea)
        var spte = hostBase | 0x1 | 0x20
        if g.entry.user { spte |= 0x4 }
        // Writable only if the guest allows it, its D bit is set (or this is the write that
        // sets it), and no page of the mapping is a shadowed guest table.
        // A page mapped on the host's zero page is read-only to KVM too (hva_to_pfn: map_writable
        // false for a read-only get_user_pages).
        if g.entry.writable && (g.entry.dirty || write) && !zeroPageRead && !ksmShared && !mappingHoldsTable(leafGPA & ~mapSize.offsetMask, mapSize) {
            spte |= Self.mmuWritableBit
            // While logging, W only once the page is dirty this round (a write fault marks it).
            if logDirty == nil || logDirtyPermitsWrite((leafGPA & ~mapSize.offsetMask) >> 12, write: write, cpu: cpu) {
                spte |= 0x2
                if write { spte |= 0x40 }
            }
        }
        if g.entry.noExecute { spte |= 1 << 63 }
        if mapSize != .size4K { spte |= 0x80 }
        if old & 1 != 0 { dropLeaf(ea, entry: old, level: level) }
        host.write64(ea, spte)
        rmap[rmapKey((leafGPA & ~mapSize.offsetMask) >> 12, level: level), default: []].append(ea)
        leafCounts[level - 1] += 1
        if old & 1 != 0 {
            // A permission upgrade of a present entry: the TLB may hold the old one.
            cpu.tlb.invalidatePage(va, pcid: space.pcid)
        }
        cpu.counters.add(.pfFixed, 1)
        return .retry(refs: refs)
    }

    func mappingHoldsTable(_ gpaBase: UInt64, _ size: PageSize) -> Bool {
        if size == .size4K { return isWriteProtected(gpaBase >> 12) }
        let first = gpaBase >> 12
        return byGfn.keys.contains { $0 >= first && $0 < first + size.frames && isWriteProtected($0) }
    }

    /// A guest write to a write-protected table, emulated (kvm_mmu_pte_write): the write is
    /// done, the shadow entries it shadows are zapped, repeated writes unshadow the page.
    func emulatedTableWrite(gpa: UInt64, cpu: ModelCPU, value: UInt64?) {
        cpu.counters.add(.exits, 1)
        cpu.counters.add(.pfTaken, 1)
        cpu.counters.add(.pfEmulate, 1)
        cpu.counters.add(.insnEmulation, 1)
        cpu.counters.add(.mmuPteWrite, 1)
        cpu.ledger.charge(.vmExits, cpu.costs.vmExitRoundTrip)
        cpu.ledger.charge(.emulation, cpu.costs.instructionEmulation)
        logDirty?.note(gpa >> 12)
        if let v = value { host.write64(hostAddress(gpa), v) }
        let gfn = gpa >> 12
        let idx = Int((gpa & 0xfff) >> 3)
        for i in byGfn[gfn] ?? [] where pages[i].live {
            pages[i].writeFlooding += 1
            if pages[i].writeFlooding >= options.floodThreshold && i != currentRoot && pages[i].isRoot {
                pages[i].isRoot = false
            }
            if pages[i].writeFlooding >= options.floodThreshold && i != currentRoot {
                cpu.counters.add(.mmuFlooded, 1)
                zap(i, cpu: cpu)
                continue
            }
            let ea = pages[i].table + UInt64(idx) * 8
            let e = host.read64(ea)
            guard e & 1 != 0 else { continue }
            let leaf = pages[i].level == 1 || e & 0x80 != 0
            if leaf {
                dropLeaf(ea, entry: e, level: pages[i].level)
            } else if let c = childIndex(of: e) {
                cpu.counters.add(.mmuPdeZapped, 1)
                pages[c].parents.removeAll { $0.0 == i && $0.1 == idx }
                if pages[c].parents.isEmpty && !pages[c].isRoot { zap(c, cpu: cpu) }
            }
            host.write64(ea, 0)
            flushTLBs(cpu)
        }
    }

    /// A guest write to guest-physical memory outside the fault path (the guest kernel's own
    /// stores): a write-protected table traps, or its leaf shadow page goes unsync.
    func guestWrite(_ gpa: UInt64, _ value: UInt64) {
        let gfn = gpa >> 12
        logDirty?.note(gfn)
        guard let cpu = cpuForGuestWrites, byGfn[gfn] != nil, isWriteProtected(gfn) else {
            host.write64(hostAddress(gpa), value)
            return
        }
        let sps = byGfn[gfn]!
        if options.unsync && sps.allSatisfy({ pages[$0].level == 1 }) {
            // kvm_mmu_unsync_walk: the first write faults; the leaf shadow pages go unsync and
            // the guest writes its table freely until its next TLB flush.
            cpu.counters.add(.exits, 1)
            cpu.counters.add(.pfTaken, 1)
            cpu.counters.add(.pfFixed, 1)
            cpu.ledger.charge(.vmExits, cpu.costs.vmExitRoundTrip)
            cpu.ledger.charge(.shadowSync, cpu.costs.shadowFaultHandler)
            for i in sps where !pages[i].unsync {
                pages[i].unsync = true
                unsyncCount += 1
            }
            host.write64(hostAddress(gpa), value)
            return
        }
        emulatedTableWrite(gpa: gpa, cpu: cpu, value: value)
    }

    /// Resynchronizes an unsync shadow page with its guest table (kvm_sync_page): every shadow
    /// entry that no longer matches the guest's is zapped (refilled on the next fault).
    func sync(_ i: Int, cpu: ModelCPU, keepUnsync: Bool = false) {
        guard pages[i].live, pages[i].unsync else { return }
        cpu.counters.add(.shadowResyncs, 1)
        cpu.ledger.charge(.shadowSync, cpu.costs.shadowResync)
        let sp = pages[i]
        for idx in 0..<512 {
            let ea = sp.table + UInt64(idx) * 8
            let e = host.read64(ea)
            guard e & 1 != 0 else { continue }
            let g = PageTableEntry(rawValue: host.read64(hostAddress((sp.gfn << 12) + UInt64(idx) * 8)))
            let hostOfGuest = g.isPresent ? backedPage(g.address >> 12) : nil
            let stillValid = g.isPresent && hostOfGuest == e & PageTableEntry.addressMask
                && (g.isWritable || e & 2 == 0) && (g.isUser || e & 4 == 0) && (!g.isNoExecute || e & (1 << 63) != 0)
            if !stillValid {
                dropLeaf(ea, entry: e, level: 1)
                host.write64(ea, 0)
            }
        }
        if !keepUnsync {
            pages[i].unsync = false
            unsyncCount -= 1
            writeProtect(gfn: sp.gfn, cpu: cpu)
        }
        flushTLBs(cpu)
    }

    func syncAll(cpu: ModelCPU) {
        guard unsyncCount > 0 else { return }
        for i in pages.indices where pages[i].live && pages[i].unsync { sync(i, cpu: cpu) }
    }

    public func invalidatePage(_ va: UInt64, space: AddressSpace, cpu: ModelCPU) {
        // INVLPG is intercepted under shadow paging (kvm_mmu_invlpg).
        cpu.counters.add(.exits, 1)
        cpu.counters.add(.invlpg, 1)
        cpu.ledger.charge(.vmExits, cpu.costs.vmExitRoundTrip)
        cpu.ledger.charge(.shadowSync, cpu.costs.invlpgHandler)
        // Sync the leaf shadow page covering va, if unsync; zap its entry for va.
        if currentRoot >= 0 {
            // The shadow page holding the last entry on va's path (its table is that entry's page).
            let s = TableWalk.descend(.paging, root: pages[currentRoot].table, levels: cpu.paging.levels, address: va) { host.read64($0) }
            if let s, let sp = byTable[s.entryAddress & ~0xfff] {
                if s.isLeaf {
                    dropLeaf(s.entryAddress, entry: s.raw, level: s.level)
                    host.write64(s.entryAddress, 0)
                }
                if pages[sp].unsync { sync(sp, cpu: cpu) }
            }
        }
        cpu.tlb.invalidatePage(va, pcid: space.pcid)
        cpu.walkCaches.flush(pcid: space.pcid)
    }

    public func switchAddressSpace(to space: AddressSpace, cpu: ModelCPU) {
        cpuForGuestWrites = cpu
        // CR3 writes exit (kvm_set_cr3): a cached shadow root, or a new one; unsync pages are
        // synced (kvm_mmu_sync_roots) because a CR3 write flushes the guest's TLB.
        cpu.counters.add(.exits, 1)
        cpu.ledger.charge(.vmExits, cpu.costs.vmExitRoundTrip)
        cpu.ledger.charge(.guestKernel, cpu.costs.cr3Write)
        let k = key(space.root >> 12, cpu.paging.levels, direct: false)
        if let r = index[k], pages[r].live, pages[r].isRoot {
            cpu.counters.add(.shadowRootCacheHits, 1)
            currentRoot = r
        } else {
            currentRoot = shadowPage(gfn: space.root >> 12, level: cpu.paging.levels, direct: false, cpu: cpu)
            byTable[pages[currentRoot].table] = currentRoot
        }
        noteRoot(currentRoot, cpu: cpu)
        syncAll(cpu: cpu)
        if !cpu.tlb.config.pcid { cpu.tlb.flushAll(keepGlobal: true); cpu.walkCaches.flushAll() } else {
            cpu.tlb.flush(pcid: space.pcid)
            cpu.walkCaches.flush(pcid: space.pcid)
        }
    }

    /// A full flush is a CR3 reload: intercepted, unsync pages synced, TLB flushed.
    public func flushTLB(of space: AddressSpace, cpu: ModelCPU) { switchAddressSpace(to: space, cpu: cpu) }

    /// KVM is not told when a guest process exits: its shadow pages stay (write-protecting
    /// the freed tables) until they fall out of the root cache, are recycled, or the guest's
    /// writes to the reused frames flood them.
    public func addressSpaceDestroyed(_ space: AddressSpace, cpu: ModelCPU) {}
}
