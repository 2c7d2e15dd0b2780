import MemVirtCore

/// A resident limit on guest RAM under shadow paging, served as the KVM engine's userfaultfd
/// pager serves it (MemVirtKVM/Memory/Pager.swift): the managed guest frames start missing; a
/// fault on a missing frame is a userfaultfd fault (Linux `handle_userfault`: the faulting
/// thread sleeps until the pager's UFFDIO_COPY), served zero-filled on first touch or copied
/// back from the page store after an eviction. Before serving, room is made under the limit:
/// the oldest served frames (FIFO, the pager's order) are written to the store and dropped
/// with MADV_DONTNEED, whose mmu-notifier invalidation
/// (`kvm_mmu_notifier_invalidate_range_start` -> `kvm_unmap_gfn_range`) zaps every shadow
/// entry of the frame through the rmap and flushes the TLBs (`kvm_flush_remote_tlbs`) when one
/// was present; the next guest access to it faults again (a re-fault, a new `pf_fixed`).
///
/// An invalidation that runs while a KVM page fault waits for its page (the pager evicts
/// while serving that fault) bumps `mmu_invalidate_seq`, so the fault finds itself stale
/// (`is_page_fault_stale` -> `mmu_invalidate_retry_gfn`) and returns RET_PF_RETRY: the guest
/// re-executes the access and faults once more (one more exit and `pf_taken`, no `pf_fixed`).
///
/// Costs (the calibrated profile's `HostCosts`), all on the guest's clock (the faulting vCPU
/// waits through each of them): every served fault `userfaultfdCopy` (the pager always maps
/// with UFFDIO_COPY: the fault message, the pager's wake-up, the ioctl, the vCPU's wake-up)
/// on top of the host fault the shadow MMU charges anyway; every eviction `dontneedPerPage`
/// plus `storeWritePerPage` (its 4 KiB pwrite to the store file); every store read
/// `storeReadPerPage` (its pread). Not `pageCopy`: that is the host's copy-on-write break
/// inside a KVM fault (33 us on kvm_pvm), not a copy into or out of the page cache (~1 us).
public final class ShadowResidentPager {
    /// What the pager did (the KVM pager's `PagerReport` counters).
    public struct Stats: Sendable, Equatable {
        /// Pages mapped zero-filled (first touches).
        public var zeroFills: UInt64 = 0
        /// Pages mapped from the store (re-faults after an eviction).
        public var storeReads: UInt64 = 0
        /// Pages written to the store and dropped.
        public var evictions: UInt64 = 0
        /// Evictions that zapped a present shadow entry (and flushed).
        public var zappedMappings: UInt64 = 0
        /// Faults retried because an eviction ran while they waited (mmu_invalidate_seq).
        public var staleRetries: UInt64 = 0
        public var peakResident: Int = 0
        /// userfaultfd faults served (zero fills and store reads).
        public var served: UInt64 { zeroFills + storeReads }
    }

    public let limitPages: Int
    public let costs: HostCosts
    public private(set) var stats = Stats()
    /// Managed gfns (a bitmap over guest frames).
    var managed: [Bool]
    var resident: [Bool]
    var stored: [Bool]
    var fifo: [UInt32] = []
    var fifoHead = 0
    public private(set) var residentCount = 0
    /// The store: a copy of each evicted page at gfn << 12 (lazily backed).
    let store: PhysicalMemory

    /// `guestFrames`: frames of guest-physical memory; `limitPages`: resident pages allowed
    /// (at least 1, the KVM pager's rule).
    public init(guestFrames: Int, limitPages: Int, costs: HostCosts) throws(InputError) {
        guard limitPages >= 1 else { throw InputError("resident limit \(limitPages) pages: at least one page") }
        self.limitPages = limitPages
        self.costs = costs
        managed = Array(repeating: false, count: guestFrames)
        resident = Array(repeating: false, count: guestFrames)
        stored = Array(repeating: false, count: guestFrames)
        store = try PhysicalMemory(capacity: UInt64(guestFrames) << 12, name: "pager-store")
    }

    /// Puts `gfn` under the pager (it must not be backed yet: the region is registered with
    /// userfaultfd before the guest touches it).
    public func manage(gfn: UInt64) {
        precondition(gfn < UInt64(managed.count), "gfn \(gfn) beyond the pager's \(managed.count) frames")
        managed[Int(gfn)] = true
    }

    @inline(__always) func manages(_ gfn: UInt64) -> Bool { gfn < UInt64(managed.count) && managed[Int(gfn)] }

    /// The fault path's hook (FNAME(page_fault) after the guest walk, before FNAME(fetch)):
    /// if `gfn` is managed and missing, serves it (evicting first). Returns true when the
    /// fault is stale and must be retried (an eviction's invalidation ran while it waited).
    func faultIn(_ gfn: UInt64, mode: ShadowPaging, cpu: ModelCPU) -> Bool {
        guard manages(gfn), !resident[Int(gfn)] else { return false }
        let evicted = serve(gfn, mode: mode, cpu: cpu)
        if evicted > 0 { stats.staleRetries &+= 1 }
        return evicted > 0
    }

