import MemVirtCore

/// Shadow paging as KVM's shadow MMU does it (arch/x86/kvm/mmu/mmu.c, paging_tmpl.h).
///
/// The guest's page tables translate guest-virtual to guest-physical, but the CPU walks
/// *shadow* tables, built by the hypervisor in host memory, that translate guest-virtual
/// straight to host-physical. Shadow tables are filled on faults: a shadow entry that is not
/// present makes the hardware walk fault, the fault exits to the hypervisor (`pf_taken`), which
/// walks the guest's tables in software (FNAME(walk_addr), setting guest A/D bits). A guest
/// fault found there is injected into the guest (`pf_guest`); otherwise the hypervisor builds
/// the missing shadow pages, maps the data frame (gfn_to_pfn, a fresh host frame on first
/// touch) and installs the shadow entry: a hidden fault fixed (`pf_fixed`).
///
/// To stay in sync, every guest page-table page that has a shadow page is write-protected:
/// a guest write to it traps and is emulated (`mmu_pte_write`), and the shadow entry it
/// shadows is zapped. A table written repeatedly without being used is unshadowed
/// (`mmu_flooded`). Leaf tables may instead go *unsync*: the guest writes them freely and the
/// hypervisor resynchronizes them when the guest flushes its TLB (INVLPG, CR3 write), as KVM
/// does (`mmu_unsync`). CR3 writes are intercepted and served from a cache of shadow roots.
/// Shadow pages beyond a limit are recycled (`mmu_recycled`, `mmu_shadow_zapped`). The Xen
/// style alternative, dropping every shadow at once, is `dropAllShadows()`.
public final class ShadowPaging: PagingMode {
    /// One shadow page-table page.
    struct ShadowPage {
        /// Host-physical address of its 512 shadow entries.
        var table: UInt64
        /// The guest table it shadows (gfn), or for a direct page the first gfn it maps.
        var gfn: UInt64
        var level: Int
        /// Maps a guest large page in smaller pieces; shadows no guest table.
        var direct: Bool
        var unsync = false
        var writeFlooding = 0
        /// (parent shadow page, entry index) links pointing at this page.
        var parents: [(Int, Int)] = []
        var live = true
        var isRoot = false
        var lastUse: UInt64 = 0
        /// Neighbours in the use list (toward the most and the least recently used; -1 at ends).
        var newer = -1
        var older = -1
    }

    public struct Options: Sendable {
        /// Let leaf shadow pages go unsync instead of emulating every write (KVM default).
        public var unsync = true
        /// Writes to a shadowed table, without the table being used in between, before it is
        /// unshadowed (KVM: `detect_write_flooding`, count >= 3).
        public var floodThreshold = 3
        /// Maximum shadow pages before recycling; 0 = 2% of guest pages, KVM's default
        /// (KVM_PERMILLE_MMU_PAGES 20), at least 64 (KVM_MIN_ALLOC_MMU_PAGES).
        public var maxShadowPages = 0
        public init() {}
    }

    public let host: PhysicalMemory
    public var hostFrames: FrameAllocator
    public let hostPageSize: PageSize
    public let options: Options
    let guestCapacity: UInt64
    /// gfn -> host-physical page base (0 = not backed yet): the memslot plus the host's page
    /// tables in one flat array (8 bytes per 4 KiB guest frame, lazily backed).
    let p2m: PhysicalMemory
    var pages: [ShadowPage] = []
    var freeSlots: [Int] = []
    /// (gfn << 4 | level << 1 | direct) -> shadow page index.
    var index: [UInt64: Int] = [:]
    /// gfn -> shadow pages shadowing that guest table (write-protected while any is sync).
    var byGfn: [UInt64: [Int]] = [:]
    /// (first gfn, level) -> host addresses of leaf shadow entries mapping from it (KVM's rmap,
    /// one per level as KVM's `arch.rmap[level]`); keys from `rmapKey`.
    var rmap: [UInt64: [UInt64]] = [:]
    /// The rmap key of a leaf at `level` (1 = 4 KiB) whose mapping starts at `gfn`: the gfn
    /// itself for 4 KiB leaves, so `rmap[gfn]` lists a 4 KiB page's sptes.
    @inline(__always) func rmapKey(_ gfn: UInt64, level: Int) -> UInt64 { level == 1 ? gfn : gfn | UInt64(level) << 56 }
    var unsyncCount = 0
    var liveCount = 0
    var useClock: UInt64 = 0
    /// Live shadow pages by last use, as an intrusive list (KVM's active_mmu_pages): the most
    /// recently used at `newest`, the recycling victim found from `oldest` in O(1) (roots skipped).
    var newest = -1
    var oldest = -1
    /// Shadow pages looked at by `recycle` (for the test that it does not scan them all).
    var recycleSteps: UInt64 = 0
    public private(set) var maxShadowPages: Int
    var currentRoot = -1
    unowned(unsafe) var cpuForGuestWrites: ModelCPU?
    let guestView: ShadowGuestMemory

