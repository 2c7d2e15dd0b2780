import CKVM
import MemVirtCore
import MemVirtGuest
#if canImport(Glibc)
import Glibc
#endif

/// One side's account of a migration (JSON keys as `memvirt kvm migrate/listen --json` prints).
public struct MigrationReport: Sendable {
    public var side: String
    public var mode: MigrationOptions.Mode
    /// The destination took the guest over (resumed it). With `error` set after that, the
    /// guest is lost: `migrated` is false and neither side has it whole.
    public var switchedOver = false
    /// Attempts that failed before the switch (`MigrationOptions.retries`), their errors.
    public var failedAttempts: [String] = []
    public var migrated = false
    public var error: String? = nil
    public var rounds = 0
    public var bytesSent: UInt64 = 0
    public var bytesReceived: UInt64 = 0
    public var pagesSent: UInt64 = 0
    public var zeroPages: UInt64 = 0
    /// Post-copy: pages the destination asked for (guest faults), and pushed unasked.
    public var pagesRequested: UInt64 = 0
    public var pagesPushed: UInt64 = 0
    /// Prepared post-copy: runtime pages written after they were sent before the stop (named
    /// in STATE, dropped at the destination), and runtime pages sent after STATE (those again).
    public var runtimePagesStale: UInt64 = 0
    public var runtimePagesAfterStop: UInt64 = 0
    /// The switch, phase by phase (`switch_ms` in JSON).
    public var switchTimes = SwitchTimes()
    /// Destination (not in JSON): how often each runtime page arrived.
    var runtimeArrivals: [UInt32] = []
    /// Destination: vCPU threads created and waiting before the stop (prepared post-copy).
    public var preparedVCPUThreads = 0
    /// Pages write-protected again (KVM_CLEAR_DIRTY_LOG) and pages left writable (groups).
    public var pagesReprotected: UInt64 = 0
    public var pagesLeftWritable: UInt64 = 0
    public var dirtyPerRound: [UInt64] = []
    /// Start -> the destination runs the guest with every page (pre-copy: RESUMED; post-copy
    /// and hybrid: the last page pushed).
    public var totalNanos: UInt64 = 0
    /// Start -> the destination's summary after its guest finished the workload.
    public var sessionNanos: UInt64? = nil
    /// The gap the guest saw across the switch, from its own TSC (destination side).
    public var downtimeNanos: UInt64? = nil
    /// Source stop to destination KVM_RUN, by the VMMs' clocks (CLOCK_REALTIME).
    public var vmmDowntimeNanos: UInt64? = nil
    public var sourceHash: UInt64? = nil
    public var destinationHash: UInt64? = nil
    public var guest: [GuestReport] = []
    /// The destination's guest run after the switch: its wall time and KVM's pf_fixed (the
    /// re-shadowing of guest memory a fresh shadow MMU does), reported apart.
    public var destinationRunNanos: UInt64? = nil
    public var destinationPfFixed: UInt64? = nil
    public var kvmPfFixedDuringMigration: UInt64? = nil
    /// Where the time went, in order (name, nanoseconds): e.g. round0, rounds, stop,
    /// final_harvest, final_send, state, resumed on the source.
    public var phases: [(String, UInt64)] = []
    /// A multiboot guest's console text on this side (nil otherwise).
    public var console: String? = nil
    /// The guest kernel's account on this side (`--guest-kernel`), and the destination's as
    /// the source learns it.
    public var guestKernel: KernelMigrationReport? = nil
    public var destinationGuestKernel: KernelMigrationReport? = nil

    public init(side: String, mode: MigrationOptions.Mode) {
        self.side = side
        self.mode = mode
    }

    public var json: JSONValue {
        func ms(_ n: UInt64?) -> JSONValue { n.map { .double(Double($0 / 1000) / 1000) } ?? .null }
        func hex(_ h: UInt64?) -> JSONValue { h.map { .string("0x" + String($0, radix: 16)) } ?? .null }
        var kv: [(String, JSONValue)] = [
            ("schema", "memvirt.migration/1"), ("side", .string(side)), ("mode", .string(mode.rawValue)),
            ("migrated", .bool(migrated)), ("switched_over", .bool(switchedOver)), ("error", error.map { .string($0) } ?? .null),
            ("failed_attempts", .array(failedAttempts.map { .string($0) })),
            ("rounds", .int(Int64(rounds))), ("bytes_sent", .uint(bytesSent)), ("bytes_received", .uint(bytesReceived)),
            ("pages_sent", .uint(pagesSent)), ("zero_pages", .uint(zeroPages)),
            ("pages_requested", .uint(pagesRequested)), ("pages_pushed", .uint(pagesPushed)),
            ("pages_reprotected", .uint(pagesReprotected)), ("pages_left_writable", .uint(pagesLeftWritable)),
            ("dirty_per_round", .array(dirtyPerRound.map { .uint($0) })),
            ("total_ms", ms(totalNanos)), ("session_ms", ms(sessionNanos)), ("downtime_ms", ms(downtimeNanos)), ("vmm_downtime_ms", ms(vmmDowntimeNanos)),
            ("source_hash", hex(sourceHash)), ("destination_hash", hex(destinationHash)),
            ("hashes_equal", sourceHash != nil && destinationHash != nil ? .bool(sourceHash == destinationHash) : .null),
            ("guest", .array(guest.map { r in
                var o: [(String, JSONValue)] = [("accesses", .uint(r.accesses)), ("reads", .uint(r.reads)), ("writes", .uint(r.writes)), ("read_sum", .uint(r.readSum))]
                if let c = r.memoryChecksum { o.append(("memory_checksum", .uint(c))) }
                return .object(o)
            })),
            ("destination_run_ms", ms(destinationRunNanos)),
            ("destination_pf_fixed", destinationPfFixed.map { .uint($0) } ?? .null),
            ("kvm_pf_fixed_during_migration", kvmPfFixedDuringMigration.map { .uint($0) } ?? .null),
        ]
        kv.append(("phases_ms", .object(phases.map { ($0.0, ms($0.1)) })))
        kv.append(("runtime_pages_stale", .uint(runtimePagesStale)))
        kv.append(("runtime_pages_after_stop", .uint(runtimePagesAfterStop)))
        if side == "destination" { kv.append(("prepared_vcpu_threads", .int(Int64(preparedVCPUThreads)))) }
        kv.append(("switch_ms", switchTimes.json(guestGapNanos: downtimeNanos, vmmDowntimeNanos: vmmDowntimeNanos)))
        if let c = console { kv.append(("console", .string(c))) }
        if let k = guestKernel { kv.append(("guest_kernel", k.json)) }
        if let k = destinationGuestKernel { kv.append(("destination_guest_kernel", k.json)) }
        kv.append(("note", "downtime_ms is the largest gap between two guest accesses across the switch, from the guest's TSC (restored as source TSC + elapsed)"))
        return .object(kv)
    }
}

