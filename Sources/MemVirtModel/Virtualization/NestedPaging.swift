import MemVirtCore

/// Nested paging (Intel EPT / AMD NPT): the guest's own page tables translate guest-virtual to
/// guest-physical, and EPT tables of real EPT entries (SDM vol. 3, 29.3) in host memory
/// translate guest-physical to host-physical. On a TLB miss the hardware walks both: every
/// guest paging-entry address is itself translated through EPT, so a 4-level guest over a
/// 4-level EPT makes up to (4+1)(4+1)-1 = 24 references (Bhargava et al., ASPLOS 2008).
/// Host frames are given on demand: the first touch of a guest frame is an EPT violation that
/// exits to the hypervisor, which allocates a frame (gfn_to_pfn) and fills the EPT entry.
/// Guest page faults go straight to the guest: no exit.
///
/// Host frames come from a `HostMemory` (a memory-group analogue: limit, reclaim, swap, KSM),
/// which may be shared by several VMs. NestedPaging is its `HostMappingOwner`: reclaim clears
/// EPT accessed bits and zaps EPT leaves through it (with the INVEPT flush of every vCPU that
/// KVM's kvm_flush_remote_tlbs does). Several vCPUs may share one NestedPaging: each has its
/// own nested TLB and EPT paging-structure caches (they are per core in hardware), selected
/// by the `ModelCPU` passed to `resolveMiss` (or `bind`).
public final class NestedPaging: PagingMode, HostMappingOwner {
    public let hostMemory: HostMemory
    /// This VM's index in `hostMemory`.
    public private(set) var ownerIndex = 0
    public var host: PhysicalMemory { hostMemory.memory }
    public var hostFrames: FrameAllocator {
        get { hostMemory.frames }
        set { hostMemory.frames = newValue }
    }
    public let hostPageSize: PageSize
    /// EPT paging levels (4, or 5 with 5-level EPT).
    public let eptLevels: Int
    /// Host-physical address of the EPT PML4 (EPTP).
    public let eptRoot: UInt64
    /// EPT accessed/dirty flags (EPTP bit 6).
    public let accessedDirty: Bool
    let eptCachesOn: Bool
    /// Per-vCPU translation state; `cur` is the vCPU being served.
    final class VCPUState {
        let cpu: ModelCPU
        /// Guest-physical page (4 KiB tag) -> host-physical page base | writable << 1 | dirty-ok.
        let nestedTLB: SetAssociativeCache
        /// EPT paging-structure caches keyed by gpa >> 21 / >> 30 / >> 39.
        let eptPDE: SetAssociativeCache
        let eptPDPTE: SetAssociativeCache
        let eptPML4E: SetAssociativeCache
        init(cpu: ModelCPU, on: Bool) {
            self.cpu = cpu
            nestedTLB = SetAssociativeCache(sets: 1, ways: on ? 32 : 0)
            eptPDE = SetAssociativeCache(sets: 1, ways: on ? 32 : 0)
            eptPDPTE = SetAssociativeCache(sets: 1, ways: on ? 4 : 0)
            eptPML4E = SetAssociativeCache(sets: 1, ways: on ? 2 : 0)
        }
        /// A TLB flush request not yet serviced (KVM_REQ_TLB_FLUSH, handled at the next entry).
        var flushPending = false
        /// Log-dirty: this vCPU's PML log (gfns, at most `DirtyTrackingCosts.pmlEntries`) and
        /// the entries pushed on its dirty ring since the ring was last collected.
        var pml: [UInt64] = []
        var ringFill = 0
        func flushGuestPhysical() {
            nestedTLB.flushAll(); eptPDE.flushAll(); eptPDPTE.flushAll(); eptPML4E.flushAll()
        }
    }
    var vcpus: [VCPUState] = []
    var cur: VCPUState
    var cpu: ModelCPU { cur.cpu }
    let guestView: NestedGuestMemory
    /// Log-dirty (see `NestedDirtyTracker`): the tracker called back by the violation handler
    /// and the walker, and whether the walker logs D-flag 0->1 transitions (PML).
    weak var logDirty: NestedDirtyTracker?
    var pmlLogging = false
    /// A software bit of EPT leaves (bits 62:52 are ignored by the CPU, SDM 29.3.2): the leaf
    /// lost W for log-dirty only and the host lets the guest write the page, so a write to it
    /// is a write-protect fault for KVM's fast path, not a host fault (KVM's MMU-writable bit,
    /// bit 58 of its EPT sptes).
    public static let logDirtyWriteProtected: UInt64 = 1 << 58

