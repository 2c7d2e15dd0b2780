import MemVirtCore

/// A vCPU's accesses and the simulation's notion of time (moved from VMSimulation.swift): one
/// guest access through nested paging with its faults (async or not), the host wait, and the
/// flushes and IPIs that reach other vCPUs.
extension VMSimulation {
    // MARK: Accesses

    enum AccessResult {
        /// Done; the vCPU must then wait in the host until the time given (if later).
        case done(blockUntil: Double, read: UInt64)
        /// Needs swap I/O: retry after `readyAt`.
        case io(gfn: UInt64, readyAt: Double)
    }

    @inline(__always) func split(_ l: CostLedger) -> (Double, Double, Double) {
        let c = l.cycles
        let user = c[CostCategory.dataAccess.rawValue] + c[CostCategory.l2TLB.rawValue] + c[CostCategory.pageWalk.rawValue]
            + c[CostCategory.adWrites.rawValue] + c[CostCategory.compute.rawValue]
        let kernelCycles = c[CostCategory.guestFaults.rawValue] + c[CostCategory.guestKernel.rawValue]
        let hyp = c[CostCategory.vmExits.rawValue] + c[CostCategory.hypervisorFaults.rawValue] + c[CostCategory.emulation.rawValue]
            + c[CostCategory.shadowSync.rawValue] + c[CostCategory.hostFaults.rawValue]
        return (user, kernelCycles, hyp)
    }

    /// One user-mode access through the TLBs, the 2D walk, guest and host faults, with its
    /// simulated time spent on `v` (user part to `bucket`).
    func access(_ v: VCPU, va: UInt64, write: Bool, value: UInt64, bucket: VCPUTime) throws -> AccessResult {
        let cpu = v.cpu
        active = v
        nested.bind(cpu)
        nested.now = v.time
        nested.deferIO = true
        nested.syncBlockUntil = 0
        cpu.privilege = .user
        nested.serviceFlush(cpu: cpu)
        let before = split(cpu.ledger)
        let kind: AccessKind = write ? .write : .read
        var entry: TLBEntry
        var result: AccessResult?
        if let (e, level) = cpu.tlb.lookup(va, pcid: space.pcid, fetch: false), e.user, !write || (e.writable && e.dirty) {
            if level == .l2 { cpu.ledger.charge(.l2TLB, config.costs.l2TLBHit) }
            entry = e
        } else {
            if cpu.tlb.lookup(va, pcid: space.pcid, fetch: false) != nil { cpu.tlb.invalidatePage(va, pcid: space.pcid) }
            var attempts = 0
            entry = TLBEntry(payload: 0, size: .size4K)
            walk: while true {
                attempts += 1
                if attempts > 64 { throw GuestError(message: "access to \(GuestVirtualAddress(va)) did not resolve after 64 faults") }
                switch nested.resolveMiss(va, kind: kind, space: space, cpu: cpu) {
                case .translated(let e, let global, _, _):
                    cpu.tlb.insert(va, pcid: space.pcid, entry: e, global: global, fetch: false)
                    entry = e
                    break walk
                case .guestFault(let code, _):
                    // The guest's #PF handler runs in kernel mode: its host faults never go async.
                    cpu.ledger.charge(.guestFaults, config.costs.guestExceptionRoundTrip)
                    cpu.counters.add(.guestPageFaults, 1)
                    nested.deferIO = false
                    let r = kernel.handlePageFault(va, code: code, space: space)
                    nested.deferIO = true
                    if let f = nested.takeHostFailure() { throw f }
                    switch r {
                    case .demandZero(let size, let tablePages):
                        cpu.counters.add(.guestDemandZeroFaults, 1)
                        cpu.ledger.charge(.guestFaults, config.costs.demandZero(size) + Double(tablePages) * config.costs.guestPageTablePage)
                    case .segmentationFault(let why): throw GuestError(message: "segmentation fault: \(why)")
                    case .outOfMemory: throw GuestError(message: "guest out of memory")
                    default:
                        // Other resolutions (none in these workloads): the cost of a 4 KiB fault.
                        cpu.ledger.charge(.guestFaults, config.costs.demandZero(.size4K))
                    }
                case .retry:
                    if let p = nested.takePendingIO() {
                        result = .io(gfn: p.gfn, readyAt: p.readyAt)
                        break walk
                    }
                case .mmio:
                    throw GuestError(message: "MMIO access at \(GuestVirtualAddress(va))")
                case .hostFailure(let error):
                    throw error
                default:
                    throw GuestError(message: "access at \(GuestVirtualAddress(va)) emulated by the hypervisor: not expected under nested paging")
                }
            }
        }
        var read: UInt64 = 0
        if result == nil {
            let pa = entry.base | (va & entry.size.offsetMask & ~7)
            if write {
                host.memory.write64(pa, value)
                read = value
            } else {
                read = host.memory.read64(pa)
                checksum = FNV1a.step(checksum, read)
            }
            // A counter is hot in L1D; a random access over a large buffer misses to DRAM (the
            // model has no data cache: CostModel.walkRefDRAM is its DRAM latency).
            if bucket == .workThread {
                cpu.ledger.charge(.dataAccess, config.costs.dataAccess)
            } else {
                cpu.ledger.charge(.dataAccess, config.costs.walkRefDRAM)
                cpu.ledger.charge(.compute, config.faultComputeCycles)
            }
            result = .done(blockUntil: nested.syncBlockUntil, read: read)
        }
        cpu.settleCosts()
        let after = split(cpu.ledger)
        spend(v, ns(after.0 - before.0), bucket)
        spend(v, ns(after.1 - before.1), .guestKernel)
        spend(v, ns(after.2 - before.2), .hypervisor)
        if case .done(let until, let r) = result!, until > 0 {
            // The guest kernel's own host fault waited for I/O (early-completed above).
            return .done(blockUntil: until, read: r)
        }
        return result!
    }

