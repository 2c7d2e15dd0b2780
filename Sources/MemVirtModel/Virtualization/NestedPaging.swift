import MemVirtCore

/// Nested paging (Intel EPT / AMD NPT): the guest's own page tables translate guest-virtual to
/// guest-physical, and EPT tables of real EPT entries (SDM vol. 3, 29.3) in host memory
/// translate guest-physical to host-physical. On a TLB miss the hardware walks both: every
/// guest paging-entry address is itself translated through EPT, so a 4-level guest over a
/// 4-level EPT makes up to (4+1)(4+1)-1 = 24 references (Bhargava et al., ASPLOS 2008).
/// Host frames are given on demand: the first touch of a guest frame is an EPT violation that
/// exits to the hypervisor, which allocates a frame (gfn_to_pfn) and fills the EPT entry.
/// Guest page faults go straight to the guest: no exit.
public final class NestedPaging: PagingMode {
    public let host: PhysicalMemory
    public var hostFrames: FrameAllocator
    public let hostPageSize: PageSize
    /// EPT paging levels (4, or 5 with 5-level EPT).
    public let eptLevels: Int
    /// Host-physical address of the EPT PML4 (EPTP).
    public let eptRoot: UInt64
    /// EPT accessed/dirty flags (EPTP bit 6).
    public let accessedDirty: Bool
    /// Guest-physical page (4 KiB tag) -> host-physical page base.
    let nestedTLB: SetAssociativeCache
    /// EPT paging-structure caches keyed by gpa >> 21 / >> 30 / >> 39.
    let eptPDE: SetAssociativeCache
    let eptPDPTE: SetAssociativeCache
    let eptPML4E: SetAssociativeCache
    let eptCachesOn: Bool
    let cpu: ModelCPU
    let guestView: NestedGuestMemory
    /// Guest-physical ranges that are MMIO: EPT entries there are misconfigured on purpose.
    public private(set) var mmioRanges: [Range<UInt64>] = []

    // Counted on the miss path, folded into the CPU's counters by `settle`.
    var violations: UInt64 = 0
    var misconfigs: UInt64 = 0
    var nestedRefs: UInt64 = 0
    var nestedTLBHits: UInt64 = 0
    var eptCacheHits: UInt64 = 0
    var hostFaults: UInt64 = 0
    var leafPages: [UInt64] = [0, 0, 0]
    /// The largest number of references one completed 2D walk made.
    public private(set) var maxWalkRefs = 0

    /// Entries of the nested TLB and the EPT paging-structure caches when the CPU has TLBs.
    /// AMD's NTLB and Intel's caching of guest-physical translations are not documented in
    /// size; 32 / 2+4+32 entries mirror the native structures (Bhargava et al. 2008 used a
    /// small fully associative NTLB of this order).
    public init(cpu: ModelCPU, guestCapacity: UInt64, hostPageSize: PageSize = .size4K, eptLevels: Int = 4, accessedDirty: Bool = true) throws(InputError) {
        guard eptLevels == 4 || eptLevels == 5 else { throw InputError("EPT levels \(eptLevels): use 4 or 5") }
        self.cpu = cpu
        self.hostPageSize = hostPageSize
        self.eptLevels = eptLevels
        self.accessedDirty = accessedDirty
        // Host memory: guest RAM plus room for EPT tables, 1 GiB-aligned.
        let capacity = guestCapacity + (2 << 30)
        host = try PhysicalMemory(capacity: capacity, name: "host-physical")
        hostFrames = FrameAllocator(capacity: capacity)
        guard let root = hostFrames.allocate(.size4K) else { throw InputError("host memory exhausted") }
        host.zero(root, bytes: 4096)
        eptRoot = root
        let on = cpu.tlb.config.pdeCache > 0
        eptCachesOn = on
        nestedTLB = SetAssociativeCache(sets: 1, ways: on ? 32 : 0)
        eptPDE = SetAssociativeCache(sets: 1, ways: on ? 32 : 0)
        eptPDPTE = SetAssociativeCache(sets: 1, ways: on ? 4 : 0)
        eptPML4E = SetAssociativeCache(sets: 1, ways: on ? 2 : 0)
        guestView = NestedGuestMemory()
        guestView.owner = self
    }

    public var name: String { "nested" }
    public var applicableCounters: [Counter] {
        [.pfTaken, .pfFixed, .exits, .eptViolations, .nestedTLBHits, .nestedWalkCacheHits, .nestedWalkRefs, .pages4K, .pages2M, .pages1G, .hostMinorFaults]
    }
    public var dataMemory: PhysicalMemory { host }
    public var guestMemory: GuestPhysicalMemory { guestView }

    /// Declares `range` of guest-physical memory as MMIO: its EPT entries are installed
    /// misconfigured (write without read), so every access exits (SDM 29.3.3.1).
    public func addMMIO(_ range: Range<UInt64>) { mmioRanges.append(range) }

    // MARK: EPT walk

