import CKVM
import MemVirtCore
import MemVirtGuest
#if canImport(Glibc)
import Glibc
#endif

/// How a live migration runs (`memvirt kvm migrate`).
public struct MigrationOptions: Sendable {
    public enum Mode: String, Sendable, CaseIterable {
        /// Dirty-log rounds while the guest runs, then stop-and-copy of the rest and the vCPUs.
        case precopy
        /// Stop at once, send the vCPUs; the destination runs and pulls pages on fault while
        /// the source pushes the rest.
        case postcopy
        /// Pre-copy rounds (`maxRounds`), then post-copy for what is still dirty.
        case hybrid
    }
    public var mode: Mode = .precopy
    /// Bytes per second the sender keeps to (nil: no limit).
    public var bandwidth: UInt64? = nil
    /// Pre-copy stops iterating when the rest would take at most this long to send.
    public var downtimeTargetNanos: UInt64 = 30_000_000
    public var maxRounds = 30
    /// Seed 004's page groups: with N > 1 a group of N pages with a dirty page is sent whole and
    /// its pages are not write-protected again (fewer write-protect faults, more bytes).
    public var groupPages = 1
    /// Run the guest this long before migrating.
    public var afterNanos: UInt64 = 1_000_000_000
    /// Pace each guest thread's accesses to this many per second (nil: as fast as it goes).
    /// A uniform writer (`--write-ratio 1`) at 2,560/s dirties 10 MiB/s of 4 KiB pages.
    public var accessesPerSecond: UInt64? = nil
    /// Run the guest under the VMM-side guest kernel: per vCPU the workload thread and a
    /// counting thread sharing the vCPU by the guest timer (KernelMigration).
    public var guestKernel = false
    /// With `guestKernel`: async page faults on both sides (post-copy faults on the
    /// destination park the faulting thread while its page comes; the counting thread runs).
    public var asyncPF = false
    /// Before the guest starts, the VMM writes every data page (a pattern with no zero
    /// words): a guest whose whole memory is in use, so no page can be skipped as untouched.
    /// The workload's results then differ from the oracle's (which starts from zeroed memory);
    /// the switch-over hashes still must match.
    public var prefillData = false
    /// Post-copy: the answer to a page the destination asks for goes out this long after the
    /// request arrived (a network round trip longer than loopback's ~30 us). Pushing is not
    /// delayed: if the push in page order reaches the page first, it arrives sooner.
    public var requestRoundTripNanos: UInt64 = 0
    public init() {}
}

/// One side's account of a migration (JSON keys as `memvirt kvm migrate/listen --json` prints).
public struct MigrationReport: Sendable {
    public var side: String
    public var mode: MigrationOptions.Mode
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
            ("migrated", .bool(migrated)), ("error", error.map { .string($0) } ?? .null),
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
        if let c = console { kv.append(("console", .string(c))) }
        if let k = guestKernel { kv.append(("guest_kernel", k.json)) }
        if let k = destinationGuestKernel { kv.append(("destination_guest_kernel", k.json)) }
        kv.append(("note", "downtime_ms is the largest gap between two guest accesses across the switch, from the guest's TSC (restored as source TSC + elapsed)"))
        return .object(kv)
    }
}

/// The VM configuration both sides build from (sent in HELLO; the destination must arrive at
/// the same runtime layout, or the stream is refused as mismatched).
struct MigrationHello {
    var dataSize: UInt64
    var vcpus: UInt32
    var tableBytesPerVCPU: UInt64
    var runtimeSize: UInt64
    var mode: UInt8
    var pageSize: UInt64
    /// A multiboot guest (Multiboot.swift): 1, and its announced mailbox (0: none). Older
    /// streams end before these fields: a runtime guest.
    var multiboot: UInt8 = 0
    var multibootMailbox: UInt64 = 0
    /// KernelMigration.enabledBit | asyncPFBit (0: commands on the vCPUs, no guest kernel).
    var kernel: UInt8 = 0

    func encoded() -> [UInt8] {
        var w = ByteWriter()
        w.put(dataSize); w.put(vcpus); w.put(tableBytesPerVCPU); w.put(runtimeSize); w.put(mode); w.put(pageSize)
        w.put(multiboot); w.put(multibootMailbox)
        w.put(kernel)
        return w.bytes
    }
    static func decode(_ b: UnsafeRawBufferPointer) throws(KVMError) -> MigrationHello {
        var r = ByteReader(b, what: "HELLO")
        var h = MigrationHello(dataSize: try r.get(), vcpus: try r.get(), tableBytesPerVCPU: try r.get(), runtimeSize: try r.get(),
                               mode: try r.get(), pageSize: try r.get())
        if r.remaining >= 9 { h.multiboot = try r.get(); h.multibootMailbox = try r.get() }
        if r.remaining >= 1 { h.kernel = try r.get() }
        return h
    }
}

