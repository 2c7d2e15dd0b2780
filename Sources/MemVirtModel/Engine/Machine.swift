import MemVirtCore

/// Where accesses come from: a synthetic generator or a trace.
public protocol AccessSource {
    /// The next access, or nil at the end.
    mutating func nextAccess() throws(InputError) -> Access?
}

/// A synthetic stream cut to `count` accesses.
public struct GeneratedAccesses: AccessSource {
    public var generator: AccessGenerator
    public var remaining: UInt64
    public init(_ generator: AccessGenerator, count: UInt64) {
        self.generator = generator
        remaining = count
    }
    @inline(__always) public mutating func nextAccess() throws(InputError) -> Access? {
        if remaining == 0 { return nil }
        remaining &-= 1
        return generator.next()
    }
}

/// Several threads' streams interleaved round-robin, `quantum` accesses at a time (one vCPU,
/// one address space: no CR3 write between them).
public struct InterleavedAccesses: AccessSource {
    var streams: [GeneratedAccesses]
    var current = 0
    var left: UInt64
    let quantum: UInt64
    public init(_ streams: [GeneratedAccesses], quantum: UInt64 = 1000) {
        self.streams = streams
        self.quantum = quantum
        left = quantum
    }
    public mutating func nextAccess() throws(InputError) -> Access? {
        for _ in 0...streams.count {
            if left > 0, let a = try streams[current].nextAccess() {
                left -= 1
                return a
            }
            current = (current + 1) % streams.count
            left = quantum
        }
        return nil
    }
}

/// A run stopped because the guest did something its kernel refuses.
public struct GuestError: Error, CustomStringConvertible, Sendable {
    public var message: String
    public var description: String { message }
}

/// One simulated vCPU running a workload in one address space over a paging mode.
public final class Machine<Mode: PagingMode>: GuestCPUControl, @unchecked Sendable {
    public let mode: Mode
    public let cpu: ModelCPU
    let tlb: TLBHierarchy
    public let kernel: SimulatedGuestKernel
    /// The address space the vCPU runs in (CR3).
    public private(set) var space: AddressSpace {
        didSet {
            spaceRef = Unmanaged.passUnretained(space)
            pcid = space.pcid
        }
    }
    /// Unretained view of `space` and its PCID for the per-access path (`space` keeps it alive).
    var spaceRef: Unmanaged<AddressSpace>
    var pcid: UInt16
    let data: PhysicalMemory
    let costs: CostModel

    // Hot-path counters as plain fields (folded into `cpu.counters` by `finish()`).
    var accesses: UInt64 = 0
    var writes: UInt64 = 0
    var fetches: UInt64 = 0
    var l1Hits: UInt64 = 0
    var l2Hits: UInt64 = 0
    var misses: UInt64 = 0
    var walks: UInt64 = 0
    var walkRefs: UInt64 = 0
    var faultedWalkRefs: UInt64 = 0
    var walkCacheHits: UInt64 = 0
    var walkRetries: UInt64 = 0
    var guestFaults: UInt64 = 0
    var demandZero: UInt64 = 0
    var chargedAccesses: UInt64 = 0
    var cowFaults: UInt64 = 0
    var majorFaults: UInt64 = 0
    var chargedL2Hits: UInt64 = 0
    /// The most references one completed walk made.
    public internal(set) var maxWalkRefs = 0
    /// The sum of every value read (mod 2^64): the guest-visible result of the run, defined
    /// exactly as the KVM guest runtime's `read_sum` (Sources/MemVirtGuest/include/memvirt_guest.h),
    /// so the two engines can be compared for the same one-thread workload.
    public private(set) var checksum: UInt64 = 0
    /// Salt of the value written by access i: v(i) = ((i + 1) * 0x9E3779B97F4A7C15) ^ salt
    /// (the guest runtime uses thread << 56; thread 0 here).
    public var writeSalt: UInt64 = 0
    /// Every write is a read-modify-write (GUPS): x = *p; sum += x; *p = x ^ v(i).
    public var readModifyWrite = false
    public let computePerAccess: Double
    /// The guest's CPL0 entry stubs, where its CPL0 code is emulated (kvm_pvm): each guest
    /// #PF, INVLPG and CR3 load also pays the stub's other instructions (and for INVLPG and
    /// CR3, the exception that enters the stub). nil: CPL0 runs natively (no extra charge).
    public var cpl0Stubs: GuestCPL0Stubs?

