import MemVirtCore

/// The migration network link.
public struct MigrationLink: Sendable, Hashable {
    /// Bytes per second: 128 MiB/s, QEMU's default `max-bandwidth` (docs/references.md, Live migration).
    public var bandwidth: Double = 128 * 1_048_576
    /// One-way latency, seconds: 0.25 ms (a LAN round trip of ~0.5 ms; estimate).
    public var latency: Double = 0.000_25
    /// Bytes on the wire per 4 KiB page: the page plus QEMU's 8-byte page header (ram_addr | flags).
    public var pageWireBytes: Double = 4096 + 8
    public init() {}
    public var secondsPerPage: Double { pageWireBytes / bandwidth }
}

public enum MigrationKind: Sendable, Hashable, CustomStringConvertible {
    /// Rounds of dirty pages while the guest runs, then stop-and-copy.
    case preCopy
    /// Switch at once; the destination faults pages over the link while the source pushes.
    case postCopy
    /// `preCopyRounds` pre-copy rounds (the bulk round included), then post-copy.
    case hybrid(preCopyRounds: Int)
    public var description: String {
        switch self {
        case .preCopy: "pre-copy"
        case .postCopy: "post-copy"
        case .hybrid(let n): "hybrid(\(n))"
        }
    }
}

public struct MigrationConfig: Sendable {
    public var kind: MigrationKind = .preCopy
    public var harvest: HarvestMethod = .bitmap
    public var link = MigrationLink()
    /// QEMU's default downtime limit, 300 ms (docs/references.md, Live migration).
    public var downtimeLimit: Double = 0.300
    /// Iterations after the bulk round before giving up on convergence (then a forced stop).
    public var maxRounds = 30
    /// QEMU auto-converge: throttle 20%, then +10% per step, up to 99%, stepped when dirtying
    /// exceeds half the bytes transferred in a period twice (docs/references.md, Live migration; migration/ram.c).
    public var autoConverge = false
    public var throttleInitial = 0.20
    public var throttleIncrement = 0.10
    public var throttleMax = 0.99
    /// Page groups (seed 004): pages made writable and marked dirty per write fault.
    public var pageGroup = 1
    /// Post-copy: missing pages sent right after a faulted one (pre-paging, Hines & Gopalan 2009).
    public var prepageNeighbours = 15
    /// Post-copy: destination fault handling besides the round trip (userfaultfd + UFFDIO_COPY
    /// handler): 10 us (docs/references.md, Measured on our hosts: the handler itself 10-12 us).
    public var postcopyFaultHandler: Double = 0.000_010
    /// Pause, device state and resume at switch-over: 5 ms (estimate; a few hundred KiB of
    /// device state at 128 MiB/s is ~2-3 ms).
    public var switchoverFixed: Double = 0.005
    /// Whether the guest runs on the destination during post-copy (false: it stays paused, for
    /// hash checks of the destination against the source at switch-over).
    public var guestRunsAfterSwitch = true
    public var trackingCosts = DirtyTrackingCosts()
    /// Pages sent between guest time slices (granularity of the interleaving).
    public var chunkPages = 32
    public init() {}
}

/// One round of a migration.
public struct MigrationRound: Sendable {
    public var index: Int
    public var phase: String
    /// Dirty pages the harvest before this round reported (the bulk round: pages backed).
    public var dirtyPages: Int
    public var pagesSent: Int
    public var bytes: Double
    public var seconds: Double
    public var throttle: Double
    public var guestAccesses: UInt64
    /// Tracking work in this round (faults, exits, harvest).
    public var tracking: DirtyTrackingStats
}