    /// Guest-physical ranges that are MMIO: EPT entries there are misconfigured on purpose.
    public private(set) var mmioRanges: [Range<UInt64>] = []
    let guestFrameCount: Int

    // Simulated time and the I/O protocol with a scheduler (see Scheduling/VMSimulation).
    /// Simulated time of the access being served (ns). A scheduler sets it; without one
    /// (`clockDriven` false) the time is taken from the CPU's ledger.
    public var now: Double = 0
    public var clockDriven = false
    /// When true, an EPT violation that needs swap I/O is not waited for: it is recorded in
    /// `pendingIO` and the miss answers `.retry`, so the caller can block the vCPU or send an
    /// async page fault. When false, the vCPU waits synchronously (`syncBlockUntil`).
    public var deferIO = false
    public private(set) var pendingIO: (gfn: UInt64, readyAt: Double)?
    /// The latest time a synchronous host wait ends (clock-driven runs; reset by the caller).
    public var syncBlockUntil: Double = 0
    /// Called after each zap's INVEPT flush of every vCPU (a scheduler charges the IPIs).
    public var onFlush: (() -> Void)?

    // Counted on the miss path, folded into the CPU's counters by `settle`.
    var violations: UInt64 = 0
    var misconfigs: UInt64 = 0
    var nestedRefs: UInt64 = 0
    var nestedTLBHits: UInt64 = 0
    var eptCacheHits: UInt64 = 0
    var untrackedFaults: UInt64 = 0
    var leafPages: [Int64] = [0, 0, 0]
    var settledStats = HostOwnerStats()
    /// The largest number of references one completed 2D walk made.
    public internal(set) var maxWalkRefs = 0

    /// Entries of the nested TLB and the EPT paging-structure caches when the CPU has TLBs.
    /// AMD's NTLB and Intel's caching of guest-physical translations are not documented in
    /// size; 32 / 2+4+32 entries mirror the native structures (Bhargava et al. 2008 used a
    /// small fully associative NTLB of this order).
    /// `hostMemory`: the host's memory to draw frames from (shared by VMs, with a limit);
    /// nil makes a private one without a limit.
    public init(cpu: ModelCPU, guestCapacity: UInt64, hostPageSize: PageSize = .size4K, eptLevels: Int = 4, accessedDirty: Bool = true, hostMemory: HostMemory? = nil) throws(InputError) {
        guard eptLevels == 4 || eptLevels == 5 else { throw InputError("EPT levels \(eptLevels): use 4 or 5") }
        self.hostPageSize = hostPageSize
        self.eptLevels = eptLevels
        self.accessedDirty = accessedDirty
        // Host memory: guest RAM plus room for EPT tables, 1 GiB-aligned.
        let hm: HostMemory
        if let given = hostMemory { hm = given } else { hm = try HostMemory(capacity: guestCapacity + (2 << 30)) }
        if hm.limitFrames != nil {
            guard hostPageSize == .size4K else { throw InputError("a host memory limit needs 4 KiB host pages") }
            guard accessedDirty else { throw InputError("host reclaim needs EPT accessed/dirty flags") }
        }
        self.hostMemory = hm
        guard let root = hm.allocateTableFrame(), let scratch = hm.allocateTableFrame() else {
            throw InputError("host memory exhausted: \(ByteCount(hm.memory.capacity)) cannot hold the EPT root")
        }
        hm.memory.zero(root, bytes: 4096)
        eptRoot = root
        scratchFrame = scratch
        let on = cpu.tlb.config.pdeCache > 0
        eptCachesOn = on
        cur = VCPUState(cpu: cpu, on: on)
        vcpus = [cur]
        guestFrameCount = Int(guestCapacity >> 12)
        guestView = NestedGuestMemory()
        guestView.owner = self
        ownerIndex = hm.register(self, guestFrames: guestFrameCount)
    }

    /// Serves `cpu` from now on (adding it as a vCPU of this VM the first time).
    @inline(__always) public func bind(_ cpu: ModelCPU) {
        if cur.cpu !== cpu { bindSlow(cpu) }
    }

    func bindSlow(_ cpu: ModelCPU) {
        if let s = vcpus.first(where: { $0.cpu === cpu }) { cur = s; return }
        let s = VCPUState(cpu: cpu, on: eptCachesOn)
        vcpus.append(s)
        cur = s
    }