    // Counted here, folded into the CPU's counters by `settle`.
    var hostFaults: UInt64 = 0
    var leafCounts: [Int64] = [0, 0, 0]
    /// Log-dirty state while a migration tracks dirty pages (ShadowDirtyTracking.swift).
    var logDirty: ShadowLogDirty?
    /// The tracking totals of the last logging session, kept after it stops.
    var logDirtyStatsAfterStop = DirtyTrackingStats()
    /// The style `DirtyTracker.startLogging` uses: Xen's drop-all (true) or KVM's rmap
    /// write-protection (false).
    public var logDirtyXenStyle = false
    /// A software-available spte bit (bits 52-58 are ignored by the MMU, SDM 4.5): set when the
    /// guest allows the write and the gfn is no shadowed table, so W may be restored without
    /// a guest walk (KVM's shadow_mmu_writable_mask, used by fast_page_fault).
    static let mmuWritableBit: UInt64 = 1 << 54

    public init(guestCapacity: UInt64, hostPageSize: PageSize = .size4K, options: Options = Options()) throws(InputError) {
        self.guestCapacity = guestCapacity
        self.hostPageSize = hostPageSize
        self.options = options
        let capacity = guestCapacity + (2 << 30)
        host = try PhysicalMemory(capacity: capacity, name: "host-physical")
        hostFrames = FrameAllocator(capacity: capacity)
        p2m = try PhysicalMemory(capacity: (guestCapacity >> 12) * 8, name: "p2m")
        let pct = Int(guestCapacity >> 12) * 20 / 1000
        maxShadowPages = options.maxShadowPages > 0 ? options.maxShadowPages : max(64, pct)
        guestView = ShadowGuestMemory()
        guestView.owner = self
    }

    public var name: String { "shadow" }
    public var applicableCounters: [Counter] {
        [.pfTaken, .pfFixed, .pfGuest, .pfEmulate, .exits, .invlpg, .tlbFlush, .insnEmulation, .mmuShadowZapped, .mmuPteWrite,
         .mmuPdeZapped, .mmuFlooded, .mmuRecycled, .mmuCacheMiss, .mmuUnsync, .pages4K, .pages2M, .pages1G,
         .shadowPagesCreated, .shadowRootCacheHits, .shadowResyncs, .hostMinorFaults]
    }
    public var dataMemory: PhysicalMemory { host }
    public var guestMemory: GuestPhysicalMemory { guestView }

    // MARK: guest-physical to host-physical

    /// Host-physical address of `gpa`, backing its host page on first touch (gfn_to_pfn).
    func hostAddress(_ gpa: UInt64) -> UInt64 {
        let gfn = gpa >> 12
        precondition(gpa < guestCapacity, "guest-physical address beyond guest memory")
        var page = p2m.read64(gfn << 3)
        if page == 0 {
            let size = hostPageSize
            guard let frame = hostFrames.allocate(size) else { preconditionFailure("host memory exhausted") }
            host.zero(frame, bytes: size.bytes)
            hostFaults &+= 1
            cpuForGuestWrites?.ledger.charge(.hostFaults, cpuForGuestWrites!.costs.demandZero(size))
            let first = (gpa & ~size.offsetMask) >> 12
            for i in 0..<size.frames { p2m.write64((first + i) << 3, frame + (i << 12)) }
            page = p2m.read64(gfn << 3)
        }
        return page | (gpa & 0xfff)
    }

    /// Host page base of `gfn` if backed.
    func backedPage(_ gfn: UInt64) -> UInt64? {
        let p = p2m.read64(gfn << 3)
        return p == 0 ? nil : p
    }

    // MARK: shadow pages

    func key(_ gfn: UInt64, _ level: Int, direct: Bool) -> UInt64 { gfn << 4 | UInt64(level) << 1 | (direct ? 1 : 0) }