/// Page records in a PAGES message: u32 count, then (u64 index, u8 kind) each, then the
/// 4 KiB pages of kind 1 in order. Index < data pages: the data slot; above: the runtime.
struct PageBatch {
    static let maxPages = 256
    /// count (u32), table (u64 index + u8 kind each), pages: laid out at flush.
    let message: UnsafeMutableRawPointer = .allocate(byteCount: 4 + 9 * maxPages + maxPages * 4096, alignment: 4096)
    let data: UnsafeMutableRawPointer = .allocate(byteCount: maxPages * 4096, alignment: 4096)
    var count = 0
    var dataPages = 0

    mutating func reset() { count = 0; dataPages = 0 }
    /// A page known to be zero (never touched: not resident), without reading it.
    mutating func addZero(index: UInt64) {
        (message + 4 + 9 * count).storeBytes(of: index, as: UInt64.self)
        (message + 4 + 9 * count + 8).storeBytes(of: UInt8(0), as: UInt8.self)
        count += 1
    }
    mutating func add(index: UInt64, page: UnsafeRawPointer) -> Bool {
        let zero = ckvm_page_is_zero(page) != 0
        (message + 4 + 9 * count).storeBytes(of: index, as: UInt64.self)
        (message + 4 + 9 * count + 8).storeBytes(of: UInt8(zero ? 0 : 1), as: UInt8.self)
        if !zero {
            memcpy(data + dataPages * 4096, page, 4096)
            dataPages += 1
        }
        count += 1
        return zero
    }
    /// The payload: count, table, pages (valid until the next add).
    func payload() -> UnsafeRawBufferPointer {
        message.storeBytes(of: UInt32(count), as: UInt32.self)
        memcpy(message + 4 + 9 * count, data, dataPages * 4096)
        return UnsafeRawBufferPointer(start: message, count: 4 + 9 * count + dataPages * 4096)
    }
}

public enum LiveMigration {
    /// Guest gaps longer than this are logged by the guest (microseconds of TSC).
    static let gapThresholdMicros: UInt64 = 300

    static func tscKHz(_ g: GuestVM) -> UInt64 {
        let k = ckvm_get_tsc_khz(g.vcpus[0].fd.raw)
        return k > 0 ? UInt64(k) : 1_000_000
    }