    public var name: String { "nested" }
    public var applicableCounters: [Counter] {
        var c: [Counter] = [.pfTaken, .pfFixed, .exits, .eptViolations, .nestedTLBHits, .nestedWalkCacheHits, .nestedWalkRefs, .pages4K, .pages2M, .pages1G, .hostMinorFaults]
        if hostMemory.limitFrames != nil { c += [.hostMajorFaults, .swapIns, .swapOuts, .tlbFlush] }
        return c
    }
    public var dataMemory: PhysicalMemory { host }
    public var guestMemory: GuestPhysicalMemory { guestView }

    /// Declares `range` of guest-physical memory as MMIO: its EPT entries are installed
    /// misconfigured (write without read), so every access exits (SDM 29.3.3.1).
    public func addMMIO(_ range: Range<UInt64>) { mmioRanges.append(range) }

    /// The pending swap-in recorded by the last miss (with `deferIO`), cleared.
    public func takePendingIO() -> (gfn: UInt64, readyAt: Double)? {
        let p = pendingIO
        pendingIO = nil
        return p
    }

    // MARK: EPT walk

    enum NestedOutcome {
        case translated(hostPage: UInt64, size: PageSize, writable: Bool, dirty: Bool)
        case violation
        case misconfiguration
    }

    /// Translates guest-physical `gpa` through the nested TLB or an EPT walk (references
    /// counted and charged). `write` sets the EPT dirty flag on the leaf.
    @inline(__always) func translate(_ gpa: UInt64, write: Bool) -> NestedOutcome {
        let s = cur.nestedTLB.lookup(tag: gpa >> 12, pcid: 0)
        if s >= 0 {
            let p = cur.nestedTLB.payload(s)
            if !write || p & 3 == 3 {
                nestedTLBHits &+= 1
                return .translated(hostPage: p & PageTableEntry.addressMask, size: .size4K, writable: p & 2 != 0, dirty: p & 1 != 0)
            }
        }
        return walkEPT(gpa, write: write)
    }

    func walkEPT(_ gpa: UInt64, write: Bool) -> NestedOutcome {
        var level = eptLevels
        var table = eptRoot
        let c = cur
        if eptCachesOn {
            var s = c.eptPDE.lookup(tag: gpa >> 21, pcid: 0)
            if s >= 0 { level = 1; table = c.eptPDE.payload(s) } else {
                s = c.eptPDPTE.lookup(tag: gpa >> 30, pcid: 0)
                if s >= 0 { level = 2; table = c.eptPDPTE.payload(s) } else {
                    s = c.eptPML4E.lookup(tag: gpa >> 39, pcid: 0)
                    if s >= 0 { level = 3; table = c.eptPML4E.payload(s) }
                }
            }
            if level < eptLevels { eptCacheHits &+= 1 }
        }
        while true {
            let ea = table &+ (UInt64(GuestPhysicalAddress(gpa).tableIndex(level: level)) << 3)
            let raw = host.read64(ea)
            nestedRefs &+= 1
            c.cpu.chargeWalkRef(ea, level: level + 8)
            let e = EPTEntry(rawValue: raw)
            if !e.isPresent { return .violation }
            if e.isMisconfigured(level: level, physicalAddressBits: c.cpu.paging.physicalAddressBits) { return .misconfiguration }
            let leaf = level == 1 || (level <= 3 && e.isLargePage)
            if leaf && write && !e.isWritable { return .violation }
            var updated = raw
            if accessedDirty {
                updated |= EPTEntry.Flags.accessed.rawValue
                if leaf && write { updated |= EPTEntry.Flags.dirty.rawValue }
                if updated != raw {
                    host.write64(ea, updated)
                    c.cpu.adWrites &+= 1
                    if pmlLogging && leaf && write && raw & EPTEntry.Flags.dirty.rawValue == 0 { logDirty?.logPML(gfn: gpa >> 12) }
                }
            }
            if !leaf {
                if eptCachesOn {
                    switch level {
                    case 4: c.eptPML4E.insert(tag: gpa >> 39, pcid: 0, payload: e.address)
                    case 3: c.eptPDPTE.insert(tag: gpa >> 30, pcid: 0, payload: e.address)
                    case 2: c.eptPDE.insert(tag: gpa >> 21, pcid: 0, payload: e.address)
                    default: break
                    }
                }
                table = e.address
                level -= 1
                continue
            }
            let size = PageSize(leafLevel: level)!
            let page = e.pageBase(size) | (gpa & size.offsetMask & ~PageSize.size4K.offsetMask)
            let dirtyOK = !accessedDirty || updated & EPTEntry.Flags.dirty.rawValue != 0
            c.nestedTLB.insert(tag: gpa >> 12, pcid: 0, payload: page | (e.isWritable ? 2 : 0) | (dirtyOK ? 1 : 0))
            return .translated(hostPage: e.pageBase(size), size: size, writable: e.isWritable, dirty: dirtyOK)
        }
    }

