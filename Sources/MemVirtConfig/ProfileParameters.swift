import MemVirtCore
import MemVirtModel

/// The cost tables a profile sets, as the model reads them.
public struct ProfileCosts: Sendable, Hashable {
    public var costs: CostModel
    public var host: HostCosts
    public var scheduling: GuestSchedulingCosts
    public var dirty: DirtyTrackingCosts
    public init(costs: CostModel, host: HostCosts = HostCosts(), scheduling: GuestSchedulingCosts = GuestSchedulingCosts(), dirty: DirtyTrackingCosts = DirtyTrackingCosts()) {
        self.costs = costs
        self.host = host
        self.scheduling = scheduling
        self.dirty = dirty
    }
}

/// One cost parameter of a profile: its Swift name ("CostModel.vmExitRoundTrip", the name a
/// `CalibratedCost` uses), its TOML section and key, its unit, and how to read and set it.
public struct ProfileParameter: Sendable {
    public enum Unit: String, Sendable {
        /// Core cycles at the profile's clock (a calibration's nanoseconds are converted).
        case cycles
        /// Nanoseconds of wall time (delays and periods that do not scale with the clock).
        case nanoseconds
        /// A number of events or entries (not a time: a calibration cannot set it).
        case count
    }
    public let name: String
    /// Section under `[costs.*]`: cost_model, host, guest_scheduling, dirty_tracking.
    public let section: String
    public let key: String
    public let unit: Unit
    public let get: @Sendable (ProfileCosts) -> Double
    public let set: @Sendable (inout ProfileCosts, Double) -> Void

    init(_ name: String, _ section: String, _ key: String, _ unit: Unit, _ get: @escaping @Sendable (ProfileCosts) -> Double,
         _ set: @escaping @Sendable (inout ProfileCosts, Double) -> Void) {
        self.name = name
        self.section = section
        self.key = key
        self.unit = unit
        self.get = get
        self.set = set
    }

    /// Parameters a profile file may lack because it was written before they existed (the
    /// model's default is used, marked inherited with this source).
    public static let addedLater: [String: String] = [
        "CostModel.hostDemandZero4K": "2,000 cycles (will-it-scale page_fault1, ~0.7 us; the guest's demand-zero figure)",
        "CostModel.hostZeroPageCopy": "2,000 cycles (wp_page_copy of the zero pfn: a demand-zero fault's allocation and clear)",
        "CostModel.invlpgStub": "3,300 cycles (faultInjection + one instructionEmulation: the stub as priced before it was measured)",
        "CostModel.cr3Stub": "3,300 cycles (as invlpgStub)",
        "CostModel.cr3SwitchStub": "3,300 cycles (as cr3Stub)",
        "CostModel.stringStoreElement": "1,000 cycles (as shadowPTEWrite)",
        "HostCosts.storeWritePerPage": "3,800 cycles (a 4 KiB pwrite to an O_TMPFILE's page cache, ~1.3 us, measured once on a kvm_pvm host)",
        "HostCosts.storeReadPerPage": "2,500 cycles (a 4 KiB pread from the page cache, ~0.8 us, measured once on a kvm_pvm host)",
        "HostCosts.timerWakeLatency": "50,000 ns (Linux's default timer slack for SCHED_OTHER threads, prctl(2) PR_SET_TIMERSLACK)",
        "HostCosts.timerWakeSpread": "0 ns (the wake-up always its median)",
        "GuestSchedulingCosts.apfFaultLegs": "0 cycles (a guest kernel whose #PF handler runs in the guest takes no exit beyond the fault's)",
        "GuestSchedulingCosts.tickDeliveryDelay": "0 ns (a tick reaches the guest at its due time)",
    ]

    /// The `[costs.*]` sections in file order.
    public static let sections = ["cost_model", "host", "guest_scheduling", "dirty_tracking"]