    static func realtimeNanos() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
    }

    /// Hash of guest memory: the sum over pages of `ckvm_page_hash(page, index)` (data pages
    /// first, then the runtime), so either side can build it page by page in any order.
    static func memoryHash(_ g: GuestVM) -> UInt64 {
        var h: UInt64 = 0
        let dp = Int(g.data.size / 4096)
        // Pages never touched read as zero: their hash needs no read (which would fault them in).
        let rd = (try? g.data.residency()) ?? [UInt8](repeating: 1, count: dp)
        let rr = (try? g.runtime.residency()) ?? [UInt8](repeating: 1, count: Int(g.runtime.size / 4096))
        for p in 0..<dp { h &+= rd[p] & 1 != 0 ? ckvm_page_hash(g.data.mapping.base + p * 4096, UInt64(p)) : ckvm_page_hash_zero(UInt64(p)) }
        for p in 0..<rr.count { h &+= rr[p] & 1 != 0 ? ckvm_page_hash(g.runtime.mapping.base + p * 4096, UInt64(dp + p)) : ckvm_page_hash_zero(UInt64(dp + p)) }
        return h
    }

    // MARK: source

    /// Runs `spec` in a VM here, migrates it to `host:port` after `options.afterNanos`, and
    /// returns the source's report (with the destination's summary). If the migration fails
    /// before the destination took over, the guest goes on here to the end of its workload and
    /// the report says why (`migrated` false): nothing is lost.
    public static func migrate(_ spec: WorkloadSpec, to host: String, port: UInt16, options o: MigrationOptions) throws(KVMError) -> MigrationReport {
        do { try spec.validate() } catch { throw KVMError.invalid(error.message) }
        guard o.groupPages >= 1, o.groupPages <= 512, o.groupPages & (o.groupPages - 1) == 0 else {
            throw KVMError.invalid("--group-pages \(o.groupPages): a power of two, 1...512")
        }
        guard o.maxRounds >= 1, o.maxRounds <= 1000 else { throw KVMError.invalid("--max-rounds \(o.maxRounds): use 1...1000") }
        if let r = o.accessesPerSecond, r == 0 || r > 1_000_000_000 { throw KVMError.invalid("--access-rate \(r): use 1...1000000000 accesses per second") }
        let kvm = try KVM()
        var c = GuestConfig(dataSize: spec.footprint.rawValue)
        c.dataVirtual = spec.base
        c.vcpus = spec.threads
        c.tableBytesPerVCPU = KVMRunner.tableBytes(spec)
        c.dataSlotFlags = .logDirtyPages
        c.manualDirtyProtect = kvm.check(.manualDirtyLogProtect2) > 0
        if o.groupPages > 1 && !c.manualDirtyProtect { throw KVMError.unavailable("--group-pages needs KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2") }
        if o.asyncPF && !o.guestKernel { throw KVMError.invalid("--async-pf needs --guest-kernel (a guest kernel parks and wakes the threads)") }
        if o.guestKernel {
            c.irqchip = true
            c.threads = 2 * spec.threads
        }
        let g = try GuestVM(kvm: kvm, config: c)
        if o.prefillData {
            let words = g.data.mapping.base.assumingMemoryBound(to: UInt64.self)
            for k in 0..<Int(g.layout.dataSize / 8) { words[k] = (UInt64(k) &+ 1) &* 0x9E37_79B9_7F4A_7C15 }
        }
        let khz = tscKHz(g)
        var workload: [memvirt_mailbox] = []
        for t in 0..<spec.threads {
            var (m, table) = try KVMRunner.prepare(spec, thread: t, layout: g.layout)
            if !table.isEmpty { try g.runtime.write(array: table, at: GuestPhysicalAddress(rawValue: m.table)) }
            m.gap_threshold = gapThresholdMicros * khz / 1000
            if let r = o.accessesPerSecond { m.pace = max(1, khz * 1000 / max(1, r)) }
            if o.guestKernel { workload.append(m) } else { try g.setMailbox(t, m) }
        }
        var kernel: GuestKernel? = nil
        if o.guestKernel {
            try g.vm.disableHaltPolling()
            kernel = try GuestKernel(vm: g, threads: KernelMigration.threads(workload: workload),
                                     options: KernelMigration.options(vcpus: spec.threads, asyncPF: o.asyncPF))
        }
        return try migrate(g, threads: spec.threads, to: host, port: port, options: o, kernel: kernel)
    }

    /// Migrates the prepared (not yet started) guest `g` (its data slot dirty-logged), run by
    /// `kernel` if given.
    static func migrate(_ g: GuestVM, threads: Int, to host: String, port: UInt16, options o: MigrationOptions,
                        kernel: GuestKernel? = nil) throws(KVMError) -> MigrationReport {
        var report = MigrationReport(side: "source", mode: o.mode)
        // vCPU ioctls (KVM_GET_STATS_FD among them) wait for the vCPU's mutex, which KVM_RUN
        // holds for as long as the guest runs without an exit: take everything per vCPU now.
        let stats = try g.vcpus.map { (v) throws(KVMError) in try v.stats() }
        let kicker = VCPUKicker(vm: g)
        var runner = VCPUThreads(g: g, kicker: kicker, kernel: kernel)
        try runner.start()
        let t0 = monotonicNanoseconds()
        while monotonicNanoseconds() - t0 < o.afterNanos && !runner.allDoneFast { usleepNanos(2_000_000) }
        let start = monotonicNanoseconds()
        var source = SourceSide(g: g, options: o, kicker: kicker, runner: runner, report: report, stats: stats)
        do {
            let ch = try MigrationChannel.connect(host: host, port: port)
            if let bw = o.bandwidth { ch.bandwidth = bw }
            try source.run(ch)
            report = source.report
            report.migrated = true
            report.sessionNanos = monotonicNanoseconds() - start
            report.totalNanos = (source.completedAt ?? monotonicNanoseconds()) - start
            return report
        } catch {
            report = source.report
            runner = source.runner
            if source.destinationOwnsGuest {
                report.migrated = true
                report.error = "after the switch: \(error)"
                report.totalNanos = monotonicNanoseconds() - start
                return report
            }
            // The destination never took over: the guest goes on here.
            report.migrated = false
            report.error = "\(error)"
            if runner.stopped {
                kicker.resume()
                try runner.start()
            }
            try runner.join()
            report.guest = kernel == nil ? try finalGuest(g, threads: threads) : try KernelMigration.finalGuest(g)
            report.guestKernel = try runner.kernelReport()
            report.sourceHash = memoryHash(g)
            report.totalNanos = monotonicNanoseconds() - start
            return report
        }
    }

    /// The guest's counters and, computed in the guest on vCPU 0, its memory checksum.
    static func finalGuest(_ g: GuestVM, threads: Int) throws(KVMError) -> [GuestReport] {
        if let mb = g.multiboot { return try multibootGuest(g, mb) }
        var out: [GuestReport] = []
        for t in 0..<threads {
            let m = try g.mailbox(t)
            out.append(GuestReport(mailbox: m))
        }
        out[0].memoryChecksum = try g.checksumInGuest(bytes: g.layout.dataSize)
        return out
    }
}