public struct MigrationResult: Sendable {
    public var kind: MigrationKind
    public var tracking: DirtyTrackingMode
    public var rounds: [MigrationRound] = []
    public var totalSeconds = 0.0
    public var downtimeSeconds = 0.0
    public var bytes = 0.0
    public var pagesSent = 0
    /// Sends of a page that had been sent before.
    public var pagesResent = 0
    public var converged = true
    public var finalThrottle = 0.0
    /// Whole-memory hashes: source at switch-over and destination (pre-copy: after the
    /// stop-and-copy; post-copy: at switch-over, pre-copied pages plus the missing pages as
    /// the source holds them).
    public var sourceHash: UInt64 = 0
    public var destinationHash: UInt64 = 0
    public var hashesMatch: Bool { sourceHash == destinationHash }
    /// Post-copy: the destination after every page arrived, when the guest stayed paused
    /// (equals `sourceHash` if nothing was lost), else nil.
    public var destinationFinalHash: UInt64?
    public var postcopyFaults = 0
    public var prepagedPages = 0
    public var pushedPages = 0
    public var postcopyBlockedSeconds = 0.0
    /// Guest accesses completed during the migration, and at the baseline rate.
    public var guestAccesses: UInt64 = 0
    public var baselineAccessesPerSecond = 0.0
    public var guestSlowdown: Double {
        guard totalSeconds > 0, baselineAccessesPerSecond > 0 else { return 0 }
        return max(0, 1 - Double(guestAccesses) / (totalSeconds * baselineAccessesPerSecond))
    }
    public var trackingTotals = DirtyTrackingStats()
    public var wallSeconds = 0.0
}

/// A guest running a workload on one paging mode, with its dirty tracker: the migration source.
public final class MigrationGuest {
    public let machine: any MachineRunner
    public let tracker: any DirtyTracker
    public let spec: WorkloadSpec
    public let guestCapacity: UInt64
    var generator: AccessGenerator
    var lastPA: UInt64 = 0
    /// Called after every access with (access, host-physical address written or read).
    public var onAccess: ((Access, UInt64) -> Void)?
    let clockHz: Double
    /// Guest CPU seconds (the ledger, settled).
    public private(set) var guestSeconds = 0.0
    public private(set) var accessesDone: UInt64 = 0
    var secondsPerAccess = 1e-6

    /// Builds the guest: its paging mode (from `tracking`), one process with `spec`'s area,
    /// every page touched once (a guest that has been running), `computePerAccess` from spec.
    public init(tracking: DirtyTrackingMode, spec: WorkloadSpec, guestCapacity: UInt64 = 1 << 30, costs: CostModel = .vmxEPT,
                hostPageSize: PageSize = .size4K, pageSize: PageSize = .size4K, prefault: Bool = true) throws {
        try spec.validate()
        self.spec = spec
        self.guestCapacity = guestCapacity
        clockHz = costs.clockGHz * 1e9
        let cpu = ModelCPU(tlb: .goldenCove, paging: PagingConfig(), costs: costs)
        cpu.modelLineCache = false
        switch tracking.paging {
        case .shadow:
            let mode = try ShadowPaging(guestCapacity: guestCapacity, hostPageSize: hostPageSize)
            mode.logDirtyXenStyle = tracking == .shadowDropAll
            machine = try Self.machine(mode, cpu, guestCapacity, spec)
            tracker = mode
        case .nested:
            let mode = try NestedPaging(cpu: cpu, guestCapacity: guestCapacity, hostPageSize: hostPageSize)
            machine = try Self.machine(mode, cpu, guestCapacity, spec)
            tracker = try NestedDirtyTracker(nested: mode, mode: tracking, guestCapacity: guestCapacity)
        case .native:
            throw InputError("dirty tracking needs shadow or nested paging")
        }
        generator = try AccessGenerator(spec: spec)
        let area = VirtualMemoryArea(start: spec.base.rawValue, end: spec.base.rawValue + ((spec.footprint.rawValue + pageSize.offsetMask) & ~pageSize.offsetMask),
                                     pageSize: pageSize, writable: true)
        guard area.end - area.start + (16 << 20) <= guestCapacity else { throw InputError("footprint \(spec.footprint) does not fit \(ByteCount(guestCapacity)) of guest memory") }
        try machine.kernel.map(area, in: machine.space)
        machine.observer = { [unowned self] _, pa in self.lastPA = pa }
        if prefault {
            var va = area.start
            while va < area.end {
                try machine.step(Access(address: GuestVirtualAddress(va), kind: .write))
                va += pageSize.bytes
            }
        }
        settle()
    }

    static func machine<M: PagingMode>(_ mode: M, _ cpu: ModelCPU, _ capacity: UInt64, _ spec: WorkloadSpec) throws -> Machine<M> {
        let kernel = SimulatedGuestKernel(memory: mode.guestMemory, capacity: capacity, paging: cpu.paging)
        let space = try kernel.createAddressSpace()
        let m = Machine(mode: mode, cpu: cpu, kernel: kernel, space: space, computePerAccess: spec.computePerAccess)
        m.switchAddressSpace(to: space)
        return m
    }

