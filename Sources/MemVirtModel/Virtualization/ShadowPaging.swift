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
        /// Guest RAM is anonymous host memory with 4 KiB pages: a read fault on a page the host
        /// never touched maps the host's shared zero page (KVM's hva_to_pfn takes a read-only
        /// get_user_pages for a read fault; do_anonymous_page maps the zero page), and the first
        /// guest write copies it (wp_page_copy) inside KVM's fault, whose mmu notifier zaps the
        /// spte and flushes (kvm_mmu_notifier_invalidate_range_start, `tlb_flush`), so the
        /// fault is retried (FNAME(page_fault): is_page_fault_stale, RET_PF_RETRY: `pf_taken`
        /// without `pf_fixed`) and taken again. Off by default (the model's other runs back a
        /// fresh page on any first touch).
        public var hostZeroPage = false
        /// The guest kernel reaches guest-physical memory through a direct map of its own (as
        /// Linux's physmap, or the KVM engine's page-table-editing guest: 2 MiB guest pages at
        /// PML4[1], shared by every address space): its zeroing, copying and page-table writes
        /// are guest accesses that KVM shadows like any other. A first access to a frame
        /// through the map is a shadow fault (`pf_fixed`), and a frame that becomes a shadowed
        /// table loses W in the map (account_shadowed -> kvm_mmu_slot_gfn_write_protect), so
        /// the kernel's next write to it faults (unsync or emulation). Off by default (the
        /// kernel's accesses are free of translation, as in the model's other runs).
        public var guestDirectMap = false
        /// The guest's own code and data (the KVM engine's runtime) sit in a subtree shared by
        /// every address space (a PDPT entry copied at fork), which the model does not run: on
        /// a new shadow root the guest's first instruction faults once, and FNAME(fetch) links
        /// the existing lower shadow pages down to an unchanged leaf spte (RET_PF_SPURIOUS:
        /// `pf_spurious`, `pf_taken`). Off by default.
        public var sharedRuntimeSubtree = false
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
    /// With `options.hostZeroPage`: gfns mapped (read-only) on the host's zero page.
    var zeroPageMapped: Set<UInt64> = []
    /// Set while backing a page for a zero-page read map: no clear is charged (the zero page
    /// is shared, nothing is cleared until the copy).
    var backingZeroPageMap = false
    var leafCounts: [Int64] = [0, 0, 0]
    /// A resident limit on guest RAM served by a userfaultfd-style pager (Host/ShadowResidentPager.swift).
    var residentPager: ShadowResidentPager?
    /// KSM's merged frames, mapped read-only, copied on write (Host/ShadowKSM.swift).
    var ksmState: ShadowKSM?
    /// With `options.guestDirectMap`: gfn -> the direct map's spte for it is present and
    /// writable (true) or present read-only (false); absent: no spte yet.
    var directMap: [UInt64: Bool] = [:]
    /// 2 MiB pages of the direct map whose guest entry has D set (gfn >> 9).
    var directMapDirty: Set<UInt64> = []
    /// With `options.guestDirectMap`: gfns whose direct-map spte is read-only because a table
    /// was shadowed there after it was writable (spte_write_protect clears W but leaves the
    /// spte's D bit, which make_spte sets with W), so a refault's spte differs from it.
    var directMapProtectedDirty: Set<UInt64> = []
    /// With `options.guestDirectMap`: shadow roots whose entry for the direct map is linked
    /// (a new root has none until the kernel's first access through the map faults).
    var directMapLinkedRoots: Set<Int> = []
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
        [.pfTaken, .pfFixed, .pfGuest, .pfEmulate, .pfSpurious, .exits, .invlpg, .tlbFlush, .insnEmulation, .mmuShadowZapped, .mmuPteWrite,
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
        if page == 0, let pager = residentPager, pager.manages(gfn) { return pager.pageIn(gfn, mode: self) | (gpa & 0xfff) }
        if page == 0 {
            let size = hostPageSize
            guard let frame = hostFrames.allocate(size) else { preconditionFailure("host memory exhausted") }
            host.zero(frame, bytes: size.bytes)
            hostFaults &+= 1
            if !backingZeroPageMap { cpuForGuestWrites?.ledger.charge(.hostFaults, cpuForGuestWrites!.costs.hostDemandZero(size)) }
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
        if directMap[gfn] == true {
            directMap[gfn] = false
            directMapProtectedDirty.insert(gfn)
            flushed = true
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
                // The child is only unlinked (mmu_page_zap_pte -> drop_parent_pte): under
                // shadow paging KVM keeps a parentless shadow page hashed (it recursively zaps
                // only nested-TDP children), to be found again, recycled or flooded; but the
                // unsync pages below it are zapped first (__kvm_mmu_prepare_zap_page ->
                // mmu_zap_unsync_children).
                zapUnsyncDescendants(c, cpu: cpu)
                pages[c].parents.removeAll { $0.0 == i && $0.1 == idx }
            }
        }
        index[key(sp.gfn, sp.level, direct: sp.direct)] = nil
        if !sp.direct {
            byGfn[sp.gfn]?.removeAll { $0 == i }
            if byGfn[sp.gfn]?.isEmpty == true { byGfn[sp.gfn] = nil }
        }
        if sp.unsync { unsyncCount -= 1 }
        cachedRoots.removeAll { $0 == i }
        directMapLinkedRoots.remove(i)
        byTable[sp.table] = nil
        hostFrames.free(sp.table, .size4K)
        unlink(i)
        freeSlots.append(i)
        liveCount -= 1
        if currentRoot == i { currentRoot = -1 }
        flushTLBs(cpu)
    }

    /// Zaps the unsync pages at or below `c` (mmu_zap_unsync_children walks the unsync-child
    /// marks down through sync upper pages).
    func zapUnsyncDescendants(_ c: Int, cpu: ModelCPU) {
        guard pages[c].live else { return }
        if pages[c].unsync { zap(c, cpu: cpu); return }
        guard pages[c].level > 1 else { return }
        for idx in 0..<512 {
            let e = host.read64(pages[c].table + UInt64(idx) * 8)
            if e & 1 == 0 || e & 0x80 != 0 { continue }
            if let g = childIndex(of: e), pages[g].live, pages[g].unsync || pages[g].level > 1 { zapUnsyncDescendants(g, cpu: cpu) }
        }
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

    /// The current root and up to 3 previous ones stay cached (KVM_MMU_NUM_PREV_ROOTS = 3).
    var cachedRoots: [Int] = []
    static let cachedRootLimit = 4

    /// A root falling out of the cache is only unpinned, not zapped: KVM's
    /// cached_root_find_and_keep_current rotates prev_roots and kvm_mmu_free_roots drops the
    /// evicted root's root_count; the shadow page stays hashed (and its guest table
    /// write-protected) until it is recycled, flooded or found again by
    /// kvm_mmu_get_shadow_page on a later CR3 load (no mmu_cache_miss then).
    func noteRoot(_ r: Int, cpu: ModelCPU) {
        cachedRoots.removeAll { $0 == r }
        cachedRoots.insert(r, at: 0)
        pages[r].isRoot = true
        while cachedRoots.count > Self.cachedRootLimit {
            let old = cachedRoots.removeLast()
            pages[old].isRoot = false
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
    public func read64(_ gpa: UInt64) -> UInt64 {
        let o = owner!
        if o.options.guestDirectMap { o.directMapRead(gpa >> 12) }
        return o.host.read64(o.hostAddress(gpa))
    }
    public func write64(_ gpa: UInt64, _ value: UInt64) { owner!.guestWrite(gpa, value) }
    public func writePageTableEntry(_ gpa: UInt64, _ value: UInt64) { owner!.guestWrite(gpa, value) }
    public func zero(_ gpa: UInt64, bytes: UInt64) {
        let o = owner!
        var a = gpa
        while a < gpa + bytes {
            let gfn = a >> 12
            let chunk = min(4096 - (a & 4095), gpa + bytes - a)
            o.logDirty?.note(gfn)
            o.stringWrite(gfn)
            o.host.zero(o.hostAddress(a), bytes: chunk)
            a += chunk
        }
    }

    /// A string copy (`rep movsq`): the source read through the direct map, the destination
    /// written as `zero` writes.
    public func copy(from source: UInt64, to destination: UInt64, bytes: UInt64) {
        let o = owner!
        var off: UInt64 = 0
        while off < bytes {
            let chunk = min(4096 - ((destination + off) & 4095), 4096 - ((source + off) & 4095), bytes - off)
            if o.options.guestDirectMap { o.directMapRead((source + off) >> 12) }
            o.logDirty?.note((destination + off) >> 12)
            o.stringWrite((destination + off) >> 12)
            var w: UInt64 = 0
            while w < chunk {
                o.host.write64(o.hostAddress(destination + off + w), o.host.read64(o.hostAddress(source + off + w)))
                w += 8
            }
            off += chunk
        }
    }
}
