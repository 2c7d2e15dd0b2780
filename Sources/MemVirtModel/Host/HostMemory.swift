import MemVirtCore

/// Whoever maps guest frames to host frames for the hardware: nested paging (EPT leaves) or
/// shadow paging (shadow entries, found through reverse maps). The host's reclaim reaches the
/// mappings only through this, as Linux reaches KVM only through mmu notifiers.
public protocol HostMappingOwner: AnyObject {
    /// Removes the host mapping of guest frame `gfn` and flushes whatever may cache it (KVM's
    /// kvm_unmap_gfn_range + kvm_flush_remote_tlbs, the mmu-notifier invalidation). Returns
    /// whether the mapping was written through (EPT D, a writable shadow entry): the page is
    /// dirty. The next guest access to `gfn` faults.
    @discardableResult func zap(gfn: UInt64) -> Bool
    /// Whether `gfn` was accessed since the last call (EPT A bit, shadow A bits), clearing the
    /// information (KVM's kvm_age_gfn; on x86 without a TLB flush).
    func accessedAndClear(gfn: UInt64) -> Bool
}

/// How a host fault was satisfied.
public enum HostFaultKind: Sendable, Equatable {
    /// A fresh zeroed page (first touch of the guest frame).
    case fresh
    /// The page was still in memory (swap cache, under writeback, read finished): no I/O.
    case swapCache
    /// Read from swap with the device model off (an untimed set-up phase).
    case swapInUntimed
    /// A read of a page KSM shares: mapped read-only.
    case ksmShared
    /// A write to a page KSM shares: a private copy.
    case cowBreak
}

/// The host's answer to a fault on a guest frame.
public enum HostFault: Sendable, Equatable {
    /// Map host frame `frame` (a host-physical address) now. `readyAt` later than the fault's
    /// time means the faulting context waited that long (direct reclaim waiting on writeback).
    case map(frame: UInt64, writable: Bool, kind: HostFaultKind, readyAt: Double)
    /// The page is being read from swap and is not usable before `readyAt` (ns). `started`:
    /// this fault submitted the read (a major fault).
    case io(readyAt: Double, started: Bool)
    /// Host memory and swap are both exhausted.
    case outOfMemory
}

/// What the host did for one owner (a VM), for its counters.
public struct HostOwnerStats: Sendable, Equatable {
    public var minorFaults: UInt64 = 0
    public var majorFaults: UInt64 = 0
    public var swapIns: UInt64 = 0
    public var swapOuts: UInt64 = 0
    public var cowBreaks: UInt64 = 0
}

/// The host's memory for one or more VMs: a memory-group analogue with a limit on resident
/// guest pages, on-demand frames, a clock over host frames driven by the accessed information
/// the mapping owner really has, a swap device and swap cache, and KSM's shared pages.
///
/// A guest page (owner, gfn) is absent (never backed), resident (in a host frame; mapped or
/// only in the swap cache), swapped (only in a swap slot) or shared by KSM. A resident page
/// keeps its swap slot while it is clean, so dropping it again costs no write (the swap cache).
/// Frames under writeback or being read count against the limit until the I/O completes.
public final class HostMemory: @unchecked Sendable {
    public let memory: PhysicalMemory
    public var frames: FrameAllocator
    /// Resident guest pages allowed, in 4 KiB frames (nil: no limit). EPT/shadow table pages
    /// are not counted (kernel memory, as in a memory cgroup without kmem accounting).
    public let limitFrames: UInt64?
    public let costs: HostCosts
    public var device: SwapDevice
    public let store: SwapStore
    /// With timing off, I/O completes at once (set-up phases that are not measured).
    public var timing = true