    /// The shadow page for guest table `gfn` at `level` (kvm_mmu_get_page), created and the
    /// guest table write-protected if missing.
    func shadowPage(gfn: UInt64, level: Int, direct: Bool, cpu: ModelCPU) -> Int {
        if let i = index[key(gfn, level, direct: direct)] {
            // An unsync page is brought up to date before it is linked anywhere new, but stays
            // unsync until the guest flushes its TLB (kvm_mmu_find_shadow_page).
            if pages[i].unsync { sync(i, cpu: cpu, keepUnsync: true) }
            touch(i)
            pages[i].writeFlooding = 0
            return i
        }
        cpu.counters.add(.mmuCacheMiss, 1)
        cpu.counters.add(.shadowPagesCreated, 1)
        cpu.ledger.charge(.shadowSync, cpu.costs.shadowPageCreate)
        if liveCount >= maxShadowPages { recycle(cpu: cpu) }
        guard let table = hostFrames.allocate(.size4K) else { preconditionFailure("host memory exhausted for shadow pages") }
        host.zero(table, bytes: 4096)
        useClock &+= 1
        let sp = ShadowPage(table: table, gfn: gfn, level: level, direct: direct, lastUse: useClock)
        let i: Int
        if let f = freeSlots.popLast() { pages[f] = sp; i = f } else { pages.append(sp); i = pages.count - 1 }
        linkNewest(i)
        index[key(gfn, level, direct: direct)] = i
        byTable[table] = i
        liveCount += 1
        if !direct {
            byGfn[gfn, default: []].append(i)
            // Write-protect the guest table: any writable leaf mapping of it loses W.
            writeProtect(gfn: gfn, cpu: cpu)
        }
        return i
    }

    /// Clears W in every leaf shadow entry mapping `gfn` (rmap walk): its 4 KiB sptes and the
    /// 2 MiB and 1 GiB sptes whose mapping contains it (kvm_mmu_slot_gfn_write_protect walks
    /// the rmap of every level).
    func writeProtect(gfn: UInt64, cpu: ModelCPU) {
        var flushed = false
        for level in 1...3 {
            let first = gfn & ~(PageSize(leafLevel: level)!.frames - 1)
            guard let sptes = rmap[rmapKey(first, level: level)] else { continue }
            for a in sptes {
                let e = host.read64(a)
                if e & 1 != 0 && e & (2 | Self.mmuWritableBit) != 0 {
                    host.write64(a, e & ~(2 | Self.mmuWritableBit))
                    if e & 2 != 0 { flushed = true }
                }
            }
        }
        if flushed { flushTLBs(cpu) }
    }

    func isWriteProtected(_ gfn: UInt64) -> Bool {
        guard let sps = byGfn[gfn] else { return false }
        return sps.contains { !pages[$0].unsync }
    }

    func flushTLBs(_ cpu: ModelCPU) {
        cpu.tlb.flushAll(keepGlobal: false)
        cpu.walkCaches.flushAll()
        cpu.counters.add(.tlbFlush, 1)
    }

    /// Zaps shadow page `i`: unlinks it from its parents, drops its entries (children lose
    /// this parent and are zapped when no parent is left), frees its table.
    func zap(_ i: Int, cpu: ModelCPU) {
        guard pages[i].live else { return }
        let sp = pages[i]
        pages[i].live = false
        cpu.counters.add(.mmuShadowZapped, 1)
        for (p, idx) in sp.parents where pages[p].live {
            host.write64(pages[p].table + UInt64(idx) * 8, 0)
        }
        for idx in 0..<512 {
            let a = sp.table + UInt64(idx) * 8
            let e = host.read64(a)
            if e & 1 == 0 { continue }
            let leaf = sp.level == 1 || e & 0x80 != 0
            if leaf {
                dropLeaf(a, entry: e, level: sp.level)
            } else if let c = childIndex(of: e) {
                pages[c].parents.removeAll { $0.0 == i && $0.1 == idx }
                if pages[c].parents.isEmpty && !pages[c].isRoot { zap(c, cpu: cpu) }
            }
        }
        index[key(sp.gfn, sp.level, direct: sp.direct)] = nil
        if !sp.direct {
            byGfn[sp.gfn]?.removeAll { $0 == i }
            if byGfn[sp.gfn]?.isEmpty == true { byGfn[sp.gfn] = nil }
        }
        if sp.unsync { unsyncCount -= 1 }
        cachedRoots.removeAll { $0 == i }
        byTable[sp.table] = nil
        hostFrames.free(sp.table, .size4K)
        unlink(i)
        freeSlots.append(i)
        liveCount -= 1
        if currentRoot == i { currentRoot = -1 }
        flushTLBs(cpu)
    }