    public var cpu: ModelCPU { machine.cpu }

    func settle() {
        _ = machine.finish()
        guestSeconds = machine.cpu.ledger.total / clockHz
    }

    /// Runs the workload for `seconds` of guest CPU time; `before` is called before each
    /// access (post-copy's missing-page check) and returns seconds the vCPU was blocked,
    /// which count against the budget. Returns the seconds used (CPU plus blocked; at least
    /// `seconds`, more by the last access's overshoot).
    @discardableResult
    func run(seconds: Double, before: ((Access) -> Double)? = nil) throws -> Double {
        guard seconds > 0 else { return 0 }
        let start = guestSeconds
        var blocked = 0.0
        while guestSeconds + blocked - start < seconds {
            let left = seconds - (guestSeconds + blocked - start)
            let n = max(1, min(4096, Int(left / max(secondsPerAccess, 1e-9))))
            let a0 = accessesDone, t0 = guestSeconds
            var done = 0
            while done < n {
                let a = generator.next()
                done += 1
                var waited = 0.0
                if let b = before { waited = b(a) }
                try machine.step(a)
                if let o = onAccess { o(a, lastPA) }
                if waited > 0 {
                    blocked += waited
                    break
                }
            }
            accessesDone &+= UInt64(done)
            settle()
            if accessesDone > a0 && blocked == 0 { secondsPerAccess = (guestSeconds - t0) / Double(accessesDone - a0) }
        }
        return guestSeconds + blocked - start
    }

    /// Runs the workload for `seconds` of guest CPU time (no migration).
    public func runWorkload(seconds: Double) throws { try run(seconds: seconds) }

    /// Guest accesses per guest-CPU second without tracking, measured over `seconds`.
    public func measureBaseline(seconds: Double) throws -> Double {
        let a0 = accessesDone, t0 = guestSeconds
        try run(seconds: seconds)
        return Double(accessesDone - a0) / max(guestSeconds - t0, 1e-12)
    }
}

/// Live migration of a `MigrationGuest` to a destination memory over a modeled link.
public final class MigrationSimulation {
    public let guest: MigrationGuest
    public let config: MigrationConfig
    var tracker: any DirtyTracker { guest.tracker }
    /// The destination's guest-physical memory (flat, gpa-indexed).
    public let destination: PhysicalMemory
    public private(set) var received: GfnBitmap
    var sentOnce: GfnBitmap
    var result: MigrationResult
    var wall = 0.0
    /// Guest CPU time run beyond its budgets so far (taken from the next budget).
    var guestDebt = 0.0
    var throttle = 0.0
    var bytesSinceSync = 0.0
    var dirtyHighCount = 0
    var statsMark = DirtyTrackingStats()
    var accessesMark: UInt64 = 0
    var roundStart = 0.0
    /// Post-copy: pages still at the source, and the source's copy of them at switch-over.
    public private(set) var missing: GfnBitmap
    var frozen: PhysicalMemory?
    var postcopySwitched = false

    public init(guest: MigrationGuest, config: MigrationConfig) throws {
        self.guest = guest
        self.config = config
        destination = try PhysicalMemory(capacity: guest.guestCapacity, name: "destination guest-physical")
        received = GfnBitmap(frames: guest.tracker.guestFrames)
        sentOnce = GfnBitmap(frames: guest.tracker.guestFrames)
        missing = GfnBitmap(frames: guest.tracker.guestFrames)
        result = MigrationResult(kind: config.kind, tracking: guest.tracker.trackingMode)
    }

    var cpu: ModelCPU { guest.cpu }
    var link: MigrationLink { config.link }