    enum NestedOutcome {
        case translated(hostPage: UInt64, size: PageSize, writable: Bool)
        case violation
        case misconfiguration
    }

    /// Translates guest-physical `gpa` through the nested TLB or an EPT walk (references
    /// counted and charged). `write` sets the EPT dirty flag on the leaf.
    @inline(__always) func translate(_ gpa: UInt64, write: Bool) -> NestedOutcome {
        let s = nestedTLB.lookup(tag: gpa >> 12, pcid: 0)
        if s >= 0 {
            let p = nestedTLB.payload(s)
            if !write || p & 1 != 0 {
                nestedTLBHits &+= 1
                return .translated(hostPage: p & PageTableEntry.addressMask, size: .size4K, writable: p & 2 != 0)
            }
        }
        return walkEPT(gpa, write: write)
    }

    func walkEPT(_ gpa: UInt64, write: Bool) -> NestedOutcome {
        var level = eptLevels
        var table = eptRoot
        if eptCachesOn {
            var s = eptPDE.lookup(tag: gpa >> 21, pcid: 0)
            if s >= 0 { level = 1; table = eptPDE.payload(s) } else {
                s = eptPDPTE.lookup(tag: gpa >> 30, pcid: 0)
                if s >= 0 { level = 2; table = eptPDPTE.payload(s) } else {
                    s = eptPML4E.lookup(tag: gpa >> 39, pcid: 0)
                    if s >= 0 { level = 3; table = eptPML4E.payload(s) }
                }
            }
            if level < eptLevels { eptCacheHits &+= 1 }
        }
        while true {
            let ea = table &+ (UInt64(GuestPhysicalAddress(gpa).tableIndex(level: level)) << 3)
            let raw = host.read64(ea)
            nestedRefs &+= 1
            cpu.chargeWalkRef(ea, level: level + 8)
            let e = EPTEntry(rawValue: raw)
            if !e.isPresent { return .violation }
            if e.isMisconfigured(level: level, physicalAddressBits: cpu.paging.physicalAddressBits) { return .misconfiguration }
            let leaf = level == 1 || (level <= 3 && e.isLargePage)
            var updated = raw
            if accessedDirty {
                updated |= EPTEntry.Flags.accessed.rawValue
                if leaf && write { updated |= EPTEntry.Flags.dirty.rawValue }
                if updated != raw {
                    host.write64(ea, updated)
                    cpu.adWrites &+= 1
                }
            }
            if !leaf {
                if eptCachesOn {
                    switch level {
                    case 4: eptPML4E.insert(tag: gpa >> 39, pcid: 0, payload: e.address)
                    case 3: eptPDPTE.insert(tag: gpa >> 30, pcid: 0, payload: e.address)
                    case 2: eptPDE.insert(tag: gpa >> 21, pcid: 0, payload: e.address)
                    default: break
                    }
                }
                table = e.address
                level -= 1
                continue
            }
            let size = PageSize(leafLevel: level)!
            if write && !e.isWritable { return .violation }
            let page = e.pageBase(size) | (gpa & size.offsetMask & ~PageSize.size4K.offsetMask)
            let dirtyOK: UInt64 = (!accessedDirty || updated & EPTEntry.Flags.dirty.rawValue != 0) ? 1 : 0
            nestedTLB.insert(tag: gpa >> 12, pcid: 0, payload: page | (e.isWritable ? 2 : 0) | dirtyOK)
            return .translated(hostPage: e.pageBase(size), size: size, writable: e.isWritable)
        }
    }

    /// The hypervisor's EPT-violation handler: back the host page holding `gpa` and map it.
    func handleViolation(_ gpa: UInt64) throws(InputError) {
        violations &+= 1
        cpu.counters.add(.exits, 1)
        cpu.counters.add(.pfTaken, 1)
        cpu.ledger.charge(.vmExits, cpu.costs.vmExitRoundTrip)
        cpu.ledger.charge(.hypervisorFaults, cpu.costs.eptViolationHandler)
        let size = hostPageSize
        let gpaBase = gpa & ~size.offsetMask
        guard let frame = hostFrames.allocate(size) else { throw InputError("host memory exhausted backing \(GuestPhysicalAddress(gpa))") }
        host.zero(frame, bytes: size.bytes)
        hostFaults &+= 1
        cpu.ledger.charge(.hostFaults, cpu.costs.demandZero(size))
        let mmio = mmioRanges.contains { $0.contains(gpa) }
        var flags: EPTEntry.Flags = mmio ? [.write] : .readWriteExecute
        if size != .size4K { flags.insert(.pageSize) }
        guard installEPT(gpaBase, frame: frame, size: size, leaf: EPTEntry(frameAddress: frame, flags: flags, memoryType: .writeBack)) else {
            throw InputError("host memory exhausted building EPT tables")
        }
        cpu.counters.add(.pfFixed, 1)
        leafPages[size.leafLevel - 1] &+= 1
    }