    enum PageState: UInt8 { case absent, resident, swapped, ksm }
    struct Page {
        var frame: UInt32 = 0
        var slot: Int32 = -1
        var state: PageState = .absent
        var mapped = false
        /// The in-memory content differs from the slot's (or there is no slot).
        var dirty = false
    }
    enum FrameState: UInt8 { case free, table, inUse, reading, writeback, ksm }
    struct FrameInfo {
        var state: FrameState = .free
        var owner: Int16 = -1
        var gfn: UInt32 = 0
        var referenced = false
        /// KSM: mappings sharing this frame.
        var sharers: UInt32 = 0
        /// reading: data ready; writeback: write done (ns).
        var time: Double = 0
    }
    final class Owner {
        unowned let mapper: HostMappingOwner
        var pages: [Page]
        var stats = HostOwnerStats()
        init(_ mapper: HostMappingOwner, frames: Int) {
            self.mapper = mapper
            pages = Array(repeating: Page(), count: frames)
        }
    }
    struct Writeback: Comparable {
        var time: Double
        var frame: UInt32
        static func < (a: Writeback, b: Writeback) -> Bool { a.time < b.time || (a.time == b.time && a.frame < b.frame) }
    }

    var owners: [Owner] = []
    var info: [FrameInfo]
    var writebacks = BinaryHeap<Writeback>()
    var hand: Int = 1
    var frameTop: Int = 1
    /// Data frames counted against the limit (in use, being read, under writeback, KSM).
    public private(set) var residentFrames: UInt64 = 0
    public private(set) var peakResidentFrames: UInt64 = 0
    /// Host kernel work done since the last `takeCycles()` (reclaim, swap-in submission).
    var pendingCycles: Double = 0
    /// Reclaim statistics.
    public private(set) var scanned: UInt64 = 0
    public private(set) var evicted: UInt64 = 0
    public private(set) var writebackRescues: UInt64 = 0
    public private(set) var throttles: UInt64 = 0
    public private(set) var throttleTime: Double = 0
    /// KSM state (see KSM.swift).
    var ksm = KSMState()

    /// `capacity`: host-physical bytes to reserve (guest RAM of every VM plus tables);
    /// `swapSlots`: pages the swap area holds (default: as many as the capacity).
    public init(capacity: UInt64, limit: ByteCount? = nil, swapDevice: SwapDeviceModel = .hdd, swapSlots: Int? = nil, costs: HostCosts = HostCosts()) throws(InputError) {
        // FrameAllocator works in whole GiB: round the reservation up (it is lazily backed).
        let rounded = (capacity + PageSize.size1G.offsetMask) & ~PageSize.size1G.offsetMask
        memory = try PhysicalMemory(capacity: rounded, name: "host-physical")
        memory.preferHugePages()
        frames = FrameAllocator(capacity: memory.capacity)
        limitFrames = limit.map { $0.rawValue / 4096 }
        if let l = limitFrames, l < 2 { throw InputError("host memory limit \(limit!) is below two pages") }
        self.costs = costs
        device = SwapDevice(model: swapDevice)
        store = try SwapStore(slots: swapSlots ?? Int(capacity / 4096))
        info = Array(repeating: FrameInfo(), count: Int(memory.capacity >> 12))
    }

    /// Adds a mapping owner (a VM) with `guestFrames` guest frames; returns its index.
    public func register(_ owner: HostMappingOwner, guestFrames: Int) -> Int {
        precondition(owners.count < Int(Int16.max))
        owners.append(Owner(owner, frames: guestFrames))
        return owners.count - 1
    }

    public func stats(owner: Int) -> HostOwnerStats { owners[owner].stats }

    /// Host kernel cycles spent since the last call (for the caller's ledger).
    public func takeCycles() -> Double {
        let c = pendingCycles
        pendingCycles = 0
        return c
    }

    // MARK: Frames

    /// A frame for paging structures (EPT or shadow tables): not counted against the limit.
    public func allocateTableFrame() -> UInt64? {
        guard let f = frames.allocate(.size4K) else { return nil }
        let n = Int(f >> 12)
        info[n].state = .table
        frameTop = max(frameTop, n + 1)
        return f
    }