/// The vCPU threads of a migrating VM: start, stop (kick), join.
struct VCPUThreads {
    let g: GuestVM
    let kicker: VCPUKicker
    /// The guest kernel that runs the vCPUs (KernelMigration), or nil: each vCPU runs its
    /// command (`GuestVM.execute`).
    let kernel: GuestKernel?
    var threads: [DedicatedThread] = []
    var boxes: [ResultBox<CommandOutcome>] = []
    var kernelBox = ResultBox<[VCPUSchedulerReport]>()
    /// The guest kernel's reports, one per vCPU per run so far (summed when reported).
    var kernelReports: [VCPUSchedulerReport] = []
    var kernelNanos: UInt64 = 0
    var kernelStarted: UInt64 = 0
    /// The counting threads' total when this side first ran them (a destination goes on from
    /// the source's counts): increments here are counted from it.
    var counterBase: UInt64? = nil
    var done: [Bool]
    var stopped = false

    init(g: GuestVM, kicker: VCPUKicker, kernel: GuestKernel? = nil) {
        self.g = g
        self.kicker = kicker
        self.kernel = kernel
        done = g.vcpus.map { _ in false }
    }

    mutating func start() throws(KVMError) {
        stopped = false
        if let k = kernel {
            let box = ResultBox<[VCPUSchedulerReport]>()
            kernelBox = box
            if counterBase == nil { counterBase = try KernelMigration.counters(g).reduce(0, +) }
            kernelStarted = monotonicNanoseconds()
            // Reset here, not on the new thread: a stop requested before that thread gets going
            // must not be wiped.
            k.prepareRun()
            threads = [try DedicatedThread.start(name: "memvirt-guest-kernel") {
                do { box.value = .success(try k.run(forNanos: 24 * 3_600_000_000_000, resetStop: false)) } catch let e as KVMError { box.value = .failure(e) } catch {}
            }]
            return
        }
        boxes = g.vcpus.map { _ in ResultBox<CommandOutcome>() }
        threads = []
        for (i, box) in boxes.enumerated() where !done[i] {
            let g = self.g, k = kicker
            threads.append(try DedicatedThread.start(name: "memvirt-vcpu\(i)") {
                do { box.value = .success(try g.execute(vcpu: i, kicker: k)) } catch let e as KVMError { box.value = .failure(e) } catch {}
            })
        }
    }

    /// True when every vCPU reported DONE (read without joining: a hint).
    var allDoneFast: Bool {
        if let k = kernel { return k.finished }
        return boxes.allSatisfy { b in if case .success(let o)? = b.value { return !o.stopped } else { return false } }
    }

    /// The guest kernel's account so far (nil without one).
    func kernelReport() throws(KVMError) -> KernelMigrationReport? {
        guard let k = kernel else { return nil }
        var r = KernelMigrationReport(asyncPF: k.options.asyncPF)
        r.add(kernelReports)
        r.counterIncrements = try KernelMigration.counters(g).reduce(0, +) &- (counterBase ?? 0)
        r.counterPerSecond = kernelNanos > 0 ? Double(r.counterIncrements) / (Double(kernelNanos) / 1e9) : 0
        // How long the counting threads held their vCPUs, from the scheduler's clock: robust to
        // the counting loop's own speed, which varies between runs on a shared host.
        let held = kernelReports.map { $0.threadNanos[KernelMigration.counterThread($0.vcpu)] ?? 0 }.reduce(0, +)
        if kernelNanos > 0 { r.counterShare = Double(held) / Double(kernelNanos) / Double(max(1, g.vcpus.count)) }
        return r
    }