    /// Runs the migration; `baselineSeconds` of untracked guest time first measure the guest's
    /// own access rate (for the slowdown).
    public func run(baselineSeconds: Double = 0.02) throws -> MigrationResult {
        let clock = WallClock()
        result.baselineAccessesPerSecond = try guest.measureBaseline(seconds: baselineSeconds)
        let accessesAtStart = guest.accessesDone
        tracker.startLogging(cpu: cpu, method: config.harvest, groupSize: config.pageGroup, costs: config.trackingCosts)
        statsMark = DirtyTrackingStats()
        try advance(seconds: tracker.trackingStats.harvestCycles / (cpu.costs.clockGHz * 1e9))
        // Bulk round: every page the guest has ever touched.
        let preRounds: Int
        switch config.kind {
        case .preCopy: preRounds = Int.max
        case .postCopy: preRounds = 0
        case .hybrid(let n): preRounds = max(1, n)
        }
        var pending = tracker.backedFrames()
        if preRounds == 0 {
            try switchToPostCopy(pending: pending)
        } else {
            beginRound()
            try send(pending)
            endRound(index: 0, phase: "bulk", dirty: pending.count, sent: pending.count)
            var round = 1
            while true {
                let h = try harvest()
                pending = h
                autoConverge(dirty: h.count)
                let estimate = Double(pending.count) * link.secondsPerPage + link.latency
                if estimate <= config.downtimeLimit {
                    try stopAndCopy(pending: pending)
                    break
                }
                if round >= preRounds && preRounds != Int.max {
                    try switchToPostCopy(pending: pending)
                    break
                }
                if round > config.maxRounds {
                    result.converged = false
                    try stopAndCopy(pending: pending)
                    break
                }
                beginRound()
                try send(pending)
                endRound(index: round, phase: "iterate", dirty: pending.count, sent: pending.count)
                round += 1
            }
        }
        result.totalSeconds = wall
        result.guestAccesses = guest.accessesDone - accessesAtStart
        result.finalThrottle = throttle
        result.trackingTotals = tracker.trackingStats
        tracker.stopLogging(cpu: cpu)
        result.wallSeconds = clock.seconds
        return result
    }

    func beginRound() {
        roundStart = wall
        accessesMark = guest.accessesDone
    }

    func endRound(index: Int, phase: String, dirty: Int, sent: Int) {
        let s = tracker.trackingStats
        result.rounds.append(MigrationRound(
            index: index, phase: phase, dirtyPages: dirty, pagesSent: sent, bytes: Double(sent) * link.pageWireBytes,
            seconds: wall - roundStart, throttle: throttle, guestAccesses: guest.accessesDone - accessesMark, tracking: s - statsMark))
        statsMark = s
    }

    /// Lets `seconds` of wall time pass with the guest running (throttled).
    func advance(seconds: Double) throws {
        guard seconds > 0 else { return }
        let budget = seconds * (1 - throttle) - guestDebt
        if budget > 0 {
            guestDebt = try guest.run(seconds: budget) - budget
        } else {
            guestDebt = -budget
        }
        wall += seconds
    }

    /// Harvests the dirty log; its time passes with the guest running.
    func harvest() throws -> [UInt64] {
        let before = tracker.trackingStats.harvestCycles
        let list = tracker.harvest(cpu: cpu)
        try advance(seconds: (tracker.trackingStats.harvestCycles - before) / (cpu.costs.clockGHz * 1e9))
        return list
    }

    func copy(_ gfn: UInt64) {
        if let p = tracker.sourcePage(gfn) {
            destination.copy(from: tracker.sourceMemory, at: p, to: gfn << 12, bytes: 4096)
        } else {
            destination.zero(gfn << 12, bytes: 4096)
        }
        received.insert(gfn)
        if !sentOnce.insert(gfn) { result.pagesResent += 1 }
        result.pagesSent += 1
        result.bytes += link.pageWireBytes
        bytesSinceSync += link.pageWireBytes
    }

    /// Sends `pages` while the guest runs: each chunk is copied when its transfer starts.
    func send(_ pages: [UInt64]) throws {
        var i = 0
        let c = max(1, config.chunkPages)
        while i < pages.count {
            let end = min(i + c, pages.count)
            for j in i..<end { copy(pages[j]) }
            try advance(seconds: Double(end - i) * link.secondsPerPage)
            i = end
        }
    }

    /// QEMU's auto-converge (migration_trigger_throttle): dirtying above half the transfer of
    /// the period, twice, raises the throttle.
    func autoConverge(dirty: Int) {
        defer { bytesSinceSync = 0 }
        guard config.autoConverge else { return }
        if Double(dirty) * 4096 > bytesSinceSync / 2 {
            dirtyHighCount += 1
            if dirtyHighCount >= 2 {
                throttle = throttle == 0 ? config.throttleInitial : min(config.throttleMax, throttle + config.throttleIncrement)
                dirtyHighCount = 0
            }
        }
    }