    func installEPT(_ gpa: UInt64, frame: UInt64, size: PageSize, leaf: EPTEntry) -> Bool {
        var table = eptRoot
        var level = eptLevels
        while level > size.leafLevel {
            let ea = table + UInt64(GuestPhysicalAddress(gpa).tableIndex(level: level)) * 8
            var e = EPTEntry(rawValue: host.read64(ea))
            if !e.isPresent {
                guard let t = hostFrames.allocate(.size4K) else { return false }
                host.zero(t, bytes: 4096)
                e = EPTEntry(frameAddress: t, flags: .readWriteExecute)
                host.write64(ea, e.rawValue)
            }
            table = e.address
            level -= 1
        }
        host.write64(table + UInt64(GuestPhysicalAddress(gpa).tableIndex(level: level)) * 8, leaf.rawValue)
        return true
    }

    /// Host-physical address of `gpa` for the guest kernel's own accesses (backing it first).
    func hostAddress(_ gpa: UInt64) -> UInt64 {
        while true {
            switch walkEPTSilently(gpa) {
            case .some(let hpa): return hpa
            case .none:
                do { try handleViolation(gpa) } catch { preconditionFailure("\(error)") }
            }
        }
    }

    /// A software EPT look-up (the hypervisor's view; no references counted, no A/D).
    func walkEPTSilently(_ gpa: UInt64) -> UInt64? {
        var table = eptRoot
        var level = eptLevels
        while true {
            let e = EPTEntry(rawValue: host.read64(table + UInt64(GuestPhysicalAddress(gpa).tableIndex(level: level)) * 8))
            if !e.isPresent { return nil }
            if level == 1 || (level <= 3 && e.isLargePage) {
                let size = PageSize(leafLevel: level)!
                return e.pageBase(size) | (gpa & size.offsetMask)
            }
            table = e.address
            level -= 1
        }
    }

    // MARK: PagingMode

    public func resolveMiss(_ va: UInt64, kind: AccessKind, space: AddressSpace, cpu: ModelCPU) -> MissOutcome {
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
            do { try handleViolation(mem.stoppedAt) } catch { return .guestFault(PageFaultErrorCode(rawValue: 0), refs: refs) }
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
                do { try handleViolation(gpa) } catch { return .guestFault(PageFaultErrorCode(rawValue: 0), refs: refs) }
                return .retry(refs: refs)
            case .misconfiguration:
                return mmioExit(refs: refs)
            case .translated(let hostPage, let hostSize, _):
                // The TLB holds the smaller of the guest and host page sizes.
                let size = r.entry.size.rawValue <= hostSize.rawValue ? r.entry.size : hostSize
                let base = (hostPage | (gpa & hostSize.offsetMask)) & ~size.offsetMask
                var e = r.entry
                e = TLBEntry(base: base, size: size, writable: e.writable, user: e.user, dirty: e.dirty, noExecute: e.noExecute)
                if refs > maxWalkRefs { maxWalkRefs = refs }
                return .translated(e, global: r.global, refs: refs, walkCacheHit: r.walkCacheHit)
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

    public func settle(cpu: ModelCPU) {
        cpu.counters.add(.eptViolations, violations)
        cpu.counters.add(.eptMisconfigurations, misconfigs)
        cpu.counters.add(.nestedWalkRefs, nestedRefs)
        cpu.counters.add(.nestedTLBHits, nestedTLBHits)
        cpu.counters.add(.nestedWalkCacheHits, eptCacheHits)
        cpu.counters.add(.hostMinorFaults, hostFaults)
        cpu.counters[.pages4K] = leafPages[0]
        cpu.counters[.pages2M] = leafPages[1]
        cpu.counters[.pages1G] = leafPages[2]
        violations = 0; misconfigs = 0; nestedRefs = 0; nestedTLBHits = 0; eptCacheHits = 0; hostFaults = 0
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
        case .translated(let page, let size, _):
            let hpa = page | (address & size.offsetMask)
            mode.cpu.chargeWalkRef(hpa, level: level)
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
        mode.cpu.adWrites &+= 1
        mode.host.write64(mode.hostAddress(address), value)
    }
}

/// Guest-physical memory as the nested guest's kernel sees it: every access translated
/// through EPT (its first touch of a frame is an EPT violation, counted like any other).
public final class NestedGuestMemory: GuestPhysicalMemory {
    weak var owner: NestedPaging?
    init() {}
    public func read64(_ gpa: UInt64) -> UInt64 { owner!.host.read64(owner!.hostAddress(gpa)) }
    public func write64(_ gpa: UInt64, _ value: UInt64) { owner!.host.write64(owner!.hostAddress(gpa), value) }
    public func writePageTableEntry(_ gpa: UInt64, _ value: UInt64) { write64(gpa, value) }
    public func zero(_ gpa: UInt64, bytes: UInt64) {
        var a = gpa
        while a < gpa + bytes {
            let h = owner!.hostAddress(a)
            let chunk = min(4096 - (a & 4095), gpa + bytes - a)
            owner!.host.zero(h, bytes: chunk)
            a += chunk
        }
    }
}