    public init(mode: Mode, cpu: ModelCPU, kernel: SimulatedGuestKernel, space: AddressSpace, computePerAccess: UInt64 = 0) {
        self.mode = mode
        self.cpu = cpu
        self.kernel = kernel
        self.space = space
        spaceRef = Unmanaged.passUnretained(space)
        pcid = space.pcid
        data = mode.dataMemory
        tlb = cpu.tlb
        costs = cpu.costs
        self.computePerAccess = Double(computePerAccess)
        kernel.cpu = self
        cpu.counters.markApplicable([
            .accesses, .reads, .writes, .tlbHits, .tlbMisses, .l1TLBHits, .l2TLBHits, .walks, .walkMemoryRefs,
            .walkCacheHits, .accessedDirtyWrites, .walkRetries, .guestPageFaults, .guestDemandZeroFaults,
            .guestPageTablePages,
        ] + mode.applicableCounters)
    }

    /// Called with (guest-virtual, host-physical) after every access when set (tests).
    public var observer: ((UInt64, UInt64) -> Void)?

    // MARK: GuestCPUControl

    /// Called after every INVLPG (with its address) and CR3 write (nil) when set (tests).
    public var onSyncPoint: ((UInt64?) -> Void)?

    public func invalidatePage(_ va: UInt64, space: AddressSpace) {
        if let s = cpl0Stubs { chargeStub(s.invlpgOtherInstructions, costs.invlpgStub) }
        mode.invalidatePage(va, space: space, cpu: cpu)
        if let o = onSyncPoint { o(va) }
    }

    /// A CPL0 stub entered by an exception (the guest's `ud2` or `div`): `cycles` is the whole
    /// stub beyond the privileged instruction's exit and handler, which are the mode's charge
    /// (`CostModel.invlpgStub` / `cr3Stub`, measured by `kvm calibrate` on the guest's own
    /// stubs entered from CPL3: the exception, its delivery, the other instructions, the IRET).
    func chargeStub(_ otherInstructions: Int, _ cycles: Double) {
        cpu.ledger.charge(.emulation, cycles)
        cpu.counters.add(.insnEmulation, UInt64(otherInstructions + 2))
        countStubIRETExits()
        countStubStores()
    }

    /// The exits a stub's IRET adds (`GuestCPL0Stubs.iretExits`): time inside the stub's
    /// calibrated cost, counted here as KVM counts them (`exits`).
    func countStubIRETExits() {
        if let s = cpl0Stubs, s.iretExits > 0 { cpu.counters.add(.exits, UInt64(s.iretExits)) }
    }

    /// The stub's emulated stores, counted by a shadow MMU as KVM counts them (`mmu_pte_write`).
    func countStubStores() {
        if let s = cpl0Stubs, mode is ShadowPaging { cpu.counters.add(.mmuPteWrite, UInt64(s.storesPerStub)) }
    }

    public func switchAddressSpace(to space: AddressSpace) {
        // A load of the current space's root is a reload (cr3Stub), of another a switch.
        if let s = cpl0Stubs { chargeStub(s.cr3OtherInstructions, space === self.space ? costs.cr3Stub : costs.cr3SwitchStub) }
        self.space = space
        mode.switchAddressSpace(to: space, cpu: cpu)
        if space.flushOnFirstLoad {
            // A reused PCID: the CR3 load is made without the no-flush bit.
            space.flushOnFirstLoad = false
            cpu.tlb.flush(pcid: space.pcid)
            cpu.walkCaches.flush(pcid: space.pcid)
        }
        if let o = onSyncPoint { o(nil) }
    }

    public func flushTLB(of space: AddressSpace) {
        if let s = cpl0Stubs { chargeStub(s.cr3OtherInstructions, costs.cr3Stub) }
        mode.flushTLB(of: space, cpu: cpu)
        if let o = onSyncPoint { o(nil) }
    }

    public func addressSpaceDestroyed(_ space: AddressSpace) {
        mode.addressSpaceDestroyed(space, cpu: cpu)
    }