    // MARK: Time

    @inline(__always) func spend(_ v: VCPU, _ dt: Double, _ b: VCPUTime) {
        guard dt > 0 else { return }
        v.buckets[b.rawValue] += dt
        v.time += dt
        if b != .idle, let t = v.current {
            t.sumExec += dt
            t.vruntime += dt
            if b == .workThread { t.increments += dt * config.incrementsPerSecond / 1e9 }
        }
    }

    /// Brings a passive vCPU (computing, blocked, idle) to time `t`.
    func advance(_ v: VCPU, to t: Double) {
        guard t > v.time else { return }
        let dt = t - v.time
        switch v.state {
        case .idle: spend(v, dt, .idle)
        case .blocked: spend(v, dt, .blocked)
        case .running:
            if let c = v.current, c.kind == .work { spend(v, dt, .workThread) } else { spend(v, dt, .faultThread) }
        }
    }

    func push(_ kind: Event.Kind, _ t: Double, _ v: VCPU, arg: Int = 0, gen: UInt32 = 0) {
        seq += 1
        heap.insert(Event(time: t, seq: seq, kind: kind, vcpu: Int32(v.index), arg: Int32(arg), gen: gen))
    }

    func scheduleResume(_ v: VCPU, at t: Double) {
        v.resumeGen &+= 1
        push(.resume, t, v, gen: v.resumeGen)
    }

    func scheduleTick(_ v: VCPU, at t: Double) {
        guard !v.tickScheduled else { return }
        v.tickScheduled = true
        push(.tick, t, v)
    }

    /// After an INVEPT flush of every vCPU (a zap): vCPUs in guest mode took an IPI and an
    /// exit; a running counter thread walks again at its next increment (setting EPT A).
    func flushed() {
        for u in vcpus where u.state == .running {
            if u !== active { u.overhead += ns(config.hostCosts.remoteFlushTarget) }
            if let c = u.current, c.kind == .work, !c.needsTouch {
                c.needsTouch = true
                if u !== active { scheduleResume(u, at: max(u.time, active?.time ?? u.time)) }
            }
        }
    }
}