    /// Nanoseconds on the bound CPU's ledger (the clock of runs without a scheduler).
    var ledgerNow: Double { cpu.ledger.total / cpu.costs.clockGHz }

    /// The hypervisor's EPT-violation handler: back the host page holding `gpa` and map it
    /// (gfn_to_pfn, then the EPT entry). Returns false when the page needs swap I/O and
    /// `deferIO` is set: the I/O is then in `pendingIO`.
    @discardableResult
    func handleViolation(_ gpa: UInt64, write: Bool) throws(InputError) -> Bool {
        if write && writeProtectFault(gpa) { return true }
        violations &+= 1
        cpu.counters.add(.exits, 1)
        cpu.counters.add(.pfTaken, 1)
        cpu.ledger.charge(.vmExits, cpu.costs.vmExitRoundTrip)
        cpu.ledger.charge(.hypervisorFaults, cpu.costs.eptViolationHandler)
        let mmio = mmioRanges.contains { $0.contains(gpa) }
        if hostPageSize != .size4K || mmio {
            // Untracked host pages (large host pages, MMIO placeholders): allocate and map.
            let size = hostPageSize
            guard let frame = hostMemory.allocateUntracked(size) else { throw exhausted("backing \(GuestPhysicalAddress(gpa))") }
            host.zero(frame, bytes: size.bytes)
            untrackedFaults &+= 1
            cpu.ledger.charge(.hostFaults, cpu.costs.hostDemandZero(size))
            var flags: EPTEntry.Flags = mmio ? [.write] : .readWriteExecute
            if size != .size4K { flags.insert(.pageSize) }
            guard installEPT(gpa & ~size.offsetMask, size: size, leaf: EPTEntry(frameAddress: frame, flags: flags, memoryType: .writeBack)) else {
                throw exhausted("building EPT tables for \(GuestPhysicalAddress(gpa))")
            }
            cpu.counters.add(.pfFixed, 1)
            return true
        }
        let gfn = gpa >> 12
        guard Int(gfn) < guestFrameCount else { throw InputError("guest-physical \(GuestPhysicalAddress(gpa)) beyond guest memory") }
        var t = clockDriven ? now : max(now, ledgerNow)
        while true {
            switch hostMemory.fault(owner: ownerIndex, gfn: gfn, write: write, now: t) {
            case .map(let frame, let writable, let kind, let readyAt):
                if kind == .fresh { cpu.ledger.charge(.hostFaults, cpu.costs.hostDemandZero4K) }
                cpu.ledger.charge(.hostFaults, hostMemory.takeCycles())
                if readyAt > t { hostWait(until: readyAt, from: t) }
                guard installEPT(gfn << 12, size: .size4K, leaf: hostLeaf(gfn: gfn, frame: frame, writable: writable, write: write)) else {
                    throw exhausted("building EPT tables for \(GuestPhysicalAddress(gpa))")
                }
                cpu.counters.add(.pfFixed, 1)
                return true
            case .io(let readyAt, _):
                cpu.ledger.charge(.hostFaults, hostMemory.takeCycles())
                if deferIO {
                    pendingIO = (gfn, readyAt)
                    return false
                }
                hostWait(until: readyAt, from: t)
                hostMemory.completeReadNow(owner: ownerIndex, gfn: gfn)
                if !clockDriven { t = max(t, readyAt) }
            case .outOfMemory:
                throw exhausted("(and swap) backing \(GuestPhysicalAddress(gpa))")
            }
        }
    }