    /// A frame outside the page model (large host pages without a limit).
    public func allocateUntracked(_ size: PageSize) -> UInt64? {
        precondition(limitFrames == nil || size == .size4K, "a host memory limit needs 4 KiB host pages")
        return frames.allocate(size)
    }

    func takeFreeFrame() -> UInt32? {
        guard let f = frames.allocate(.size4K) else { return nil }
        let n = Int(f >> 12)
        frameTop = max(frameTop, n + 1)
        residentFrames += 1
        peakResidentFrames = max(peakResidentFrames, residentFrames)
        return UInt32(n)
    }

    func releaseFrame(_ n: UInt32) {
        info[Int(n)] = FrameInfo()
        frames.free(UInt64(n) << 12, .size4K)
        residentFrames -= 1
    }

    /// Retires writebacks completed by `now`: their pages leave memory (only the slot remains).
    func retireWritebacks(now: Double) {
        while let w = writebacks.min, w.time <= now || !timing {
            writebacks.popMin()
            if finishWriteback(w) { releaseFrame(w.frame) }
        }
    }

    /// If the writeback `w` is still current, detaches its page from the frame (true).
    func finishWriteback(_ w: Writeback) -> Bool {
        let fi = info[Int(w.frame)]
        guard fi.state == .writeback && fi.time == w.time else { return false }
        let o = owners[Int(fi.owner)]
        o.pages[Int(fi.gfn)].state = .swapped
        o.pages[Int(fi.gfn)].frame = 0
        return true
    }

    /// A data frame for a new resident page at `now`, reclaiming when at the limit. Returns
    /// the frame number and when it is usable (later than `now` if reclaim had to wait for a
    /// writeback to finish), or nil when nothing can be reclaimed.
    func allocateDataFrame(now: Double) -> (UInt32, Double)? {
        retireWritebacks(now: now)
        if limitFrames == nil || residentFrames < limitFrames! {
            if let n = takeFreeFrame() { return (n, now) }
            if limitFrames == nil { return nil }
        }
        if let n = reclaim(now: now) { return (n, now) }
        retireWritebacks(now: now)
        if residentFrames < limitFrames!, let n = takeFreeFrame() { return (n, now) }
        // Every candidate is under writeback: wait for the first one to finish.
        while let w = writebacks.popMin() {
            if finishWriteback(w) {
                info[Int(w.frame)] = FrameInfo()
                throttles += 1
                let t = max(w.time, now)
                throttleTime += t - now
                return (w.frame, t)
            }
        }
        return nil
    }

    /// The clock: second chance by accessed information, eviction to swap, in batches of
    /// SWAP_CLUSTER_MAX = 32 pages as memcg direct reclaim does (try_to_free_mem_cgroup_pages).
    /// Clean victims are freed at once (the first is returned, still counted as resident, for
    /// reuse; the others go to the free list); dirty victims are written out and freed when
    /// the write completes.
    func reclaim(now: Double) -> UInt32? {
        let span = max(frameTop - 1, 1)
        var budget = 2 * span + 2
        var submitted = 0
        var kept: UInt32?
        while budget > 0 && submitted < 32 {
            budget -= 1
            hand += 1
            if hand >= frameTop { hand = 1 }
            let n = hand
            switch info[n].state {
            case .reading:
                // A completed read: the page sits in the swap cache, just used.
                if info[n].time <= now || !timing { info[n].state = .inUse; info[n].referenced = true }
                continue
            case .inUse: break
            default: continue
            }
            scanned += 1
            pendingCycles += costs.reclaimScan
            let o = owners[Int(info[n].owner)]
            let gfn = Int(info[n].gfn)
            if o.pages[gfn].mapped {
                if o.mapper.accessedAndClear(gfn: UInt64(gfn)) { continue }
            } else if info[n].referenced {
                info[n].referenced = false
                continue
            }
            // Evict.
            evicted += 1
            pendingCycles += costs.reclaimEvict
            if o.pages[gfn].mapped {
                // The mmu-notifier invalidation: KVM zaps the entry and flushes remote TLBs.
                pendingCycles += costs.remoteFlushInitiator
                if o.mapper.zap(gfn: UInt64(gfn)) { o.pages[gfn].dirty = true }
                o.pages[gfn].mapped = false
            }
            if o.pages[gfn].dirty || o.pages[gfn].slot < 0 {
                if o.pages[gfn].slot >= 0 { store.release(o.pages[gfn].slot) }
                guard let slot = store.allocate() else {
                    o.pages[gfn].slot = -1
                    o.pages[gfn].dirty = true
                    continue  // swap full: the page stays (unmapped, in memory)
                }
                store.memory.copy(from: memory, at: UInt64(n) << 12, to: store.address(slot), bytes: 4096)
                o.pages[gfn].slot = slot
                o.pages[gfn].dirty = false
                o.stats.swapOuts += 1
                if timing {
                    let done = device.submit(at: now, write: true)
                    info[n].state = .writeback
                    info[n].time = done
                    writebacks.insert(Writeback(time: done, frame: UInt32(n)))
                    submitted += 1
                    continue
                }
            }
            // Clean (or written at once): the frame is free now.
            o.pages[gfn].state = .swapped
            o.pages[gfn].frame = 0
            submitted += 1
            if kept == nil {
                info[n] = FrameInfo()
                kept = UInt32(n)
            } else {
                releaseFrame(UInt32(n))
            }
        }
        return kept
    }