/// The switch from the source's stop to the destination's first KVM_RUN, each time counted
/// from the stop (so they add up along the path): the source's by its monotonic clock, the
/// destination's by CLOCK_REALTIME against the source's stop time (one clock in a loopback
/// migration; across hosts their skew is in them). nil: not measured on this path.
public struct SwitchTimes: Sendable, Equatable {
    /// Source: the vCPUs are out of KVM_RUN and joined.
    public var sourceStopped: UInt64? = nil
    /// Source: the final dirty-log harvest (what is still to send) is taken.
    public var sourceHarvested: UInt64? = nil
    /// Source: the vCPU states (and the guest kernel's) are saved and STATE is built.
    public var sourceStateSaved: UInt64? = nil
    /// Source: the last byte of STATE is written to the socket.
    public var sourceStateSent: UInt64? = nil
    /// Destination: the last byte of STATE is read.
    public var destinationStateReceived: UInt64? = nil
    /// Destination: every vCPU's state is set (and stale runtime pages dropped).
    public var destinationVCPUSet: UInt64? = nil
    /// Destination: the first vCPU thread enters KVM_RUN.
    public var destinationFirstRun: UInt64? = nil
    /// Bytes the source sent from the stop to the end of STATE (header and MAC included), the
    /// STATE payload alone, and pages sent in between (prepared post-copy: none).
    public var bytesStopToState: UInt64? = nil
    public var stateBytes: UInt64? = nil
    public var pagesStopToState: UInt64? = nil
    public init() {}

    func json(guestGapNanos: UInt64?, vmmDowntimeNanos: UInt64?) -> JSONValue {
        func ms(_ n: UInt64?) -> JSONValue { n.map { .double(Double($0 / 1000) / 1000) } ?? .null }
        func u(_ n: UInt64?) -> JSONValue { n.map { .uint($0) } ?? .null }
        return .object([
            ("source_stopped_ms", ms(sourceStopped)), ("source_harvested_ms", ms(sourceHarvested)), ("source_state_saved_ms", ms(sourceStateSaved)), ("source_state_sent_ms", ms(sourceStateSent)),
            ("destination_state_received_ms", ms(destinationStateReceived)), ("destination_vcpu_set_ms", ms(destinationVCPUSet)),
            ("destination_first_run_ms", ms(destinationFirstRun)), ("vmm_downtime_ms", ms(vmmDowntimeNanos)), ("guest_gap_ms", ms(guestGapNanos)),
            ("bytes_stop_to_state", u(bytesStopToState)), ("state_bytes", u(stateBytes)), ("pages_stop_to_state", u(pagesStopToState)),
            ("note", "times from the source's stop, cumulative: source stopped -> harvested -> vCPU state saved -> STATE sent -> destination STATE received -> vCPU state set -> first KVM_RUN. vmm_downtime_ms ends at the destination's first KVM_RUN; QEMU's query-migrate downtime in post-copy ends when its source has sent the device-state package (postcopy_start), the counterpart of source_state_sent_ms"),
        ])
    }

    /// The destination's three times (RESULT).
    func encodeDestination(into w: inout ByteWriter) {
        for v in [destinationStateReceived, destinationVCPUSet, destinationFirstRun] { w.put(v ?? UInt64.max) }
    }
    mutating func decodeDestination(_ r: inout ByteReader) throws(KVMError) {
        func get(_ r: inout ByteReader) throws(KVMError) -> UInt64? { let v = try r.get(UInt64.self); return v == UInt64.max ? nil : v }
        destinationStateReceived = try get(&r)
        destinationVCPUSet = try get(&r)
        destinationFirstRun = try get(&r)
    }
}