    /// A write to a leaf write-protected for log-dirty (`logDirtyWriteProtected`): an EPT
    /// violation fixed on KVM's fast path now. False if `gpa`'s leaf is not such a leaf (a
    /// missing page, a read-only KSM page: host faults).
    func writeProtectFault(_ gpa: UInt64) -> Bool {
        guard let ea = leafAddress(gfn: gpa >> 12) else { return false }
        let raw = host.read64(ea)
        guard EPTEntry(rawValue: raw).isPresent, raw & Self.logDirtyWriteProtected != 0, raw & EPTEntry.Flags.write.rawValue == 0 else { return false }
        violations &+= 1
        if let t = logDirty {
            t.writeProtectFault(gfn: gpa >> 12)
        } else {
            host.write64(ea, (raw | EPTEntry.Flags.write.rawValue) & ~Self.logDirtyWriteProtected)
            cpu.counters.add(.exits, 1)
            cpu.counters.add(.pfTaken, 1)
            cpu.counters.add(.pfFast, 1)
            cpu.ledger.charge(.vmExits, cpu.costs.vmExitRoundTrip)
            cpu.ledger.charge(.hypervisorFaults, cpu.costs.eptViolationHandler)
        }
        return true
    }

    /// The EPT leaf for a 4 KiB host frame the host fault path gives `gfn` (write-protected or
    /// logged by the tracker while logging).
    func hostLeaf(gfn: UInt64, frame: UInt64, writable: Bool, write: Bool) -> EPTEntry {
        let flags: EPTEntry.Flags = writable ? .readWriteExecute : [.read, .execute]
        let leaf = EPTEntry(frameAddress: frame, flags: flags, memoryType: .writeBack)
        guard let t = logDirty, t.logging else { return leaf }
        return EPTEntry(rawValue: t.mapped(gfn: gfn, leaf: leaf.rawValue, write: write))
    }

    /// The run error for host memory that cannot back the guest, naming the limit.
    func exhausted(_ what: String) -> InputError {
        let capacity = ByteCount(hostMemory.memory.capacity)
        let limit = hostMemory.limitFrames.map { "a limit of \(ByteCount($0 << 12))" } ?? "no limit"
        return InputError("host memory exhausted \(what): the VM's host memory has \(capacity) of frames and \(limit)")
    }

    /// A host failure met where the hardware cannot report one (the guest kernel's own
    /// accesses): the access went to `scratchFrame`, and the run stops at the next miss.
    public internal(set) var hostFailure: InputError?
    /// Host faults retried in a row without the access translating (Host/HostLimitThrashing.swift).
    var hostRetriesInRow = 0
    var hostRetriesAccess: (cpu: ObjectIdentifier, va: UInt64)?
    /// Where an access the host could not back goes until the run stops (never guest data).
    let scratchFrame: UInt64

    public func takeHostFailure() -> InputError? {
        let f = hostFailure
        hostFailure = nil
        return f
    }

    /// The vCPU waits in the host until `until`: recorded for a scheduler, or charged as cycles.
    func hostWait(until: Double, from t: Double) {
        if clockDriven {
            syncBlockUntil = max(syncBlockUntil, until)
        } else {
            cpu.ledger.charge(.hostFaults, (until - t) * cpu.costs.clockGHz)
        }
    }

    /// Installs `leaf` for `gpa` (building EPT tables); replacing a present leaf flushes.
    func installEPT(_ gpa: UInt64, size: PageSize, leaf: EPTEntry) -> Bool {
        var table = eptRoot
        var level = eptLevels
        while level > size.leafLevel {
            let ea = table + UInt64(GuestPhysicalAddress(gpa).tableIndex(level: level)) * 8
            var e = EPTEntry(rawValue: host.read64(ea))
            if !e.isPresent {
                guard let t = hostMemory.allocateTableFrame() else { return false }
                host.zero(t, bytes: 4096)
                e = EPTEntry(frameAddress: t, flags: .readWriteExecute)
                host.write64(ea, e.rawValue)
            }
            table = e.address
            level -= 1
        }
        let ea = table + UInt64(GuestPhysicalAddress(gpa).tableIndex(level: level)) * 8
        let old = EPTEntry(rawValue: host.read64(ea))
        host.write64(ea, leaf.rawValue)
        if old.isPresent { flushAllVCPUs() } else { leafPages[size.leafLevel - 1] += 1 }
        return true
    }

    /// The EPT leaf entry address for a 4 KiB `gfn`, if its tables exist.
    func leafAddress(gfn: UInt64) -> UInt64? {
        let s = TableWalk.descend(.ept, root: eptRoot, levels: eptLevels, address: gfn << 12) { host.read64($0) }
        guard let s, s.level == 1 else { return nil }
        return s.entryAddress
    }