    /// Every parameter of `CostModel`, `HostCosts`, `GuestSchedulingCosts` and
    /// `DirtyTrackingCosts` (the clock is `[cpu] clock_ghz`, the name `[profile] name`).
    public static let all: [ProfileParameter] = [
            .init("CostModel.l1TLBHit", "cost_model", "l1_tlb_hit", .cycles, { $0.costs.l1TLBHit }, { $0.costs.l1TLBHit = $1 }),
            .init("CostModel.l2TLBHit", "cost_model", "l2_tlb_hit", .cycles, { $0.costs.l2TLBHit }, { $0.costs.l2TLBHit = $1 }),
            .init("CostModel.walkStart", "cost_model", "walk_start", .cycles, { $0.costs.walkStart }, { $0.costs.walkStart = $1 }),
            .init("CostModel.walkRefL1", "cost_model", "walk_ref_l1", .cycles, { $0.costs.walkRefL1 }, { $0.costs.walkRefL1 = $1 }),
            .init("CostModel.walkRefL2", "cost_model", "walk_ref_l2", .cycles, { $0.costs.walkRefL2 }, { $0.costs.walkRefL2 = $1 }),
            .init("CostModel.walkRefLLC", "cost_model", "walk_ref_llc", .cycles, { $0.costs.walkRefLLC }, { $0.costs.walkRefLLC = $1 }),
            .init("CostModel.walkRefDRAM", "cost_model", "walk_ref_dram", .cycles, { $0.costs.walkRefDRAM }, { $0.costs.walkRefDRAM = $1 }),
            .init("CostModel.adWrite", "cost_model", "ad_write", .cycles, { $0.costs.adWrite }, { $0.costs.adWrite = $1 }),
            .init("CostModel.dataAccess", "cost_model", "data_access", .cycles, { $0.costs.dataAccess }, { $0.costs.dataAccess = $1 }),
            .init("CostModel.guestExceptionRoundTrip", "cost_model", "guest_exception_round_trip", .cycles, { $0.costs.guestExceptionRoundTrip }, { $0.costs.guestExceptionRoundTrip = $1 }),
            .init("CostModel.guestDemandZero4K", "cost_model", "guest_demand_zero_4k", .cycles, { $0.costs.guestDemandZero4K }, { $0.costs.guestDemandZero4K = $1 }),
            .init("CostModel.guestDemandZero2M", "cost_model", "guest_demand_zero_2m", .cycles, { $0.costs.guestDemandZero2M }, { $0.costs.guestDemandZero2M = $1 }),
            .init("CostModel.guestDemandZero1G", "cost_model", "guest_demand_zero_1g", .cycles, { $0.costs.guestDemandZero1G }, { $0.costs.guestDemandZero1G = $1 }),
            .init("CostModel.guestPageTablePage", "cost_model", "guest_page_table_page", .cycles, { $0.costs.guestPageTablePage }, { $0.costs.guestPageTablePage = $1 }),
            .init("CostModel.invlpg", "cost_model", "invlpg", .cycles, { $0.costs.invlpg }, { $0.costs.invlpg = $1 }),
            .init("CostModel.cr3Write", "cost_model", "cr3_write", .cycles, { $0.costs.cr3Write }, { $0.costs.cr3Write = $1 }),
            .init("CostModel.vmExitRoundTrip", "cost_model", "vm_exit_round_trip", .cycles, { $0.costs.vmExitRoundTrip }, { $0.costs.vmExitRoundTrip = $1 }),
            .init("CostModel.userspaceExitRoundTrip", "cost_model", "userspace_exit_round_trip", .cycles, { $0.costs.userspaceExitRoundTrip }, { $0.costs.userspaceExitRoundTrip = $1 }),
            .init("CostModel.eptViolationHandler", "cost_model", "ept_violation_handler", .cycles, { $0.costs.eptViolationHandler }, { $0.costs.eptViolationHandler = $1 }),
            .init("CostModel.instructionEmulation", "cost_model", "instruction_emulation", .cycles, { $0.costs.instructionEmulation }, { $0.costs.instructionEmulation = $1 }),
            .init("CostModel.shadowFaultHandler", "cost_model", "shadow_fault_handler", .cycles, { $0.costs.shadowFaultHandler }, { $0.costs.shadowFaultHandler = $1 }),
            .init("CostModel.shadowPageCreate", "cost_model", "shadow_page_create", .cycles, { $0.costs.shadowPageCreate }, { $0.costs.shadowPageCreate = $1 }),
            .init("CostModel.shadowResync", "cost_model", "shadow_resync", .cycles, { $0.costs.shadowResync }, { $0.costs.shadowResync = $1 }),
            .init("CostModel.invlpgHandler", "cost_model", "invlpg_handler", .cycles, { $0.costs.invlpgHandler }, { $0.costs.invlpgHandler = $1 }),
            .init("CostModel.cr3SwitchHandler", "cost_model", "cr3_switch_handler", .cycles, { $0.costs.cr3SwitchHandler }, { $0.costs.cr3SwitchHandler = $1 }),
            .init("CostModel.shadowPTEWrite", "cost_model", "shadow_pte_write", .cycles, { $0.costs.shadowPTEWrite }, { $0.costs.shadowPTEWrite = $1 }),
            .init("CostModel.faultInjection", "cost_model", "fault_injection", .cycles, { $0.costs.faultInjection }, { $0.costs.faultInjection = $1 }),
            .init("CostModel.invlpgStub", "cost_model", "invlpg_stub", .cycles, { $0.costs.invlpgStub }, { $0.costs.invlpgStub = $1 }),
            .init("CostModel.cr3Stub", "cost_model", "cr3_stub", .cycles, { $0.costs.cr3Stub }, { $0.costs.cr3Stub = $1 }),
            .init("CostModel.cr3SwitchStub", "cost_model", "cr3_switch_stub", .cycles, { $0.costs.cr3SwitchStub }, { $0.costs.cr3SwitchStub = $1 }),
            .init("CostModel.stringStoreElement", "cost_model", "string_store_element", .cycles, { $0.costs.stringStoreElement }, { $0.costs.stringStoreElement = $1 }),
            .init("CostModel.diskRead4K", "cost_model", "disk_read_4k", .cycles, { $0.costs.diskRead4K }, { $0.costs.diskRead4K = $1 }),
            .init("CostModel.exitsPerDiskIO", "cost_model", "exits_per_disk_io", .count, { $0.costs.exitsPerDiskIO }, { $0.costs.exitsPerDiskIO = $1 }),
            .init("CostModel.hostDemandZero4K", "cost_model", "host_demand_zero_4k", .cycles, { $0.costs.hostDemandZero4K }, { $0.costs.hostDemandZero4K = $1 }),
            .init("CostModel.hostZeroPageCopy", "cost_model", "host_zero_page_copy", .cycles, { $0.costs.hostZeroPageCopy }, { $0.costs.hostZeroPageCopy = $1 }),
            .init("HostCosts.swapCacheHit", "host", "swap_cache_hit", .cycles, { $0.host.swapCacheHit }, { $0.host.swapCacheHit = $1 }),
            .init("HostCosts.swapInSubmit", "host", "swap_in_submit", .cycles, { $0.host.swapInSubmit }, { $0.host.swapInSubmit = $1 }),
            .init("HostCosts.reclaimScan", "host", "reclaim_scan", .cycles, { $0.host.reclaimScan }, { $0.host.reclaimScan = $1 }),
            .init("HostCosts.reclaimEvict", "host", "reclaim_evict", .cycles, { $0.host.reclaimEvict }, { $0.host.reclaimEvict = $1 }),
            .init("HostCosts.remoteFlushInitiator", "host", "remote_flush_initiator", .cycles, { $0.host.remoteFlushInitiator }, { $0.host.remoteFlushInitiator = $1 }),
            .init("HostCosts.remoteFlushTarget", "host", "remote_flush_target", .cycles, { $0.host.remoteFlushTarget }, { $0.host.remoteFlushTarget = $1 }),
            .init("HostCosts.pageCopy", "host", "page_copy", .cycles, { $0.host.pageCopy }, { $0.host.pageCopy = $1 }),
            .init("HostCosts.userfaultfdZeroPage", "host", "userfaultfd_zero_page", .cycles, { $0.host.userfaultfdZeroPage }, { $0.host.userfaultfdZeroPage = $1 }),
            .init("HostCosts.userfaultfdCopy", "host", "userfaultfd_copy", .cycles, { $0.host.userfaultfdCopy }, { $0.host.userfaultfdCopy = $1 }),
            .init("HostCosts.dontneedPerPage", "host", "dontneed_per_page", .cycles, { $0.host.dontneedPerPage }, { $0.host.dontneedPerPage = $1 }),
            .init("HostCosts.storeWritePerPage", "host", "store_write_per_page", .cycles, { $0.host.storeWritePerPage }, { $0.host.storeWritePerPage = $1 }),
            .init("HostCosts.storeReadPerPage", "host", "store_read_per_page", .cycles, { $0.host.storeReadPerPage }, { $0.host.storeReadPerPage = $1 }),
            .init("HostCosts.timerWakeLatency", "host", "timer_wake_latency", .nanoseconds, { $0.host.timerWakeLatency }, { $0.host.timerWakeLatency = $1 }),
            .init("HostCosts.timerWakeSpread", "host", "timer_wake_spread", .nanoseconds, { $0.host.timerWakeSpread }, { $0.host.timerWakeSpread = $1 }),
            .init("HostCosts.ksmPagesToScan", "host", "ksm_pages_to_scan", .count, { Double($0.host.ksmPagesToScan) }, { $0.host.ksmPagesToScan = Int($1) }),
            .init("HostCosts.ksmSleep", "host", "ksm_sleep", .nanoseconds, { $0.host.ksmSleep }, { $0.host.ksmSleep = $1 }),
            .init("HostCosts.ksmScanPerPage", "host", "ksm_scan_per_page", .cycles, { $0.host.ksmScanPerPage }, { $0.host.ksmScanPerPage = $1 }),
            .init("HostCosts.ksmMerge", "host", "ksm_merge", .cycles, { $0.host.ksmMerge }, { $0.host.ksmMerge = $1 }),
            .init("GuestSchedulingCosts.contextSwitch", "guest_scheduling", "context_switch", .cycles, { $0.scheduling.contextSwitch }, { $0.scheduling.contextSwitch = $1 }),
            .init("GuestSchedulingCosts.tickHandler", "guest_scheduling", "tick_handler", .cycles, { $0.scheduling.tickHandler }, { $0.scheduling.tickHandler = $1 }),
            .init("GuestSchedulingCosts.tickExits", "guest_scheduling", "tick_exits", .count, { $0.scheduling.tickExits }, { $0.scheduling.tickExits = $1 }),
            .init("GuestSchedulingCosts.apfSetup", "guest_scheduling", "apf_setup", .cycles, { $0.scheduling.apfSetup }, { $0.scheduling.apfSetup = $1 }),
            .init("GuestSchedulingCosts.apfNotPresentHandler", "guest_scheduling", "apf_not_present_handler", .cycles, { $0.scheduling.apfNotPresentHandler }, { $0.scheduling.apfNotPresentHandler = $1 }),
            .init("GuestSchedulingCosts.apfReadyHandler", "guest_scheduling", "apf_ready_handler", .cycles, { $0.scheduling.apfReadyHandler }, { $0.scheduling.apfReadyHandler = $1 }),
            .init("GuestSchedulingCosts.pageReadyDelay", "guest_scheduling", "page_ready_delay", .nanoseconds, { $0.scheduling.pageReadyDelay }, { $0.scheduling.pageReadyDelay = $1 }),
            .init("GuestSchedulingCosts.apfFaultLegs", "guest_scheduling", "apf_fault_legs", .cycles, { $0.scheduling.apfFaultLegs }, { $0.scheduling.apfFaultLegs = $1 }),
            .init("GuestSchedulingCosts.tickDeliveryDelay", "guest_scheduling", "tick_delivery_delay", .nanoseconds, { $0.scheduling.tickDeliveryDelay }, { $0.scheduling.tickDeliveryDelay = $1 }),
            .init("GuestSchedulingCosts.haltWakeExits", "guest_scheduling", "halt_wake_exits", .count, { $0.scheduling.haltWakeExits }, { $0.scheduling.haltWakeExits = $1 }),
            .init("DirtyTrackingCosts.writeProtectFault", "dirty_tracking", "write_protect_fault", .cycles, { $0.dirty.writeProtectFault }, { $0.dirty.writeProtectFault = $1 }),
            .init("DirtyTrackingCosts.bitmapPerGiB", "dirty_tracking", "bitmap_per_gib", .cycles, { $0.dirty.bitmapPerGiB }, { $0.dirty.bitmapPerGiB = $1 }),
            .init("DirtyTrackingCosts.bitmapPerDirtyPage", "dirty_tracking", "bitmap_per_dirty_page", .cycles, { $0.dirty.bitmapPerDirtyPage }, { $0.dirty.bitmapPerDirtyPage = $1 }),
            .init("DirtyTrackingCosts.ringPerEntry", "dirty_tracking", "ring_per_entry", .cycles, { $0.dirty.ringPerEntry }, { $0.dirty.ringPerEntry = $1 }),
            .init("DirtyTrackingCosts.ringFixed", "dirty_tracking", "ring_fixed", .cycles, { $0.dirty.ringFixed }, { $0.dirty.ringFixed = $1 }),
            .init("DirtyTrackingCosts.ringSoftFull", "dirty_tracking", "ring_soft_full", .count, { Double($0.dirty.ringSoftFull) }, { $0.dirty.ringSoftFull = Int($1) }),
            .init("DirtyTrackingCosts.ringFullHandler", "dirty_tracking", "ring_full_handler", .cycles, { $0.dirty.ringFullHandler }, { $0.dirty.ringFullHandler = $1 }),
            .init("DirtyTrackingCosts.pmlEntries", "dirty_tracking", "pml_entries", .count, { Double($0.dirty.pmlEntries) }, { $0.dirty.pmlEntries = Int($1) }),
            .init("DirtyTrackingCosts.pmlDrain", "dirty_tracking", "pml_drain", .cycles, { $0.dirty.pmlDrain }, { $0.dirty.pmlDrain = $1 }),
            .init("DirtyTrackingCosts.dirtyBitScanPerLeaf", "dirty_tracking", "dirty_bit_scan_per_leaf", .cycles, { $0.dirty.dirtyBitScanPerLeaf }, { $0.dirty.dirtyBitScanPerLeaf = $1 }),
            .init("DirtyTrackingCosts.reprotectPerEntry", "dirty_tracking", "reprotect_per_entry", .cycles, { $0.dirty.reprotectPerEntry }, { $0.dirty.reprotectPerEntry = $1 }),
            .init("DirtyTrackingCosts.remoteTLBFlush", "dirty_tracking", "remote_tlb_flush", .cycles, { $0.dirty.remoteTLBFlush }, { $0.dirty.remoteTLBFlush = $1 }),
            .init("DirtyTrackingCosts.shadowPageZap", "dirty_tracking", "shadow_page_zap", .cycles, { $0.dirty.shadowPageZap }, { $0.dirty.shadowPageZap = $1 }),
            .init("DirtyTrackingCosts.hugePageSplit", "dirty_tracking", "huge_page_split", .cycles, { $0.dirty.hugePageSplit }, { $0.dirty.hugePageSplit = $1 }),
        ]

    public static let byName: [String: ProfileParameter] = Dictionary(uniqueKeysWithValues: all.map { ($0.name, $0) })
}