    /// Shadow table address -> shadow page index (children are found through this map).
    var byTable: [UInt64: Int] = [:]
    func childIndex(of entry: UInt64) -> Int? { byTable[entry & PageTableEntry.addressMask] }

    func dropLeaf(_ address: UInt64, entry: UInt64, level: Int) {
        let gfn = gfnOfHost[(entry & PageTableEntry.addressMask) >> 12] ?? 0
        rmap[rmapKey(gfn, level: level)]?.removeAll { $0 == address }
        leafCounts[level - 1] -= 1
    }

    /// Host frame -> gfn, for rmap maintenance.
    var gfnOfHost: [UInt64: UInt64] = [:]

    /// Marks page `i` used now: it moves to the newest end of the use list.
    @inline(__always) func touch(_ i: Int) {
        useClock &+= 1
        pages[i].lastUse = useClock
        if newest != i {
            unlink(i)
            linkNewest(i)
        }
    }

    func linkNewest(_ i: Int) {
        pages[i].older = newest
        pages[i].newer = -1
        if newest >= 0 { pages[newest].newer = i }
        newest = i
        if oldest < 0 { oldest = i }
    }

    func unlink(_ i: Int) {
        let n = pages[i].newer, o = pages[i].older
        if n >= 0 { pages[n].older = o } else { newest = o }
        if o >= 0 { pages[o].newer = n } else { oldest = n }
        pages[i].newer = -1
        pages[i].older = -1
    }

    /// Recycles the least recently used non-root shadow page (kvm_mmu_zap_oldest_mmu_pages),
    /// taken from the old end of the use list: only roots (a handful) are stepped over.
    func recycle(cpu: ModelCPU) {
        var victim = oldest
        recycleSteps &+= 1
        while victim >= 0 && pages[victim].isRoot {
            victim = pages[victim].newer
            recycleSteps &+= 1
        }
        if victim >= 0 {
            cpu.counters.add(.mmuRecycled, 1)
            zap(victim, cpu: cpu)
        }
    }