    /// Backs a managed `gfn` that something other than a guest fault reads or writes (the
    /// hypervisor's walk, an emulated write): served like a fault, never retried. Returns its
    /// host page base.
    func pageIn(_ gfn: UInt64, mode: ShadowPaging) -> UInt64 {
        _ = serve(gfn, mode: mode, cpu: mode.cpuForGuestWrites)
        return mode.p2m.read64(gfn << 3)
    }

    /// Makes room (FIFO), then maps `gfn` zero-filled or from the store. Returns the pages evicted.
    func serve(_ gfn: UInt64, mode: ShadowPaging, cpu: ModelCPU?) -> Int {
        var evicted = 0
        while residentCount + 1 > limitPages && fifoHead < fifo.count {
            let q = UInt64(fifo[fifoHead])
            fifoHead += 1
            if resident[Int(q)] {
                evict(q, mode: mode, cpu: cpu)
                evicted += 1
            }
        }
        if fifoHead > 4096 && fifoHead * 2 > fifo.count {
            fifo.removeFirst(fifoHead)
            fifoHead = 0
        }
        // The host page: allocated and cleared as any host fault (hostAddress charges it).
        let page = mode.backHostPage(gfn)
        if stored[Int(gfn)] {
            mode.host.copy(from: store, at: gfn << 12, to: page, bytes: 4096)
            stats.storeReads &+= 1
            cpu?.ledger.charge(.hostFaults, costs.storeReadPerPage)
        } else {
            stats.zeroFills &+= 1
        }
        cpu?.ledger.charge(.hostFaults, costs.userfaultfdCopy)
        resident[Int(gfn)] = true
        fifo.append(UInt32(gfn))
        residentCount += 1
        stats.peakResident = max(stats.peakResident, residentCount)
        return evicted
    }

    /// The store write and MADV_DONTNEED of resident `gfn`: its shadow entries are zapped
    /// through the rmap (kvm_unmap_gfn_range), the TLBs flushed if one was present, the host
    /// page freed.
    func evict(_ gfn: UInt64, mode: ShadowPaging, cpu: ModelCPU?) {
        let page = mode.p2m.read64(gfn << 3)
        precondition(page != 0, "pager: resident gfn \(gfn) has no host page")
        store.copy(from: mode.host, at: page, to: gfn << 12, bytes: 4096)
        if mode.unmapHostPage(gfn, cpu: cpu) { stats.zappedMappings &+= 1 }
        stored[Int(gfn)] = true
        resident[Int(gfn)] = false
        residentCount -= 1
        stats.evictions &+= 1
        cpu?.ledger.charge(.hostFaults, costs.dontneedPerPage + costs.storeWritePerPage)
    }

    /// Whether `gfn` is resident now (tests).
    public func isResident(gfn: UInt64) -> Bool { resident[Int(gfn)] }
}

extension ShadowPaging {
    /// Backs `gfn` with a fresh cleared 4 KiB host page (the host fault of gfn_to_pfn, charged
    /// as `hostAddress` charges it); returns the page base.
    func backHostPage(_ gfn: UInt64) -> UInt64 {
        precondition(hostPageSize == .size4K, "a resident limit needs 4 KiB host pages")
        guard let frame = hostFrames.allocate(.size4K) else { preconditionFailure("host memory exhausted") }
        host.zero(frame, bytes: 4096)
        hostFaults &+= 1
        cpuForGuestWrites?.ledger.charge(.hostFaults, cpuForGuestWrites!.costs.hostDemandZero(.size4K))
        p2m.write64(gfn << 3, frame)
        gfnOfHost[frame >> 12] = gfn
        return frame
    }

    /// Drops the host page of `gfn` (MADV_DONTNEED): the mmu notifier's
    /// kvm_unmap_gfn_range zaps every leaf shadow entry mapping it (rmap), and when one was
    /// present the TLBs are flushed (kvm_flush_remote_tlbs). Returns whether one was present.
    func unmapHostPage(_ gfn: UInt64, cpu: ModelCPU?) -> Bool {
        let zapped = zapLeafMappings(of: gfn, cpu: cpu)
        let page = p2m.read64(gfn << 3)
        p2m.write64(gfn << 3, 0)
        gfnOfHost[page >> 12] = nil
        zeroPageMapped.remove(gfn)
        hostFrames.free(page, .size4K)
        return zapped
    }

    /// Puts guest RAM under `pager` (nil: no limit). Pages already backed stay outside it.
    public func attach(pager: ShadowResidentPager?) {
        residentPager = pager
    }
}

extension ShadowPaging {
    /// The mmu notifier's invalidation of one host page (kvm_unmap_gfn_range): every leaf
    /// shadow entry mapping `gfn` (rmap) is zapped and, when one was present, the TLBs are
    /// flushed (kvm_flush_remote_tlbs). Returns whether one was present.
    func zapLeafMappings(of gfn: UInt64, cpu: ModelCPU?) -> Bool {
        var zapped = false
        for a in rmap[gfn] ?? [] {
            let e = host.read64(a)
            if e & 1 != 0 {
                dropLeaf(a, entry: e, level: 1)
                host.write64(a, 0)
                zapped = true
            }
        }
        rmap[gfn] = nil
        if zapped, let cpu { flushTLBs(cpu) }
        return zapped
    }
}