    /// Waits for the threads; marks the vCPUs that finished their workload.
    mutating func join() throws(KVMError) {
        for t in threads { t.join() }
        if let k = kernel {
            threads = []
            guard let r = kernelBox.value else { return }
            kernelNanos += monotonicNanoseconds() - kernelStarted
            let reports = try r.get()
            kernelReports += reports
            for i in g.vcpus.indices { done[i] = k.isDone(KernelMigration.workloadThread(i)) }
            kernelBox = ResultBox()
            return
        }
        for (i, b) in boxes.enumerated() {
            guard let r = b.value else { continue }
            let o = try r.get()
            if !o.stopped { done[i] = true }
        }
        threads = []
    }

    /// Kicks every vCPU out of KVM_RUN and waits for them.
    mutating func stop() throws(KVMError) {
        if let k = kernel { k.requestStop() } else { kicker.stop() }
        try join()
        stopped = true
    }
}

/// The source's half of the protocol.
struct SourceSide {
    let g: GuestVM
    let options: MigrationOptions
    let kicker: VCPUKicker
    var runner: VCPUThreads
    var report: MigrationReport
    var destinationOwnsGuest = false
    var completedAt: UInt64? = nil
    var batch = PageBatch()
    let dataPages: Int

    let stats: [StatsReader]

    init(g: GuestVM, options: MigrationOptions, kicker: VCPUKicker, runner: VCPUThreads, report: MigrationReport, stats: [StatsReader]) {
        self.stats = stats
        self.g = g
        self.options = options
        self.kicker = kicker
        self.runner = runner
        self.report = report
        dataPages = Int(g.data.size / 4096)
    }

    mutating func flush(_ ch: MigrationChannel) throws(KVMError) {
        if batch.count == 0 { return }
        try ch.send(.pages, batch.payload())
        batch.reset()
    }

    /// mincore of the data slot, then the runtime: a page not resident is zero (never touched).
    var resident: [UInt8] = []

    mutating func refreshResidency() throws(KVMError) {
        resident = try g.data.residency() + g.runtime.residency()
    }

    mutating func sendPage(_ ch: MigrationChannel, _ index: Int) throws(KVMError) {
        let p: UnsafeRawPointer = index < dataPages ? UnsafeRawPointer(g.data.mapping.base + index * 4096)
            : UnsafeRawPointer(g.runtime.mapping.base + (index - dataPages) * 4096)
        if index < resident.count && resident[index] & 1 == 0 {
            batch.addZero(index: UInt64(index))
            report.zeroPages += 1
        } else if batch.add(index: UInt64(index), page: p) { report.zeroPages += 1 }
        report.pagesSent += 1
        if batch.count == PageBatch.maxPages { try flush(ch) }
    }

    /// One dirty-log harvest of the data slot: the pages to send this round (whole groups when
    /// `groupPages` > 1), re-protecting only pages outside hot groups.
    mutating func harvest() throws(KVMError) -> [Int] {
        let words = (dataPages + 63) / 64
        var bitmap = [UInt64](repeating: 0, count: words)
        try g.vm.getDirtyLog(slot: GuestLayout.dataSlot, into: &bitmap)
        let n = options.groupPages
        var pages: [Int] = []
        if n == 1 {
            if g.vm.manualDirtyProtect {
                var count: UInt64 = 0
                for w in bitmap { count += UInt64(w.nonzeroBitCount) }
                if count > 0 { try g.vm.clearDirtyLog(slot: GuestLayout.dataSlot, firstPage: 0, pages: UInt32(dataPages), bitmap: &bitmap) }
                report.pagesReprotected += count
            }
            for (wi, w) in bitmap.enumerated() where w != 0 {
                var x = w
                while x != 0 { pages.append(wi * 64 + x.trailingZeroBitCount); x &= x - 1 }
            }
        } else {
            // A group with a dirty page is not cleared: its dirty bits stay set, so it is sent
            // whole every round from now on, and its pages are not write-protected again.
            var left: UInt64 = 0
            var g0 = 0
            while g0 < dataPages {
                var hot = false
                for p in g0..<min(g0 + n, dataPages) where bitmap[p / 64] >> (p % 64) & 1 == 1 { hot = true; left += 1 }
                if hot { pages.append(contentsOf: g0..<min(g0 + n, dataPages)) }
                g0 += n
            }
            report.pagesLeftWritable = left
        }
        return pages
    }