    /// Runs every access of `source`, calling `progress(accessesSoFar)` every 2^20 accesses.
    public func run<S: AccessSource>(_ source: inout S, progress: ((UInt64) -> Void)? = nil) throws -> Void {
        while let a = try source.nextAccess() {
            try step(a)
            if accesses & 0xFFFFF == 0, let p = progress { p(accesses) }
        }
    }

    /// One access: TLB look-up, a walk on a miss (with guest faults handled and retried), the data access.
    @inline(__always) public func step(_ a: Access) throws {
        let va = a.address.rawValue
        accesses &+= 1
        let write = a.kind == .write
        let fetch = a.kind == .execute
        if write { writes &+= 1 } else if fetch { fetches &+= 1 }
        // A read-modify-write is a load and then a store, each translated (compiled guest code
        // does `x = *p; *p = x ^ v`): the load may install a read-only translation that the
        // store must upgrade (a D-bit assist natively, a second hidden fault under shadow paging).
        if write && readModifyWrite { _ = try translate(va, kind: .read, write: false, fetch: false) }
        let entry = try translate(va, kind: a.kind, write: write, fetch: fetch)
        let pa = entry.base | (va & entry.size.offsetMask & ~7)
        if let o = observer { o(va, pa) }
        // Access i (0-based) is number `accesses - 1` here.
        if write {
            let v = (accesses &* 0x9E37_79B9_7F4A_7C15) ^ writeSalt
            if readModifyWrite {
                let x = data.read64(pa)
                checksum &+= x
                data.write64(pa, x ^ v)
            } else {
                data.write64(pa, v)
            }
        } else {
            checksum &+= data.read64(pa)
        }
    }

    /// A TLB miss, or a hit the entry does not permit (a write through a clean entry, a
    /// permission the entry lacks): such an entry is dropped and the walk sets D or faults.
    @inline(never) func missAfterLookup(_ va: UInt64, kind: AccessKind, dropStale: Bool) throws -> TLBEntry {
        if dropStale { tlb.invalidatePage(va, pcid: pcid) }
        return try miss(va, kind: kind)
    }

    /// One translation: a TLB look-up, a walk (and faults) on a miss.
    @inline(__always) func translate(_ va: UInt64, kind: AccessKind, write: Bool, fetch: Bool) throws -> TLBEntry {
        let hit = tlb.lookup(va, pcid: pcid, fetch: fetch)
        if let (e, level) = hit, Self.permits(e, write: write, fetch: fetch, user: cpu.privilege == .user) {
            if level == .l1 { l1Hits &+= 1 } else { l2Hits &+= 1 }
            return e
        }
        misses &+= 1
        return try missAfterLookup(va, kind: kind, dropStale: hit != nil)
    }

    @inline(__always) static func permits(_ e: TLBEntry, write: Bool, fetch: Bool, user: Bool) -> Bool {
        if user && !e.user { return false }
        if write && !(e.writable && e.dirty) { return false }
        if fetch && e.noExecute { return false }
        return true
    }