    /// INVEPT (single context) on every vCPU: combined and guest-physical mappings dropped.
    /// The guest-physical caches (nested TLB, EPT walk caches) are dropped at once, so no walk
    /// in progress can use a stale host frame. Under a scheduler (`clockDriven`) the combined
    /// mappings (TLBs, guest paging-structure caches) are dropped when the vCPU next translates
    /// (`serviceFlush`), as KVM services KVM_REQ_TLB_FLUSH on the next VM entry; requests made
    /// in between coalesce into one flush, counted once in `tlb_flush` as KVM counts it.
    func flushAllVCPUs() {
        for v in vcpus {
            v.flushGuestPhysical()
            v.flushPending = true
            if !clockDriven { serviceFlush(v) }
        }
        onFlush?()
    }

    func serviceFlush(_ v: VCPUState) {
        guard v.flushPending else { return }
        v.flushPending = false
        v.cpu.tlb.flushAll(keepGlobal: false)
        v.cpu.walkCaches.flushAll()
        v.cpu.counters.add(.tlbFlush, 1)
    }

    /// Services a pending TLB flush request of `cpu` (before its next TLB look-up).
    @inline(__always) public func serviceFlush(cpu: ModelCPU) {
        bind(cpu)
        if cur.flushPending { serviceFlush(cur) }
    }

    // MARK: PagingMode

    public func resolveMiss(_ va: UInt64, kind: AccessKind, space: AddressSpace, cpu: ModelCPU) -> MissOutcome {
        let outcome = resolveMissOnce(va, kind: kind, space: space, cpu: cpu)
        return hostLimitCheck(outcome, va: va, cpu: cpu)
    }

    func resolveMissOnce(_ va: UInt64, kind: AccessKind, space: AddressSpace, cpu: ModelCPU) -> MissOutcome {
        bind(cpu)
        if cur.flushPending { serviceFlush(cur) }
        cpu.walksStarted &+= 1
        let before = nestedRefs
        var mem = NestedTableMemory(mode: self)
        let r = PageWalker.walk(
            va, root: space.root, kind: kind, mode: cpu.privilege, pcid: space.pcid, config: cpu.paging,
            caches: cpu.walkCaches.enabled ? cpu.walkCaches : nil, memory: &mem)
        var refs = r.refs + Int(nestedRefs - before)
        switch r.kind {
        case .stopped:
            if mem.misconfigured { return mmioExit(refs: refs) }
            do { try handleViolation(mem.stoppedAt, write: false) } catch { return .hostFailure(error) }
            return .retry(refs: refs)
        case .fault(let code):
            return .guestFault(code, refs: refs)
        case .translated:
            let gpa = r.entry.base | (va & r.entry.size.offsetMask)
            let refsBefore = nestedRefs
            let outcome = translate(gpa, write: kind == .write)
            refs += Int(nestedRefs - refsBefore)
            switch outcome {
            case .violation:
                do { try handleViolation(gpa, write: kind == .write) } catch { return .hostFailure(error) }
                return .retry(refs: refs)
            case .misconfiguration:
                return mmioExit(refs: refs)
            case .translated(let hostPage, let hostSize, let eptWritable, let eptDirty):
                // The TLB holds the smaller of the guest and host page sizes, and the
                // combined rights: a write through an entry whose EPT leaf is read-only (KSM)
                // or not yet dirty must walk again.
                let size = r.entry.size.rawValue <= hostSize.rawValue ? r.entry.size : hostSize
                let base = (hostPage | (gpa & hostSize.offsetMask)) & ~size.offsetMask
                let e = r.entry
                let entry = TLBEntry(base: base, size: size, writable: e.writable && eptWritable, user: e.user, dirty: e.dirty && eptDirty, noExecute: e.noExecute)
                if refs > maxWalkRefs { maxWalkRefs = refs }
                return .translated(entry, global: r.global, refs: refs, walkCacheHit: r.walkCacheHit)
            }
        }
    }

    func mmioExit(refs: Int) -> MissOutcome {
        misconfigs &+= 1
        cpu.counters.add(.exits, 1)
        cpu.counters.add(.mmioExits, 1)
        cpu.counters.add(.insnEmulation, 1)
        cpu.ledger.charge(.vmExits, cpu.costs.vmExitRoundTrip)
        cpu.ledger.charge(.emulation, cpu.costs.instructionEmulation)
        return .mmio(refs: refs)
    }