    mutating func run(_ ch: MigrationChannel) throws(KVMError) {
        var hello = MigrationHello(dataSize: g.layout.dataSize, vcpus: UInt32(g.vcpus.count), tableBytesPerVCPU: g.layout.tableStride,
                                   runtimeSize: g.layout.runtimeSize, mode: UInt8(MigrationOptions.Mode.allCases.firstIndex(of: options.mode)!),
                                   pageSize: g.layout.dataPageSize.bytes)
        if let mb = g.multiboot { hello.multiboot = 1; hello.multibootMailbox = mb.mailbox ?? 0 }
        if let k = runner.kernel { hello.kernel = KernelMigration.enabledBit | (k.options.asyncPF ? KernelMigration.asyncPFBit : 0) }
        try ch.send(.hello, hello.encoded())
        var pfBefore: UInt64 = 0
        for s in stats { pfBefore += try s.read()["pf_fixed"] }
        // Round 0: reset the log, then everything (pages dirtied from here on are logged).
        var mark = monotonicNanoseconds()
        func phase(_ name: String) { let now = monotonicNanoseconds(); report.phases.append((name, now - mark)); mark = now }
        _ = try harvest()
        report.pagesReprotected = 0
        if options.mode != .postcopy {
            try refreshResidency()
            for p in 0..<dataPages { try sendPage(ch, p) }
            try flush(ch)
            // Pages from the dirty log are resident (the guest wrote them): no stale look-ups.
            resident = []
            phase("round0")
            report.rounds = 1
            report.dirtyPerRound.append(UInt64(dataPages))
            let roundLimit = options.mode == .hybrid ? min(options.maxRounds, 2) : options.maxRounds
            var lastSent = ch.bytesSent, lastTime = monotonicNanoseconds()
            while report.rounds < roundLimit && !runner.allDoneFast {
                let dirty = try harvest()
                report.dirtyPerRound.append(UInt64(dirty.count))
                let now = monotonicNanoseconds()
                let rate = Double(ch.bytesSent - lastSent) / max(1e-6, Double(now - lastTime) / 1e9)
                let estimate = Double(dirty.count * 4096) / max(rate, 1)
                if estimate * 1e9 <= Double(options.downtimeTargetNanos) && options.mode == .precopy {
                    // Small enough: leave these for the stop-and-copy (harvested again there).
                    pendingDirty = dirty
                    break
                }
                lastSent = ch.bytesSent; lastTime = monotonicNanoseconds()
                for p in dirty { try sendPage(ch, p) }
                try flush(ch)
                report.rounds += 1
            }
            phase("rounds")
        }
        // Wait until the destination has built its VM and applied everything sent so far (it
        // places pages more slowly than loopback carries them): the stop-and-copy then goes out
        // on an empty pipe to a VM that is ready. The guest runs meanwhile; what it dirties is
        // in the final harvest.
        try ch.send(.sync)
        while true {
            let (type, _) = try ch.receive()
            if type == .synced { break }
            throw KVMError.invalid("migration stream: expected SYNCED from the destination, got \(type)")
        }
        phase("sync")
        // Stop the guest.
        let stopReal = LiveMigration.realtimeNanos()
        try runner.stop()
        phase("stop")
        // Stopped. On the switch path only the runtime slot's residency is read: the data
        // pages sent now are dirty, hence resident; post-copy's push reads the data slot's
        // after STATE (mincore over a large slot costs a millisecond of downtime).
        resident = [UInt8](repeating: 1, count: dataPages) + (try g.runtime.residency())
        var missing: [Int] = []
        switch options.mode {
        case .precopy:
            var final = Set(pendingDirty)
            for p in try harvest() { final.insert(p) }
            report.dirtyPerRound.append(UInt64(final.count))
            for p in final.sorted() { try sendPage(ch, p) }
        case .hybrid:
            let stale = try harvest()
            report.dirtyPerRound.append(UInt64(stale.count))
            var w = ByteWriter()
            w.put(UInt64(stale.count))
            for p in stale { w.put(UInt64(p)) }
            try ch.send(.discard, w.bytes)
            missing = stale
        case .postcopy:
            missing = Array(0..<dataPages)
        }
        phase("final_harvest")
        for p in 0..<Int(g.runtime.size / 4096) { try sendPage(ch, dataPages + p) }
        try flush(ch)
        phase("final_send")
        // vCPU states and the facts the destination needs to resume.
        var w = ByteWriter()
        w.put(stopReal)
        w.put(UInt64(g.vcpus.count))
        for (i, v) in g.vcpus.enumerated() {
            w.put(UInt8(runner.done[i] ? 1 : 0))
            w.bytes += try v.saveState().encoded()
        }
        if let k = runner.kernel {
            let states = k.schedulerStates.compactMap { $0 }
            guard states.count == g.vcpus.count else { throw KVMError.invalid("guest kernel: no scheduler state to send (it never ran)") }
            KernelMigration.encode(states, into: &w)
            report.guestKernel = try runner.kernelReport()
            report.guestKernel?.parkedAtSwitch = states.map(\.parked).reduce(0, +)
        }
        try ch.send(.state, w.bytes)
        phase("state")
        var pfAfter: UInt64 = 0
        for s in stats { pfAfter += try s.read()["pf_fixed"] }
        report.kvmPfFixedDuringMigration = pfAfter - pfBefore
        if options.mode != .precopy { try refreshResidency() }
        if options.mode == .precopy {
            try ch.send(.end)
            try awaitResumed(ch)
            completedAt = monotonicNanoseconds()
            phase("resumed")
        } else {
            try postcopyPush(ch, missing: missing)
            report.sourceHash = LiveMigration.memoryHash(g)
            return
        }
        report.sourceHash = LiveMigration.memoryHash(g)
        report.bytesSent = ch.bytesSent
        // The destination's summary, after its guest finished.
        while true {
            let (type, payload) = try ch.receive()
            if type == .result { try readResult(payload); break }
            if type == .request || type == .resumed { continue }
            throw KVMError.invalid("migration stream: unexpected \(type) from the destination")
        }
        report.bytesReceived = ch.bytesReceived
    }