    func claim(_ n: UInt32, owner: Int, gfn: UInt64, state: FrameState) {
        info[Int(n)].state = state
        info[Int(n)].owner = Int16(owner)
        info[Int(n)].gfn = UInt32(gfn)
        info[Int(n)].referenced = false
    }

    // MARK: Faults

    /// A fault on guest frame `gfn` of `owner` at time `now` (ns), for a write or not.
    public func fault(owner: Int, gfn: UInt64, write: Bool, now: Double) -> HostFault {
        let o = owners[owner]
        let g = Int(gfn)
        precondition(g < o.pages.count, "guest frame \(gfn) beyond the VM's memory")
        switch o.pages[g].state {
        case .absent:
            guard let (n, t) = allocateDataFrame(now: now) else { return .outOfMemory }
            claim(n, owner: owner, gfn: gfn, state: .inUse)
            memory.zero(UInt64(n) << 12, bytes: 4096)
            o.pages[g] = Page(frame: n, slot: -1, state: .resident, mapped: true, dirty: true)
            o.stats.minorFaults += 1
            return .map(frame: UInt64(n) << 12, writable: true, kind: .fresh, readyAt: t)
        case .resident:
            let n = Int(o.pages[g].frame)
            if info[n].state == .reading {
                if timing && info[n].time > now { return .io(readyAt: info[n].time, started: false) }
                info[n].state = .inUse
            } else if info[n].state == .writeback {
                info[n].state = .inUse
                writebackRescues += 1
            }
            o.pages[g].mapped = true
            o.stats.minorFaults += 1
            pendingCycles += costs.swapCacheHit
            return .map(frame: UInt64(n) << 12, writable: true, kind: .swapCache, readyAt: now)
        case .swapped:
            guard let (n, t) = allocateDataFrame(now: now) else { return .outOfMemory }
            let slot = o.pages[g].slot
            claim(n, owner: owner, gfn: gfn, state: .inUse)
            memory.copy(from: store.memory, at: store.address(slot), to: UInt64(n) << 12, bytes: 4096)
            o.pages[g].state = .resident
            o.pages[g].frame = n
            o.pages[g].dirty = false
            o.stats.majorFaults += 1
            o.stats.swapIns += 1
            pendingCycles += costs.swapInSubmit
            if timing {
                let done = device.submit(at: t, write: false)
                info[Int(n)].state = .reading
                info[Int(n)].time = done
                o.pages[g].mapped = false
                return .io(readyAt: done, started: true)
            }
            o.pages[g].mapped = true
            return .map(frame: UInt64(n) << 12, writable: true, kind: .swapInUntimed, readyAt: t)
        case .ksm:
            let k = o.pages[g].frame
            if !write {
                o.pages[g].mapped = true
                o.stats.minorFaults += 1
                return .map(frame: UInt64(k) << 12, writable: false, kind: .ksmShared, readyAt: now)
            }
            guard let (n, t) = allocateDataFrame(now: now) else { return .outOfMemory }
            claim(n, owner: owner, gfn: gfn, state: .inUse)
            memory.copy(from: UInt64(k) << 12, to: UInt64(n) << 12, bytes: 4096)
            pendingCycles += costs.pageCopy
            ksmUnshare(frame: k)
            o.pages[g] = Page(frame: n, slot: -1, state: .resident, mapped: true, dirty: true)
            o.stats.minorFaults += 1
            o.stats.cowBreaks += 1
            return .map(frame: UInt64(n) << 12, writable: true, kind: .cowBreak, readyAt: t)
        }
    }