    /// Hash of the destination: received pages as they are, others zero.
    public func destinationHash() -> UInt64 {
        var h: UInt64 = FNV1a.offsetBasis
        for gfn in 0..<tracker.guestFrames {
            if received.contains(gfn) {
                var ph: UInt64 = FNV1a.offsetBasis
                destination.hash(gfn << 12, bytes: 4096, into: &ph)
                h = GuestMemoryHash.combine(h, ph)
            } else {
                h = GuestMemoryHash.combine(h, GuestMemoryHash.zeroPageHash)
            }
        }
        return h
    }

    /// Pauses the guest, sends what is dirty, compares whole-memory hashes.
    func stopAndCopy(pending: [UInt64]) throws {
        beginRound()
        let t0 = wall
        var final = GfnBitmap(frames: tracker.guestFrames)
        for g in pending { final.insert(g) }
        let before = tracker.trackingStats.harvestCycles
        for g in tracker.harvest(cpu: cpu) { final.insert(g) }
        wall += (tracker.trackingStats.harvestCycles - before) / (cpu.costs.clockGHz * 1e9)
        let list = final.members
        for g in list { copy(g) }
        wall += Double(list.count) * link.secondsPerPage + link.latency + config.switchoverFixed
        result.downtimeSeconds = wall - t0
        result.sourceHash = tracker.guestMemoryHash()
        result.destinationHash = destinationHash()
        endRound(index: result.rounds.count, phase: "stop-and-copy", dirty: list.count, sent: list.count)
    }

    // MARK: post-copy