    var pendingDirty: [Int] = []

    mutating func awaitResumed(_ ch: MigrationChannel) throws(KVMError) {
        let (type, _) = try ch.receive()
        guard type == .resumed else { throw KVMError.invalid("migration stream: expected RESUMED from the destination, got \(type)") }
        destinationOwnsGuest = true
    }

    mutating func readResult(_ b: UnsafeRawBufferPointer) throws(KVMError) {
        var r = ByteReader(b, what: "RESULT")
        report.destinationHash = try r.get(UInt64.self)
        let down: UInt64 = try r.get()
        report.downtimeNanos = down == UInt64.max ? nil : down
        let vmmDown: UInt64 = try r.get()
        report.vmmDowntimeNanos = vmmDown
        report.destinationRunNanos = try r.get(UInt64.self)
        report.destinationPfFixed = try r.get(UInt64.self)
        let n = Int(try r.get(UInt64.self))
        guard n <= 64 else { throw KVMError.invalid("migration stream corrupt: RESULT with \(n) guests") }
        report.guest = []
        for _ in 0..<n {
            var gr = GuestReport(accesses: try r.get(), reads: try r.get(), writes: try r.get(), readSum: try r.get(), memoryChecksum: nil)
            let c: UInt64 = try r.get()
            let has: UInt8 = try r.get()
            if has != 0 { gr.memoryChecksum = c }
            report.guest.append(gr)
        }
        // The destination's guest kernel account: a flag byte, then the account when it ran one.
        if r.remaining >= 1, try r.get(UInt8.self) == 1 {
            var k = KernelMigrationReport(asyncPF: try r.get(UInt8.self) != 0)
            k.parkedAtSwitch = Int(try r.get(UInt32.self))
            k.apfNotPresent = try r.get(); k.apfReady = try r.get(); k.apfWakeAll = try r.get()
            k.counterIncrements = try r.get()
            k.counterPerSecond = Double(try r.get(UInt64.self))
            report.destinationGuestKernel = k
        }
    }

