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
        var gw = GuestWalkMemory(mode: self)
        let g = PageWalker.walk(va, root: space.root, kind: kind, mode: cpu.privilege, pcid: space.pcid, config: cpu.paging, caches: nil, memory: &gw)
        cpu.ledger.charge(.hypervisorFaults, Double(gw.reads) * cpu.costs.walkRefL2)
        guard case .translated = g.kind else {
            if case .fault(let code) = g.kind {
                // A genuine guest fault: inject it (the guest kernel handles it). KVM's walk
                // and the injection are `faultInjection` (calibrated as exactly that: the
                // guest_pf benchmark less an exit and the handler's instructions); the
                // shadow-fault handler, which builds and installs sptes, does not run.
                cpu.counters.add(.pfGuest, 1)
                cpu.ledger.charge(.vmExits, cpu.costs.faultInjection)
                return .guestFault(code, refs: refs)
            }
            preconditionFailure("guest walk stopped")
        }
        cpu.ledger.charge(.hypervisorFaults, cpu.costs.shadowFaultHandler)
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
                cpu.ledger.charge(.hostFaults, cpu.costs.hostZeroPageCopy)
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
        // kvm_mmu_track_write's own work (find the gfn's shadow pages, zap the written sptes,
        // detect flooding): calibrated as the pt_write benchmark less an exit and one
        // emulated instruction.
        cpu.ledger.charge(.shadowSync, cpu.costs.shadowPTEWrite)
        logDirty?.note(gpa >> 12)
        if let v = value { host.write64(hostAddress(gpa), v) }
        let gfn = gpa >> 12
        let idx = Int((gpa & 0xfff) >> 3)
        for i in byGfn[gfn] ?? [] where pages[i].live {
            // detect_write_flooding skips level-1 pages (they can go unsync instead).
            if pages[i].level > 1 { pages[i].writeFlooding += 1 }
            if pages[i].writeFlooding >= options.floodThreshold && i != currentRoot && pages[i].isRoot {
                pages[i].isRoot = false
                cachedRoots.removeAll { $0 == i }
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
                // Unlinked, not zapped (mmu_page_zap_pte -> drop_parent_pte).
                cpu.counters.add(.mmuPdeZapped, 1)
                pages[c].parents.removeAll { $0.0 == i && $0.1 == idx }
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
            if options.guestDirectMap { directMapWrite(gfn) }
            host.write64(hostAddress(gpa), value)
            return
        }
        if options.guestDirectMap {
            directMapLinkRoot(gfn, write: true)
            // The write's walk sets D in the map's 2 MiB entry. An absent spte: FNAME(fetch)
            // installs it read-only (the gfn is shadowed) and prefetches around it, and the
            // write goes on to unsync or emulation below.
            directMapDirty.insert(gfn >> 9)
            if directMap[gfn] == nil {
                installDirectMapSPTE(gfn, writable: false)
                directMapPrefetch(gfn)
            }
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
            if options.guestDirectMap { installDirectMapSPTE(gfn, writable: true) }
            host.write64(hostAddress(gpa), value)
            return
        }
        emulatedTableWrite(gpa: gpa, cpu: cpu, value: value)
    }

    /// The guest's kernel reads `gfn` through its direct map (options.guestDirectMap): a
    /// first access is a shadow fault fixed (FNAME(page_fault) -> FNAME(fetch)). The map's
    /// 2 MiB guest entries are built with A and D clear (as the KVM engine's VMM builds them):
    /// until a write to the 2 MiB page sets D (the walk, FNAME(update_accessed_dirty_bits)),
    /// a read fault gets a read-only spte (FNAME(protect_clean_gpte)); after it, a writable
    /// one unless the gfn is a write-protected table (make_spte -> mmu_try_to_unsync_pages).
    func directMapRead(_ gfn: UInt64) {
        directMapLinkRoot(gfn, write: false)
        guard directMap[gfn] == nil, let cpu = cpuForGuestWrites else { return }
        directMapFault(cpu)
        installDirectMapSPTE(gfn, writable: directMapDirty.contains(gfn >> 9) && !(byGfn[gfn] != nil && isWriteProtected(gfn)))
        directMapPrefetch(gfn)
    }

    /// The guest's kernel writes `gfn` (not a write-protected table) through its direct map:
    /// a missing or read-only spte faults and is made writable.
    func directMapWrite(_ gfn: UInt64) {
        directMapLinkRoot(gfn, write: true)
        guard directMap[gfn] != true, let cpu = cpuForGuestWrites else { return }
        let wasAbsent = directMap[gfn] == nil
        directMapFault(cpu)
        directMapDirty.insert(gfn >> 9)
        installDirectMapSPTE(gfn, writable: true)
        if wasAbsent { directMapPrefetch(gfn) }
    }

    /// A direct-map spte installed (make_spte): W as given, and the spte's D bit with it.
    func installDirectMapSPTE(_ gfn: UInt64, writable: Bool) {
        directMap[gfn] = writable
        directMapProtectedDirty.remove(gfn)
    }

    /// The kernel's first access through its direct map under a shadow root that has not
    /// linked the map yet (a root built for a new space): the map's entry in the new root is
    /// empty, so the access faults whatever its leaf spte, and FNAME(fetch) links the map's
    /// existing shadow pages (kvm_mmu_get_shadow_page finds them) down to the leaf, where
    /// mmu_set_spte rewrites the spte from the guest walk. An absent leaf, or one the access
    /// must change anyway (a write to a read-only spte), is that access's own fault (counted
    /// by the caller). Otherwise the rewrite is RET_PF_SPURIOUS (`pf_spurious`) when make_spte
    /// gives the same spte, or fixed (`pf_fixed`, with FNAME(pte_prefetch)) when it differs: a
    /// read of a frame whose writable spte was write-protected for a shadowed table (W gone,
    /// D left) gets a clean read-only spte. Seen on kvm_pvm: after each fork the kernel's first
    /// access under the child's new root, a read of the child's PDPT frame, is a fault fixed at
    /// the same sptep (docs/validate.md, guest-fork-cow-exit's pf_fixed).
    func directMapLinkRoot(_ gfn: UInt64, write: Bool) {
        guard currentRoot >= 0, let cpu = cpuForGuestWrites, directMapLinkedRoots.insert(currentRoot).inserted,
              let present = directMap[gfn] else { return }
        let newWritable = directMapDirty.contains(gfn >> 9) && !(byGfn[gfn] != nil && isWriteProtected(gfn))
        // make_spte sets D with W; spte_write_protect keeps D.
        let oldDirty = present || directMapProtectedDirty.contains(gfn)
        if write {
            // A write to a writable spte rewrites it unchanged; to a read-only one it faults anyway.
            guard present else { return }
        } else if present != newWritable || oldDirty != newWritable {
            directMapFault(cpu)
            installDirectMapSPTE(gfn, writable: newWritable)
            directMapPrefetch(gfn)
            return
        }
        cpu.counters.add(.exits, 1)
        cpu.counters.add(.pfTaken, 1)
        cpu.counters.add(.pfSpurious, 1)
        cpu.ledger.charge(.vmExits, cpu.costs.vmExitRoundTrip)
        cpu.ledger.charge(.hypervisorFaults, cpu.costs.shadowFaultHandler)
    }

    func directMapFault(_ cpu: ModelCPU) {
        cpu.counters.add(.exits, 1)
        cpu.counters.add(.pfTaken, 1)
        cpu.counters.add(.pfFixed, 1)
        cpu.ledger.charge(.vmExits, cpu.costs.vmExitRoundTrip)
        cpu.ledger.charge(.hypervisorFaults, cpu.costs.shadowFaultHandler)
    }

    /// The direct map's sptes live in direct shadow pages (a guest 2 MiB page in 4 KiB host
    /// pages), so a fault there prefetches (__direct_pte_prefetch): the other absent sptes of
    /// its aligned group of PTE_PREFETCH_NUM (8), run by run, each run mapped from its start
    /// as far as the host already has the pages (kvm_prefetch_pages: get_user_pages_fast_only
    /// for write, so not the shared zero page); a run whose first page the host lacks ends
    /// the prefetch (direct_pte_prefetch_many returns -1). Writable like a read fault's spte,
    /// but never over a shadowed table that is not unsync (mmu_try_to_unsync_pages refuses a
    /// prefetch: -EEXIST).
    func directMapPrefetch(_ gfn: UInt64) {
        let first = gfn & ~7
        var run: [UInt64] = []
        func flush() -> Bool {
            defer { run = [] }
            guard !run.isEmpty else { return true }
            var mapped = 0
            for g in run {
                guard g < guestCapacity >> 12, backedPage(g) != nil, !zeroPageMapped.contains(g) else { break }
                installDirectMapSPTE(g, writable: directMapDirty.contains(g >> 9) && !(byGfn[g] != nil && isWriteProtected(g)))
                mapped += 1
            }
            return mapped > 0
        }
        for g in first..<(first + 8) {
            if g == gfn || directMap[g] != nil {
                if !flush() { return }
            } else {
                run.append(g)
            }
        }
        _ = flush()
    }

    /// Brings spte `idx` of unsync shadow page `i` up to date with its gpte (FNAME(sync_spte)):
    /// dropped when the gpte is not present, not accessed (FNAME(prefetch_invalid_gpte)) or
    /// maps another frame; its permissions rewritten in place when only they changed (W only
    /// for a dirty gpte, FNAME(protect_clean_gpte), and never over a shadowed table, since
    /// mmu_try_to_unsync_pages refuses while synchronizing); untouched otherwise. True when
    /// the spte changed (KVM flushes: kvm_flush_remote_tlbs_sptep).
    @discardableResult
    func syncSPTE(_ i: Int, _ idx: Int) -> Bool {
        let sp = pages[i]
        let ea = sp.table + UInt64(idx) * 8
        let e = host.read64(ea)
        guard e & 1 != 0 else { return false }
        let g = PageTableEntry(rawValue: host.read64(hostAddress((sp.gfn << 12) + UInt64(idx) * 8)))
        let hostOfGuest = g.isPresent ? backedPage(g.address >> 12) : nil
        guard g.isPresent, g.isAccessed, hostOfGuest == e & PageTableEntry.addressMask else {
            dropLeaf(ea, entry: e, level: 1)
            host.write64(ea, 0)
            return true
        }
        let oldWriteAccess = e & (2 | Self.mmuWritableBit) != 0
        let newWriteAccess = g.isWritable && g.isDirty
        let oldUser = e & 4 != 0, oldNX = e & (1 << 63) != 0
        if oldWriteAccess == newWriteAccess && oldUser == g.isUser && oldNX == g.isNoExecute { return false }
        var n = e & ~(2 | 4 | Self.mmuWritableBit | (1 << 63))
        if g.isUser { n |= 4 }
        if g.isNoExecute { n |= 1 << 63 }
        if newWriteAccess && !(byGfn[g.address >> 12] != nil && isWriteProtected(g.address >> 12)) {
            // make_spte keeps a writable spte writable; else W only where no table is shadowed.
            n |= Self.mmuWritableBit
            n |= 2
        }
        host.write64(ea, n)
        return true
    }

    /// The guest kernel starts a string write (`rep stosq` zeroing or `rep movsq` copying a
    /// frame) to `gfn`. If the gfn is a shadowed table its first store faults:
    /// - only leaf (level-1) shadow pages: they go unsync (mmu_try_to_unsync_pages), one fault,
    ///   and the string runs natively;
    /// - an upper-level page (write-tracked, kvm_gfn_is_write_tracked): the fault goes to the
    ///   emulator (`pf_emulate`), which unprotects the gfn and lets the string run again
    ///   natively, or, for a root in use, runs the whole string itself (below).
    func stringWrite(_ gfn: UInt64) {
        guard let cpu = cpuForGuestWrites, byGfn[gfn] != nil, isWriteProtected(gfn) else {
            if options.guestDirectMap { directMapWrite(gfn) }
            return
        }
        let sps = byGfn[gfn]!
        if options.unsync && sps.allSatisfy({ pages[$0].level == 1 }) {
            // The unsync path of a single store (value rewritten by the string after it).
            guestWrite(gfn << 12, host.read64(hostAddress(gfn << 12)))
            return
        }
        cpu.counters.add(.exits, 1)
        cpu.counters.add(.pfTaken, 1)
        cpu.counters.add(.pfEmulate, 1)
        cpu.counters.add(.insnEmulation, 1)
        cpu.ledger.charge(.vmExits, cpu.costs.vmExitRoundTrip)
        cpu.ledger.charge(.emulation, cpu.costs.instructionEmulation)
        if options.guestDirectMap {
            directMapLinkRoot(gfn, write: true)
            directMapDirty.insert(gfn >> 9)
            if directMap[gfn] == nil {
                installDirectMapSPTE(gfn, writable: false)
                directMapPrefetch(gfn)
            }
        }
        // x86_emulate_instruction (EMULTYPE_ALLOW_RETRY_PF, and `stos`/`movs` are not
        // page-table-writing instructions): KVM first tries kvm_mmu_unprotect_gfn_and_retry,
        // which zaps every shadow page of the gfn and lets the guest re-execute the string
        // natively when the zap put a page on the invalid list. A root still in use (the
        // current or a cached previous root, root_count > 0: __kvm_mmu_prepare_zap_page only
        // unlinks it) goes on no list, so the retry is refused and the whole string is
        // emulated, one tracked write per element (kvm_mmu_track_write: `mmu_pte_write`).
        // Seen on kvm_pvm with kvmmmu tracepoints (docs/validate.md, guest-fork-cow-exit).
        let rootInUse = sps.contains { pages[$0].live && (pages[$0].isRoot || $0 == currentRoot) }
        if rootInUse {
            let writes = UInt64(4096 / Self.stringWriteElement)
            cpu.counters.add(.mmuPteWrite, writes)
            // Per element: CostModel.stringStoreElement (kvm calibrate: string_root_per_element).
            cpu.ledger.charge(.shadowSync, Double(writes) * cpu.costs.stringStoreElement)
        }
        for i in sps where pages[i].live {
            if pages[i].isRoot && i != currentRoot {
                pages[i].isRoot = false
                cachedRoots.removeAll { $0 == i }
            }
            if i != currentRoot { zap(i, cpu: cpu) }
        }
        // The retried string's native stores: the frame's direct-map spte is still read-only
        // (write-protected while it was a table), so the first one faults; the gfn is no longer
        // write-tracked (unaccount_shadowed with its last shadow page), so FNAME(page_fault)
        // maps it writable (`pf_fixed`). In the trace: the prepare_zap, then a fault at the
        // frame's direct-map address and a writable set_spte.
        if !rootInUse && options.guestDirectMap { directMapWrite(gfn) }
    }

    /// Bytes per emulated write when KVM emulates a guest string store: the emulator runs
    /// `rep stosq`/`rep movsq` one 8-byte element per iteration (em_mov, string_addr_inc).
    static let stringWriteElement = 8

    /// Shadows guest table `gfn` at `level` now (kvm_mmu_get_shadow_page), as KVM has shadowed
    /// a table before a measured phase because the guest ran through it (the KVM guest's
    /// runtime lives under its PDPT): the table is write-protected from here on.
    public func shadowGuestTable(gfn: UInt64, level: Int, cpu: ModelCPU) {
        cpuForGuestWrites = cpu
        _ = shadowPage(gfn: gfn, level: level, direct: false, cpu: cpu)
    }

    /// Resynchronizes an unsync shadow page with its guest table (kvm_sync_page: every spte
    /// through FNAME(sync_spte)); then, unless `keepUnsync` (kvm_mmu_find_shadow_page syncs a
    /// page it links anew but leaves it unsync), the page is sync again and its guest table
    /// write-protected (mmu_sync_children: kvm_vcpu_write_protect_gfn, kvm_unlink_unsync_page).
    func sync(_ i: Int, cpu: ModelCPU, keepUnsync: Bool = false) {
        guard pages[i].live, pages[i].unsync else { return }
        cpu.counters.add(.shadowResyncs, 1)
        cpu.ledger.charge(.shadowSync, cpu.costs.shadowResync)
        for idx in 0..<512 { syncSPTE(i, idx) }
        if !keepUnsync {
            pages[i].unsync = false
            unsyncCount -= 1
            writeProtect(gfn: pages[i].gfn, cpu: cpu)
        }
        flushTLBs(cpu)
    }

    /// Every unsync page reachable from the current root is synced (kvm_mmu_sync_roots walks
    /// the root's unsync children only; pages reachable only from other roots stay unsync).
    func syncRoots(cpu: ModelCPU) {
        guard unsyncCount > 0, currentRoot >= 0 else { return }
        for i in pages.indices where pages[i].live && pages[i].unsync && reachesCurrentRoot(i) { sync(i, cpu: cpu) }
    }

    func reachesCurrentRoot(_ i: Int) -> Bool {
        var stack = [i]
        var seen: Set<Int> = [i]
        while let p = stack.popLast() {
            if p == currentRoot { return true }
            for (q, _) in pages[p].parents where pages[q].live && seen.insert(q).inserted { stack.append(q) }
        }
        return false
    }

    public func invalidatePage(_ va: UInt64, space: AddressSpace, cpu: ModelCPU) {
        // INVLPG is intercepted under shadow paging (kvm_mmu_invlpg).
        cpu.counters.add(.exits, 1)
        cpu.counters.add(.invlpg, 1)
        cpu.ledger.charge(.vmExits, cpu.costs.vmExitRoundTrip)
        cpu.ledger.charge(.shadowSync, cpu.costs.invlpgHandler)
        // __kvm_mmu_invalidate_addr: on va's path in the current root, an unsync page's spte
        // for va is synced alone (kvm_sync_spte); the page stays unsync. A sync page needs
        // nothing: every write to its table was emulated and already zapped the spte.
        if currentRoot >= 0 {
            let s = TableWalk.descend(.paging, root: pages[currentRoot].table, levels: cpu.paging.levels, address: va) { host.read64($0) }
            if let s, s.isLeaf, let sp = byTable[s.entryAddress & ~0xfff], pages[sp].unsync, pages[sp].level == 1 {
                if syncSPTE(sp, Int((s.entryAddress & 0xfff) >> 3)) { flushTLBs(cpu) }
            }
        }
        cpu.tlb.invalidatePage(va, pcid: space.pcid)
        cpu.walkCaches.flush(pcid: space.pcid)
    }

    public func switchAddressSpace(to space: AddressSpace, cpu: ModelCPU) {
        // With PCIDs the guest loads CR3 with the no-flush bit, except for a reused PCID.
        loadCR3(space, noFlush: cpu.tlb.config.pcid && !space.flushOnFirstLoad, cpu: cpu)
    }

    /// A guest CR3 write (kvm_set_cr3). It exits; a different root is found among the cached
    /// ones (fast_pgd_switch: the current root and KVM_MMU_NUM_PREV_ROOTS = 3 previous), or in
    /// the shadow-page hash, or built (kvm_mmu_get_shadow_page). Without the PCID no-flush bit
    /// KVM invalidates the PCID (kvm_invalidate_pcid): KVM_REQ_MMU_SYNC (kvm_mmu_sync_roots) and
    /// KVM_REQ_TLB_FLUSH_CURRENT (`tlb_flush`); with it, neither.
    func loadCR3(_ space: AddressSpace, noFlush: Bool, cpu: ModelCPU) {
        cpuForGuestWrites = cpu
        cpu.counters.add(.exits, 1)
        cpu.ledger.charge(.vmExits, cpu.costs.vmExitRoundTrip)
        cpu.ledger.charge(.shadowSync, cpu.costs.cr3SwitchHandler)
        let k = key(space.root >> 12, cpu.paging.levels, direct: false)
        if currentRoot >= 0, pages[currentRoot].live, index[k] == currentRoot {
            // The same CR3: no new pgd.
        } else if let r = index[k], pages[r].live, pages[r].isRoot {
            cpu.counters.add(.shadowRootCacheHits, 1)
            currentRoot = r
        } else {
            let existed = index[k].map { pages[$0].live } ?? false
            currentRoot = shadowPage(gfn: space.root >> 12, level: cpu.paging.levels, direct: false, cpu: cpu)
            byTable[pages[currentRoot].table] = currentRoot
            if options.sharedRuntimeSubtree && !existed {
                cpu.counters.add(.exits, 1)
                cpu.counters.add(.pfTaken, 1)
                cpu.counters.add(.pfSpurious, 1)
                cpu.ledger.charge(.vmExits, cpu.costs.vmExitRoundTrip)
                cpu.ledger.charge(.hypervisorFaults, cpu.costs.shadowFaultHandler)
            }
        }
        noteRoot(currentRoot, cpu: cpu)
        pages[currentRoot].writeFlooding = 0
        if noFlush { return }
        syncRoots(cpu: cpu)
        cpu.counters.add(.tlbFlush, 1)
        if !cpu.tlb.config.pcid { cpu.tlb.flushAll(keepGlobal: true); cpu.walkCaches.flushAll() } else {
            cpu.tlb.flush(pcid: space.pcid)
            cpu.walkCaches.flush(pcid: space.pcid)
        }
    }

    /// A full flush is a CR3 reload without the no-flush bit.
    public func flushTLB(of space: AddressSpace, cpu: ModelCPU) { loadCR3(space, noFlush: false, cpu: cpu) }

    /// KVM is not told when a guest process exits: its shadow pages stay (write-protecting
    /// the freed tables) until they fall out of the root cache, are recycled, or the guest's
    /// writes to the reused frames flood them.
    public func addressSpaceDestroyed(_ space: AddressSpace, cpu: ModelCPU) {}
}