    /// Xen-style: drop every shadow page (roots are rebuilt empty) and flush the TLBs. The
    /// next accesses re-shadow everything through faults.
    public func dropAllShadows(cpu: ModelCPU) {
        for i in pages.indices where pages[i].live && !pages[i].isRoot { zap(i, cpu: cpu) }
        for i in pages.indices where pages[i].live && pages[i].isRoot {
            for idx in 0..<512 { host.write64(pages[i].table + UInt64(idx) * 8, 0) }
        }
        flushTLBs(cpu)
    }

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
        let hostBase = hostAddress(leafGPA & ~mapSize.offsetMask) & ~mapSize.offsetMask
        for i in 0..<mapSize.frames { gfnOfHost[(hostBase >> 12) + i] = ((leafGPA & ~mapSize.offsetMask) >> 12) + i }
        let idx = GuestVirtualAddress(va).tableIndex(level: level)
        let ea = pages[sp].table + UInt64(idx) * 8
        let old = host.read64(ea)
        var spte = hostBase | 0x1 | 0x20
        if g.entry.user { spte |= 0x4 }
        // Writable only if the guest allows it, its D bit is set (or this is the write that
        // sets it), and no page of the mapping is a shadowed guest table.
        if g.entry.writable && (g.entry.dirty || write) && !mappingHoldsTable(leafGPA & ~mapSize.offsetMask, mapSize) {
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
            var sp = currentRoot
            var level = cpu.paging.levels
            while level > 1 {
                let e = host.read64(pages[sp].table + UInt64(GuestVirtualAddress(va).tableIndex(level: level)) * 8)
                guard e & 1 != 0, e & 0x80 == 0, let c = childIndex(of: e) else { break }
                sp = c
                level -= 1
            }
            let ea = pages[sp].table + UInt64(GuestVirtualAddress(va).tableIndex(level: level)) * 8
            let e = host.read64(ea)
            if e & 1 != 0 && (level == 1 || e & 0x80 != 0) {
                dropLeaf(ea, entry: e, level: level)
                host.write64(ea, 0)
            }
            if pages[sp].unsync { sync(sp, cpu: cpu) }
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

    /// The current root and up to 3 previous ones stay cached (KVM_MMU_NUM_PREV_ROOTS = 3).
    var cachedRoots: [Int] = []
    static let cachedRootLimit = 4

    func noteRoot(_ r: Int, cpu: ModelCPU) {
        cachedRoots.removeAll { $0 == r }
        cachedRoots.insert(r, at: 0)
        pages[r].isRoot = true
        while cachedRoots.count > Self.cachedRootLimit {
            let old = cachedRoots.removeLast()
            pages[old].isRoot = false
            zap(old, cpu: cpu)
        }
    }

    public func settle(cpu: ModelCPU) {
        cpu.counters.add(.hostMinorFaults, hostFaults)
        hostFaults = 0
        cpu.counters[.mmuUnsync] = UInt64(unsyncCount)
        cpu.counters[.pages4K] = UInt64(max(0, leafCounts[0]))
        cpu.counters[.pages2M] = UInt64(max(0, leafCounts[1]))
        cpu.counters[.pages1G] = UInt64(max(0, leafCounts[2]))
    }

    // MARK: inspection (tests)

    /// Every present leaf shadow entry reachable from the current root: (va page, host page, W,
    /// U, NX, size, whether its shadow page is unsync: those may lag the guest until a flush).
    public func shadowLeaves(levels: Int) -> [(va: UInt64, hostPage: UInt64, writable: Bool, user: Bool, noExecute: Bool, size: PageSize, unsync: Bool)] {
        guard currentRoot >= 0 else { return [] }
        var out: [(UInt64, UInt64, Bool, Bool, Bool, PageSize, Bool)] = []
        func visit(_ table: UInt64, _ level: Int, _ vaBase: UInt64) {
            let unsync = byTable[table].map { pages[$0].unsync } ?? false
            for idx in 0..<512 {
                let e = host.read64(table + UInt64(idx) * 8)
                guard e & 1 != 0 else { continue }
                var va = vaBase | (UInt64(idx) << UInt64(12 + 9 * (level - 1)))
                if level == levels && idx >= 256 { va |= levels == 5 ? 0xFE00_0000_0000_0000 : 0xFFFF_0000_0000_0000 }
                if level == 1 || e & 0x80 != 0 {
                    let size = PageSize(leafLevel: level)!
                    out.append((va, e & PageTableEntry.addressMask & ~size.offsetMask, e & 2 != 0, e & 4 != 0, e & (1 << 63) != 0, size, unsync))
                } else {
                    visit(e & PageTableEntry.addressMask, level - 1, va)
                }
            }
        }
        visit(pages[currentRoot].table, levels, 0)
        return out
    }

    /// Live shadow pages now.
    public var shadowPageCount: Int { liveCount }
}

/// Guest-physical memory as a shadow-paged guest's kernel sees it: reads through the p2m;
/// writes to write-protected page tables trap (emulated or unsync).
public final class ShadowGuestMemory: GuestPhysicalMemory {
    weak var owner: ShadowPaging?
    init() {}
    public func read64(_ gpa: UInt64) -> UInt64 { owner!.host.read64(owner!.hostAddress(gpa)) }
    public func write64(_ gpa: UInt64, _ value: UInt64) { owner!.guestWrite(gpa, value) }
    public func writePageTableEntry(_ gpa: UInt64, _ value: UInt64) { owner!.guestWrite(gpa, value) }
    public func zero(_ gpa: UInt64, bytes: UInt64) {
        let o = owner!
        var a = gpa
        while a < gpa + bytes {
            let gfn = a >> 12
            o.logDirty?.note(gfn)
            if o.byGfn[gfn] != nil && o.isWriteProtected(gfn) {
                // Clearing a page that is still a shadowed table (a freed table reused): the
                // first writes trap and are emulated until write flooding unshadows it.
                var n = 0
                while o.byGfn[gfn] != nil && o.isWriteProtected(gfn) && n < 8 {
                    o.guestWrite(a, 0)
                    a += 8
                    n += 1
                }
                continue
            }
            let chunk = min(4096 - (a & 4095), gpa + bytes - a)
            o.host.zero(o.hostAddress(a), bytes: chunk)
            a += chunk
        }
    }
}