    /// Post-copy: serve the destination's requests first, push the rest in order between them.
    mutating func postcopyPush(_ ch: MigrationChannel, missing: [Int]) throws(KVMError) {
        let requests = RequestQueue()
        let rtt = options.requestRoundTripNanos
        let reader = try DedicatedThread.start(name: "memvirt-migrate-requests") {
            while true {
                do {
                    let (type, payload) = try ch.receive()
                    switch type {
                    case .request:
                        var r = ByteReader(payload, what: "REQUEST")
                        var pages: [Int] = []
                        while r.remaining >= 8 { pages.append(Int(try r.get(UInt64.self))) }
                        requests.push(pages, due: monotonicNanoseconds() + rtt)
                    case .resumed: requests.markResumed()
                    case .result:
                        requests.finish(result: Array(payload))
                        return
                    default:
                        requests.fail(KVMError.invalid("migration stream: unexpected \(type) from the destination"))
                        return
                    }
                } catch let e as KVMError {
                    requests.fail(e)
                    return
                } catch {
                    requests.fail(.invalid("\(error)"))
                    return
                }
            }
        }
        var toSend = [Bool](repeating: false, count: dataPages)
        for p in missing { toSend[p] = true }
        var cursor = 0
        var left = missing.count
        while left > 0 {
            if let e = requests.failure { reader.join(); throw e }
            if requests.resumed { destinationOwnsGuest = true }
            var asked = requests.drain(dueBy: monotonicNanoseconds())
            if !asked.isEmpty {
                asked.removeAll { $0 < 0 || $0 >= dataPages || !toSend[$0] }
                for p in asked { toSend[p] = false; left -= 1; report.pagesRequested += 1; try sendPage(ch, p) }
                try flush(ch)
                continue
            }
            if cursor >= dataPages {
                // Defensive: the push covers every page still to send, so `left` is 0 by the
                // time the cursor is at the end; never spin without sleeping.
                usleepNanos(20_000)
                continue
            }
            var k = 0
            while cursor < dataPages && k < 64 {
                if toSend[cursor] { toSend[cursor] = false; left -= 1; report.pagesPushed += 1; try sendPage(ch, cursor); k += 1 }
                cursor += 1
            }
            try flush(ch)
        }
        try ch.send(.end)
        completedAt = monotonicNanoseconds()
        reader.join()
        if let e = requests.failure { throw e }
        destinationOwnsGuest = true
        if let r = requests.result {
            let p = UnsafeMutableRawPointer.allocate(byteCount: max(1, r.count), alignment: 8)
            defer { p.deallocate() }
            r.withUnsafeBytes { if let b = $0.baseAddress { p.copyMemory(from: b, byteCount: $0.count) } }
            try readResult(UnsafeRawBufferPointer(start: p, count: r.count))
        } else {
            throw KVMError.invalid("migration stream: the destination closed without its RESULT")
        }
        report.bytesSent = ch.bytesSent
        report.bytesReceived = ch.bytesReceived
    }
}

/// Requests from the destination, handed from the reader thread to the pusher.
final class RequestQueue: @unchecked Sendable {
    var lock = pthread_mutex_t()
    var pages: [(page: Int, due: UInt64)] = []
    var _failure: KVMError?
    var _result: [UInt8]?
    var _resumed = false
    init() { pthread_mutex_init(&lock, nil) }
    var failure: KVMError? { pthread_mutex_lock(&lock); defer { pthread_mutex_unlock(&lock) }; return _failure }
    var result: [UInt8]? { pthread_mutex_lock(&lock); defer { pthread_mutex_unlock(&lock) }; return _result }
    var resumed: Bool { pthread_mutex_lock(&lock); defer { pthread_mutex_unlock(&lock) }; return _resumed }
    deinit { pthread_mutex_destroy(&lock) }
    func push(_ p: [Int], due: UInt64) { pthread_mutex_lock(&lock); pages += p.map { ($0, due) }; pthread_mutex_unlock(&lock) }
    /// The requests due by `now` (arrival order; later ones stay queued).
    func drain(dueBy now: UInt64) -> [Int] {
        pthread_mutex_lock(&lock)
        defer { pthread_mutex_unlock(&lock) }
        let n = pages.firstIndex { $0.due > now } ?? pages.count
        let p = pages[..<n].map(\.page)
        pages.removeFirst(n)
        return p
    }
    func fail(_ e: KVMError) { pthread_mutex_lock(&lock); _failure = _failure ?? e; pthread_mutex_unlock(&lock) }
    func finish(result r: [UInt8]) { pthread_mutex_lock(&lock); _result = r; pthread_mutex_unlock(&lock) }
    func markResumed() { pthread_mutex_lock(&lock); _resumed = true; pthread_mutex_unlock(&lock) }
}