    func miss(_ va: UInt64, kind: AccessKind) throws -> TLBEntry {
        var attempts = 0
        while true {
            attempts += 1
            if attempts > 64 { throw GuestError(message: "access to \(GuestVirtualAddress(va)) did not resolve after 64 faults") }
            if let f = mode.takeHostFailure() { throw f }
            let outcome = spaceRef._withUnsafeGuaranteedRef { s in mode.resolveMiss(va, kind: kind, space: s, cpu: cpu) }
            switch outcome {
            case .translated(let e, let global, let refs, let cacheHit):
                walks &+= 1
                if refs > maxWalkRefs { maxWalkRefs = refs }
                walkRefs &+= UInt64(refs)
                if cacheHit { walkCacheHits &+= 1 }
                tlb.insert(va, pcid: pcid, entry: e, global: global, fetch: kind == .execute)
                return e
            case .guestFault(let code, let refs):
                faultedWalkRefs &+= UInt64(refs)
                guestFaults &+= 1
                walkRetries &+= 1
                // With emulated CPL0 stubs the delivery and IRET are the mode's faultInjection.
                if cpl0Stubs == nil { cpu.ledger.charge(.guestFaults, costs.guestExceptionRoundTrip) }
                if let s = cpl0Stubs {
                    // The #PF stub's instructions besides its IRET (inside faultInjection).
                    cpu.ledger.charge(.emulation, Double(s.pageFaultOtherInstructions) * costs.instructionEmulation)
                    cpu.counters.add(.insnEmulation, UInt64(s.pageFaultOtherInstructions + 1))
                    countStubIRETExits()
                    countStubStores()
                }
                switch kernel.handlePageFault(va, code: code, space: space) {
                case .demandZero(let size, let tablePages):
                    demandZero &+= 1
                    cpu.ledger.charge(.guestFaults, costs.demandZero(size) + Double(tablePages) * costs.guestPageTablePage)
                case .major(let size, let tablePages):
                    majorFaults &+= 1
                    cpu.ledger.charge(.guestFaults, costs.demandZero(size) + Double(tablePages) * costs.guestPageTablePage)
                    cpu.ledger.charge(.diskIO, costs.diskRead4K * Double(size.frames))
                    if !(mode is NativePaging) {
                        // virtio notify (an emulated I/O exit) and the completion interrupt.
                        cpu.counters.add(.exits, UInt64(costs.exitsPerDiskIO))
                        cpu.counters.add(.ioExits, 1)
                        cpu.ledger.charge(.vmExits, costs.vmExitRoundTrip * costs.exitsPerDiskIO)
                        cpu.ledger.charge(.emulation, costs.instructionEmulation)
                    }
                case .copyOnWrite(let copied):
                    cowFaults &+= 1
                    cpu.ledger.charge(.guestFaults, copied ? costs.guestDemandZero4K : costs.guestExceptionRoundTrip)
                case .segmentationFault(let why):
                    throw GuestError(message: "segmentation fault: \(why) (error code \(code))")
                case .outOfMemory:
                    throw GuestError(message: "guest out of memory at \(GuestVirtualAddress(va)) (\(ByteCount(kernel.frames.capacity)) of guest RAM)")
                }
            case .retry(let refs):
                faultedWalkRefs &+= UInt64(refs)
                walkRetries &+= 1
            case .emulated(let e, let refs):
                faultedWalkRefs &+= UInt64(refs)
                return e
            case .hostFailure(let error):
                throw error
            case .mmio(let refs):
                // Emulated by the hypervisor: nothing is cached, the next access exits again.
                faultedWalkRefs &+= UInt64(refs)
                throw GuestError(message: "MMIO access at \(GuestVirtualAddress(va)): the workload has no device to talk to")
            }
        }
    }

    /// Folds the hot counters into `cpu.counters` and returns them.
    @discardableResult public func finish() -> CounterSet {
        mode.settle(cpu: cpu)
        cpu.settleCosts()
        cpu.ledger.charge(.l2TLB, Double(l2Hits - chargedL2Hits) * costs.l2TLBHit)
        chargedL2Hits = l2Hits
        // Costs paid by every access, charged once here rather than per access.
        cpu.ledger.charge(.dataAccess, costs.dataAccess * Double(accesses - chargedAccesses))
        cpu.ledger.charge(.compute, computePerAccess * Double(accesses - chargedAccesses))
        chargedAccesses = accesses
        var c = cpu.counters
        c[.accesses] = accesses
        c[.writes] = writes
        c[.fetches] = fetches
        c[.reads] = accesses - writes - fetches
        c[.l1TLBHits] = l1Hits
        c[.l2TLBHits] = l2Hits
        c[.tlbHits] = l1Hits + l2Hits
        c[.tlbMisses] = misses
        c[.walks] = walks
        c[.walkMemoryRefs] = walkRefs
        c[.faultedWalkRefs] = faultedWalkRefs
        c[.walkCacheHits] = walkCacheHits
        c[.walkRetries] = walkRetries
        c[.guestPageFaults] = guestFaults
        c[.guestDemandZeroFaults] = demandZero
        if cowFaults > 0 { c[.guestCopyOnWriteFaults] = cowFaults }
        if majorFaults > 0 { c[.guestMajorFaults] = majorFaults }
        c[.guestPageTablePages] = kernel.tablePagesAllocated
        if fetches == 0 { c.markNotApplicable([.fetches]) }
        cpu.counters = c
        return c
    }
}