    public func invalidatePage(_ va: UInt64, space: AddressSpace, cpu: ModelCPU) {
        // INVLPG runs without an exit under EPT.
        cpu.tlb.invalidatePage(va, pcid: space.pcid)
        cpu.walkCaches.flush(pcid: space.pcid)
        cpu.ledger.charge(.guestKernel, cpu.costs.invlpg)
    }

    public func switchAddressSpace(to space: AddressSpace, cpu: ModelCPU) {
        if !cpu.tlb.config.pcid { cpu.tlb.flushAll(keepGlobal: true); cpu.walkCaches.flushAll() }
        cpu.ledger.charge(.guestKernel, cpu.costs.cr3Write)
    }

    /// Folds what was counted into `cpu`'s counters. VM-wide counts (host faults, swap,
    /// mappings) go to the CPU passed here.
    public func settle(cpu: ModelCPU) {
        cpu.counters.add(.eptViolations, violations)
        cpu.counters.add(.eptMisconfigurations, misconfigs)
        cpu.counters.add(.nestedWalkRefs, nestedRefs)
        cpu.counters.add(.nestedTLBHits, nestedTLBHits)
        cpu.counters.add(.nestedWalkCacheHits, eptCacheHits)
        let s = hostMemory.stats(owner: ownerIndex)
        cpu.counters.add(.hostMinorFaults, s.minorFaults - settledStats.minorFaults + untrackedFaults)
        if hostMemory.limitFrames != nil || s.majorFaults > 0 {
            cpu.counters.add(.hostMajorFaults, s.majorFaults - settledStats.majorFaults)
            cpu.counters.add(.swapIns, s.swapIns - settledStats.swapIns)
            cpu.counters.add(.swapOuts, s.swapOuts - settledStats.swapOuts)
        }
        settledStats = s
        cpu.counters[.pages4K] = UInt64(max(leafPages[0], 0))
        cpu.counters[.pages2M] = UInt64(max(leafPages[1], 0))
        cpu.counters[.pages1G] = UInt64(max(leafPages[2], 0))
        violations = 0; misconfigs = 0; nestedRefs = 0; nestedTLBHits = 0; eptCacheHits = 0; untrackedFaults = 0
    }
}

/// Guest page-table reads during a 2D walk: each guest-physical table address goes through
/// the nested TLB or an EPT walk first. Stops (an EPT violation) where a table is not backed.
struct NestedTableMemory: PageTableMemory {
    let mode: NestedPaging
    var stoppedAt: UInt64 = 0
    var misconfigured = false
    init(mode: NestedPaging) { self.mode = mode }

    mutating func readEntry(_ address: UInt64, level: Int) -> UInt64? {
        switch mode.translate(address, write: false) {
        case .translated(let page, let size, _, _):
            let hpa = page | (address & size.offsetMask)
            mode.cur.cpu.chargeWalkRef(hpa, level: level)
            return mode.host.read64(hpa)
        case .violation:
            stoppedAt = address
            return nil
        case .misconfiguration:
            stoppedAt = address
            misconfigured = true
            return nil
        }
    }

    mutating func writeEntry(_ address: UInt64, _ value: UInt64) {
        // Guest paging-structure A/D updates are writes for EPT (SDM 29.3.5).
        mode.cur.cpu.adWrites &+= 1
        mode.host.write64(mode.hostAddress(address, write: true), value)
    }
}

/// Guest-physical memory as the nested guest's kernel sees it: every access translated
/// through EPT (its first touch of a frame is an EPT violation, counted like any other).
public final class NestedGuestMemory: GuestPhysicalMemory {
    // The paging mode owns this view and outlives it.
    unowned(unsafe) var owner: NestedPaging?
    init() {}
    public func read64(_ gpa: UInt64) -> UInt64 { owner!.host.read64(owner!.hostAddress(gpa, write: false)) }
    public func write64(_ gpa: UInt64, _ value: UInt64) { owner!.host.write64(owner!.hostAddress(gpa, write: true), value) }
    public func writePageTableEntry(_ gpa: UInt64, _ value: UInt64) { write64(gpa, value) }
    public func zero(_ gpa: UInt64, bytes: UInt64) {
        var a = gpa
        while a < gpa + bytes {
            let h = owner!.hostAddress(a, write: true)
            let chunk = min(4096 - (a & 4095), gpa + bytes - a)
            owner!.host.zero(h, bytes: chunk)
            a += chunk
        }
    }
}
