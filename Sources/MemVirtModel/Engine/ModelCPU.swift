import MemVirtCore

/// The state one simulated CPU accumulates: TLBs, paging-structure caches, the page-table line
/// cache, counters and the cost ledger. Paging modes reach it to charge what they do.
public final class ModelCPU: @unchecked Sendable {
    public let tlb: TLBHierarchy
    public let walkCaches: PagingStructureCaches
    /// `walkCaches` when any is configured, else nil (what a walk takes, without a copy).
    public let walkCachesIfEnabled: PagingStructureCaches?
    public let lineCache = PageTableLineCache()
    public let paging: PagingConfig
    public let costs: CostModel
    public var counters: CounterSet
    public var ledger = CostLedger()
    public var privilege: PrivilegeMode = .user

    public init(tlb: TLBConfig, paging: PagingConfig, costs: CostModel) {
        self.tlb = TLBHierarchy(config: tlb)
        walkCaches = PagingStructureCaches(config: tlb)
        walkCachesIfEnabled = walkCaches.enabled ? walkCaches : nil
        self.paging = paging
        self.costs = costs
        counters = CounterSet()
    }

    /// Model where each paging-entry read hits (L1D/L2/LLC/DRAM). Off: every read costs
    /// `costs.walkRefL2` (the typical case for page-table lines; faster to simulate).
    public var modelLineCache = true
    var uncachedRefs: UInt64 = 0
    /// A/D write-backs by walks (charged at the end).
    public var adWrites: UInt64 = 0
    /// Walks started (each pays the walk start-up cost).
    public var walksStarted: UInt64 = 0

    /// One paging-entry read at physical `address`: the line cache records where it hits;
    /// `settleCosts()` turns the counts into cycles (no per-reference ledger update).
    @inline(__always) public func chargeWalkRef(_ address: UInt64, level: Int) {
        if modelLineCache { _ = lineCache.access(address, level: level) } else { uncachedRefs &+= 1 }
    }

    /// Charges what was counted since the last call: walk start-ups, entry reads by where they
    /// hit, A/D write-backs.
    public func settleCosts() {
        let lc = lineCache
        ledger.charge(.pageWalk, Double(walksStarted) * costs.walkStart)
        ledger.charge(.pageWalk, Double(lc.l1Hits) * costs.walkRefL1 + Double(lc.l2Hits) * costs.walkRefL2
            + Double(lc.llcHits) * costs.walkRefLLC + Double(lc.dramRefs) * costs.walkRefDRAM)
        ledger.charge(.adWrites, Double(adWrites) * costs.adWrite)
        ledger.charge(.pageWalk, Double(uncachedRefs) * costs.walkRefL2)
        walkRefsSettled.l2 &+= uncachedRefs
        uncachedRefs = 0
        walkRefsSettled.l1 &+= lc.l1Hits
        walkRefsSettled.l2 &+= lc.l2Hits
        walkRefsSettled.llc &+= lc.llcHits
        walkRefsSettled.dram &+= lc.dramRefs
        lc.reset()
        counters.add(.accessedDirtyWrites, adWrites)
        adWrites = 0
        walksStarted = 0
    }

    /// Entry reads by where they hit, over the whole run (after `settleCosts()`).
    public var walkRefsSettled: (l1: UInt64, l2: UInt64, llc: UInt64, dram: UInt64) = (0, 0, 0, 0)

    /// Forgets counts and cycles (after a warm-up).
    public func resetStatistics() {
        lineCache.reset()
        adWrites = 0
        uncachedRefs = 0
        walksStarted = 0
        walkRefsSettled = (0, 0, 0, 0)
        counters = CounterSet(applicable: counters.reported.map(\.0))
        ledger = CostLedger()
    }
}

/// Table memory that charges every entry read to the CPU's ledger and counts A/D writes.
public struct ChargedTableMemory<Inner: PageTableMemory>: PageTableMemory {
    public var inner: Inner
    // Unretained: the walk runs inside a call that holds the CPU (saves a retain/release pair
    // per walk on the hottest miss path).
    let cpuRef: Unmanaged<ModelCPU>
    public init(_ inner: Inner, cpu: ModelCPU) {
        self.inner = inner
        cpuRef = Unmanaged.passUnretained(cpu)
    }
    @inline(__always) public mutating func readEntry(_ address: UInt64, level: Int) -> UInt64? {
        guard let v = inner.readEntry(address, level: level) else { return nil }
        cpuRef._withUnsafeGuaranteedRef { $0.chargeWalkRef(address, level: level) }
        return v
    }
    @inline(__always) public mutating func writeEntry(_ address: UInt64, _ value: UInt64) {
        cpuRef._withUnsafeGuaranteedRef { $0.adWrites &+= 1 }
        inner.writeEntry(address, value)
    }
}