    /// Makes a page whose read is in flight usable now (a context that cannot wait in simulated
    /// time, such as the guest kernel's own access: its vCPU is charged the wait instead).
    public func completeReadNow(owner: Int, gfn: UInt64) {
        let p = owners[owner].pages[Int(gfn)]
        guard p.state == .resident, info[Int(p.frame)].state == .reading else { return }
        info[Int(p.frame)].state = .inUse
    }

    /// Whether the guest frame is resident and its read (if any) finished by `now`.
    public func isReady(owner: Int, gfn: UInt64, now: Double) -> Bool {
        let p = owners[owner].pages[Int(gfn)]
        switch p.state {
        case .resident: return info[Int(p.frame)].state != .reading || info[Int(p.frame)].time <= now || !timing
        case .ksm: return true
        default: return false
        }
    }

    /// When the owner unmaps a page for its own reasons (KSM merge does this itself).
    public func noteUnmapped(owner: Int, gfn: UInt64) { owners[owner].pages[Int(gfn)].mapped = false }

    // MARK: Inspection (tests, reports)

    /// A hash of the page's content wherever it is (frame, swap slot, KSM page); nil if never backed.
    public func contentHash(owner: Int, gfn: UInt64) -> UInt64? {
        let p = owners[owner].pages[Int(gfn)]
        var h: UInt64 = FNV1a.offsetBasis
        switch p.state {
        case .absent: return nil
        case .resident, .ksm: memory.hash(UInt64(p.frame) << 12, bytes: 4096, into: &h)
        case .swapped: store.memory.hash(store.address(p.slot), bytes: 4096, into: &h)
        }
        return h
    }

    /// Where a page is: "absent", "resident", "swapped" or "ksm".
    public func location(owner: Int, gfn: UInt64) -> String {
        switch owners[owner].pages[Int(gfn)].state {
        case .absent: "absent"
        case .resident: "resident"
        case .swapped: "swapped"
        case .ksm: "ksm"
        }
    }

    /// Checks the bookkeeping (O(frames)): every counted frame belongs to a page that points
    /// back to it; the resident count matches and is within the limit. Returns problems found.
    public func invariantViolations() -> [String] {
        var problems: [String] = []
        var counted: UInt64 = 0
        for n in 1..<max(frameTop, 2) {
            let fi = info[n]
            switch fi.state {
            case .inUse, .reading, .writeback:
                counted += 1
                let p = owners[Int(fi.owner)].pages[Int(fi.gfn)]
                if p.state != .resident || Int(p.frame) != n { problems.append("frame \(n) claims page \(fi.gfn) of owner \(fi.owner), which is \(p.state)") }
            case .ksm:
                counted += 1
                if fi.sharers == 0 { problems.append("KSM frame \(n) has no sharers") }
            default: break
            }
        }
        if counted != residentFrames { problems.append("resident count \(residentFrames) but \(counted) frames in use") }
        if let l = limitFrames, peakResidentFrames > l { problems.append("peak resident \(peakResidentFrames) frames above the limit \(l)") }
        return problems
    }
}