    /// Pauses the source, marks every page not current on the destination missing, and
    /// resumes the guest on the destination, which fetches missing pages on access while the
    /// source pushes the rest.
    ///
    /// The running machine's memory becomes the destination's: the source's copy of each
    /// missing page moves to `frozen` and the page is zeroed in the running memory, so an
    /// access that is not served by a fetch reads zeros and the tests see it.
    func switchToPostCopy(pending: [UInt64]) throws {
        beginRound()
        let t0 = wall
        var stale = GfnBitmap(frames: tracker.guestFrames)
        for g in pending { stale.insert(g) }
        let before = tracker.trackingStats.harvestCycles
        for g in tracker.harvest(cpu: cpu) { stale.insert(g) }
        wall += (tracker.trackingStats.harvestCycles - before) / (cpu.costs.clockGHz * 1e9)
        tracker.stopLogging(cpu: cpu)
        result.sourceHash = tracker.guestMemoryHash()
        let store = try PhysicalMemory(capacity: guest.guestCapacity, name: "post-copy source")
        var missingCount = 0
        for gfn in tracker.backedFrames() where stale.contains(gfn) || !received.contains(gfn) {
            guard let p = tracker.sourcePage(gfn) else { continue }
            store.copy(from: tracker.sourceMemory, at: p, to: gfn << 12, bytes: 4096)
            missing.insert(gfn)
            missingCount += 1
        }
        // The destination at switch-over: pre-copied pages, and the missing ones as the
        // source holds them.
        var h: UInt64 = FNV1a.offsetBasis
        for gfn in 0..<tracker.guestFrames {
            var ph: UInt64 = FNV1a.offsetBasis
            if missing.contains(gfn) { store.hash(gfn << 12, bytes: 4096, into: &ph) } else if received.contains(gfn) {
                destination.hash(gfn << 12, bytes: 4096, into: &ph)
            } else { ph = GuestMemoryHash.zeroPageHash }
            h = GuestMemoryHash.combine(h, ph)
        }
        result.destinationHash = h
        for gfn in missing.members { if let p = tracker.sourcePage(gfn) { tracker.sourceMemory.zero(p, bytes: 4096) } }
        frozen = store
        postcopySwitched = true
        // The vCPU moved: its TLBs start cold on the destination.
        cpu.tlb.flushAll(keepGlobal: false)
        cpu.walkCaches.flushAll()
        wall += 2 * link.latency + config.switchoverFixed
        result.downtimeSeconds = wall - t0
        endRound(index: result.rounds.count, phase: "switch-over", dirty: missingCount, sent: 0)

        // Post-copy phase: slices in which the link pushes pages and the guest runs.
        beginRound()
        var queue = missing.members
        var qi = 0
        let slicePages = max(1, config.chunkPages)
        let slice = Double(slicePages) * link.secondsPerPage
        var remaining = missingCount
        var demandPages = 0
        let space = guest.machine.space
        let levels = cpu.paging.levels
        let mem = tracker.sourceMemory
        func fetch(_ gfn: UInt64) {
            guard missing.contains(gfn), let p = tracker.sourcePage(gfn) else { return }
            mem.copy(from: store, at: gfn << 12, to: p, bytes: 4096)
            missing.remove(gfn)
            remaining -= 1
            if !sentOnce.insert(gfn) { result.pagesResent += 1 }
            received.insert(gfn)
            result.pagesSent += 1
            result.bytes += link.pageWireBytes
            demandPages += 1
        }
        /// Faults the page (and its neighbours) over: the vCPU waits a round trip and the page.
        func demand(_ gfn: UInt64) -> Double {
            guard missing.contains(gfn) else { return 0 }
            fetch(gfn)
            result.postcopyFaults += 1
            var n = 0
            var g = gfn + 1
            while n < config.prepageNeighbours && g < tracker.guestFrames {
                if missing.contains(g) { fetch(g); n += 1; result.prepagedPages += 1 }
                g += 1
            }
            let blocked = 2 * link.latency + link.secondsPerPage + config.postcopyFaultHandler
            result.postcopyBlockedSeconds += blocked
            return blocked
        }
        let check: (Access) -> Double = { a in
            guard remaining > 0 else { return 0 }
            var blocked = 0.0
            let va = a.address.rawValue
            // Each guest table on the way is demanded first, then the page itself.
            let s = TableWalk.descend(.paging, root: space.root & ~0xfff, levels: levels, address: va) { ea in
                blocked += demand(ea >> 12)
                guard let hp = self.tracker.sourcePage(ea >> 12) else { return nil }
                return mem.read64(hp | (ea & 0xfff))
            }
            guard let s, s.isLeaf else { return blocked }
            let gpa = (s.raw & PageTableEntry.addressMask & ~s.size.offsetMask) | (va & s.size.offsetMask)
            blocked += demand(gpa >> 12)
            return blocked
        }
        while remaining > 0 {
            demandPages = 0
            // The slice lasts as long as the guest ran (its waits included) and the link
            // needed for the pages it faulted over, at least `slice`.
            var used = 0.0
            if config.guestRunsAfterSwitch { used = try guest.run(seconds: slice, before: check) }
            let dt = max(slice, used, Double(demandPages) * link.secondsPerPage)
            // The link pushes what the demand fetches left of this slice's capacity.
            var budget = Int(dt / link.secondsPerPage) - demandPages
            while budget > 0 && qi < queue.count {
                let g = queue[qi]
                qi += 1
                if missing.contains(g) { fetch(g); result.pushedPages += 1; budget -= 1 }
            }
            wall += dt
            if qi >= queue.count && remaining > 0 { queue = missing.members; qi = 0 }
        }
        endRound(index: result.rounds.count, phase: "post-copy", dirty: 0, sent: result.pushedPages + result.postcopyFaults + result.prepagedPages)
        if !config.guestRunsAfterSwitch { result.destinationFinalHash = tracker.guestMemoryHash() }
    }

    /// Reads the 8-byte value at guest-virtual `va` on the destination (the guest's tables
    /// walked in the destination's memory): pre-copy's flat destination, or post-copy's
    /// running memory. Nil if unmapped there.
    public func destinationRead(_ va: UInt64) -> UInt64? {
        let levels = cpu.paging.levels
        let read: (UInt64) -> UInt64? = { gpa in
            if self.postcopySwitched {
                guard let p = self.tracker.sourcePage(gpa >> 12) else { return 0 }
                return self.tracker.sourceMemory.read64(p | (gpa & 0xfff))
            }
            return self.received.contains(gpa >> 12) ? self.destination.read64(gpa) : 0
        }
        let s = TableWalk.descend(.paging, root: guest.machine.space.root & ~0xfff, levels: levels, address: va, read: read)
        guard let s, s.isLeaf else { return nil }
        return read((s.raw & PageTableEntry.addressMask & ~s.size.offsetMask) | (va & s.size.offsetMask & ~7))
    }
}