/// What a paging mode answers to a TLB miss.
public enum MissOutcome: Sendable {
    /// A translation to install, from a walk of `refs` paging-entry reads.
    case translated(TLBEntry, global: Bool, refs: Int, walkCacheHit: Bool)
    /// A fault the guest kernel must handle (delivered natively, or injected by the hypervisor),
    /// after a walk of `refs` reads.
    case guestFault(PageFaultErrorCode, refs: Int)
    /// The hypervisor fixed something (a hidden fault); the access is retried.
    case retry(refs: Int)
    /// The access was to MMIO: the hypervisor emulated it (no translation is cached).
    case mmio(refs: Int)
    /// The hypervisor emulated the access itself at this translation (not cached in the TLB).
    case emulated(TLBEntry, refs: Int)
    /// The host could not back the access (its memory, or swap, is exhausted): the run stops
    /// with this error.
    case hostFailure(InputError)
}

/// How guest memory is virtualized: native paging, shadow paging or nested paging.
public protocol PagingMode: AnyObject {
    var name: String { get }
    /// Counters this mode reports even when zero.
    var applicableCounters: [Counter] { get }
    /// The memory that TLB entries' bases address (guest memory natively, host memory otherwise).
    var dataMemory: PhysicalMemory { get }
    /// Guest-physical memory as the guest kernel sees it.
    var guestMemory: GuestPhysicalMemory { get }
    /// Resolves a TLB miss for `va` in `space`.
    func resolveMiss(_ va: UInt64, kind: AccessKind, space: AddressSpace, cpu: ModelCPU) -> MissOutcome
    /// The guest executes INVLPG for `va`.
    func invalidatePage(_ va: UInt64, space: AddressSpace, cpu: ModelCPU)
    /// The guest writes CR3 to switch to `space` (a context switch; PCID entries survive).
    func switchAddressSpace(to space: AddressSpace, cpu: ModelCPU)
    /// The guest flushes `space`'s TLB entries (CR3 reload without no-flush, INVPCID).
    func flushTLB(of space: AddressSpace, cpu: ModelCPU)
    /// Folds what the mode counted on its own into the CPU's counters (end of a run).
    func settle(cpu: ModelCPU)
    /// The guest freed an address space's tables.
    func addressSpaceDestroyed(_ space: AddressSpace, cpu: ModelCPU)
    /// A host failure met during the guest kernel's own accesses (which cannot fail), taken
    /// once: the run stops with it.
    func takeHostFailure() -> InputError?
}

extension PagingMode {
    /// Where guest-physical `gpa` lives in `dataMemory`, if it is backed (no side effects).
    public func dataAddress(ofGuestPhysical gpa: UInt64) -> UInt64? {
        switch self {
        case is NativePaging: return gpa
        case let s as ShadowPaging: return s.backedPage(gpa >> 12).map { $0 | (gpa & 0xfff) }
        case let n as NestedPaging: return n.walkEPTSilently(gpa)
        default: return nil
        }
    }

    /// Native and nested: the flush runs in the guest without an exit.
    public func flushTLB(of space: AddressSpace, cpu: ModelCPU) {
        cpu.tlb.flush(pcid: space.pcid)
        cpu.walkCaches.flush(pcid: space.pcid)
        cpu.ledger.charge(.guestKernel, cpu.costs.cr3Write)
    }
    public func settle(cpu: ModelCPU) {}
    public func addressSpaceDestroyed(_ space: AddressSpace, cpu: ModelCPU) {}
    public func takeHostFailure() -> InputError? { nil }
}

/// Native paging: the guest is the machine; the hardware walks the guest's own tables.
public final class NativePaging: PagingMode {
    public let memory: PhysicalMemory
    public let guest: NativeGuestMemory
    public init(memory: PhysicalMemory) {
        self.memory = memory
        guest = NativeGuestMemory(memory)
    }
    public var name: String { "native" }
    public var applicableCounters: [Counter] { [] }
    public var dataMemory: PhysicalMemory { memory }
    public var guestMemory: GuestPhysicalMemory { guest }

    public func resolveMiss(_ va: UInt64, kind: AccessKind, space: AddressSpace, cpu: ModelCPU) -> MissOutcome {
        cpu.walksStarted &+= 1
        var mem = ChargedTableMemory(DirectTableMemory(memory), cpu: cpu)
        let r = PageWalker.walk(
            va, root: space.root, kind: kind, mode: cpu.privilege, pcid: space.pcid, config: cpu.paging,
            caches: cpu.walkCachesIfEnabled, memory: &mem)
        switch r.kind {
        case .translated: return .translated(r.entry, global: r.global, refs: r.refs, walkCacheHit: r.walkCacheHit)
        case .fault(let code): return .guestFault(code, refs: r.refs)
        case .stopped: preconditionFailure("native table memory never stops a walk")
        }
    }

    public func invalidatePage(_ va: UInt64, space: AddressSpace, cpu: ModelCPU) {
        cpu.tlb.invalidatePage(va, pcid: space.pcid)
        cpu.walkCaches.flush(pcid: space.pcid)
        cpu.ledger.charge(.guestKernel, cpu.costs.invlpg)
    }

    public func switchAddressSpace(to space: AddressSpace, cpu: ModelCPU) {
        if !cpu.tlb.config.pcid { cpu.tlb.flushAll(keepGlobal: true); cpu.walkCaches.flushAll() }
        cpu.ledger.charge(.guestKernel, cpu.costs.cr3Write)
    }
}
