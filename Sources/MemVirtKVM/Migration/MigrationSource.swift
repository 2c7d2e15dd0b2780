import CKVM
import MemVirtCore
import MemVirtGuest
#if canImport(Glibc)
import Glibc
#endif

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
        var failedAttempts: [String] = []
        while true {
            let start = monotonicNanoseconds()
            var source = SourceSide(g: g, options: o, kicker: kicker, runner: runner, report: report, stats: stats)
            source.report.failedAttempts = failedAttempts
            do {
                let ch = try MigrationChannel.connect(host: host, port: port, timeoutNanos: o.link.timeoutNanos)
                if let bw = o.bandwidth { ch.bandwidth = bw }
                try ch.authenticate(key: o.link.key, source: true)
                try source.run(ch)
                report = source.report
                report.migrated = true
                report.switchedOver = true
                report.sessionNanos = monotonicNanoseconds() - start
                report.totalNanos = (source.completedAt ?? monotonicNanoseconds()) - start
                return report
            } catch {
                report = source.report
                runner = source.runner
                g.runtime.vmmWrites.disarm()
                if source.destinationOwnsGuest {
                    // The destination resumed the guest and this side stopped it for good: the
                    // migration failed and the guest is lost (or, with differing hashes, wrong).
                    report.migrated = false
                    report.switchedOver = true
                    report.error = "after the switch (the destination had resumed the guest; it is lost): \(error)"
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
                if failedAttempts.count < o.retries && !runner.allDoneFast {
                    failedAttempts.append("\(error)")
                    usleepNanos(o.retryDelayNanos)
                    report = MigrationReport(side: "source", mode: o.mode)
                    continue
                }
                try runner.join()
                report.guest = kernel == nil ? try finalGuest(g, threads: threads) : try KernelMigration.finalGuest(g)
                report.guestKernel = try runner.kernelReport()
                report.sourceHash = memoryHash(g)
                report.totalNanos = monotonicNanoseconds() - start
                return report
            }
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

    /// Prepared post-copy: the runtime pages written since the last call, by the guest (the
    /// runtime slot's dirty log) or by this VMM itself (`GuestMemoryRegion.vmmWrites`: KVM's
    /// log never sees the VMM's own writes), sorted, as indices within the runtime. `reprotect`
    /// false at the stop: the guest does not run here again in this session (a retry sends the
    /// whole runtime again), so KVM_CLEAR_DIRTY_LOG would only add to the downtime.
    mutating func harvestRuntime(reprotect: Bool = true) throws(KVMError) -> [Int] {
        let n = runtimePages
        var bitmap = [UInt64](repeating: 0, count: (n + 63) / 64)
        try g.vm.getDirtyLog(slot: GuestLayout.runtimeSlot, into: &bitmap)
        if reprotect, g.vm.manualDirtyProtect, bitmap.contains(where: { $0 != 0 }) {
            try g.vm.clearDirtyLog(slot: GuestLayout.runtimeSlot, firstPage: 0, pages: UInt32(n), bitmap: &bitmap)
        }
        var pages = Set(g.runtime.vmmWrites.take().filter { $0 < n })
        for (wi, w) in bitmap.enumerated() where w != 0 {
            var x = w
            while x != 0 { pages.insert(wi * 64 + x.trailingZeroBitCount); x &= x - 1 }
        }
        return pages.sorted()
    }

    var runtimePages: Int { Int(g.runtime.size / 4096) }

    mutating func run(_ ch: MigrationChannel) throws(KVMError) {
        var hello = MigrationHello(dataSize: g.layout.dataSize, vcpus: UInt32(g.vcpus.count), tableBytesPerVCPU: g.layout.tableStride,
                                   runtimeSize: g.layout.runtimeSize, mode: UInt8(MigrationOptions.Mode.allCases.firstIndex(of: options.mode)!),
                                   pageSize: g.layout.dataPageSize.bytes)
        if let mb = g.multiboot { hello.multiboot = 1; hello.multibootMailbox = mb.mailbox ?? 0 }
        if let k = runner.kernel { hello.kernel = KernelMigration.enabledBit | (k.options.asyncPF ? KernelMigration.asyncPFBit : 0) }
        try ch.send(.hello, hello.encoded())
        options.sourceHook?(g, "hello")
        var pfBefore: UInt64 = 0
        for s in stats { pfBefore += try s.read()["pf_fixed"] }
        // Round 0: reset the log, then everything (pages dirtied from here on are logged).
        var mark = monotonicNanoseconds()
        func phase(_ name: String) { let now = monotonicNanoseconds(); report.phases.append((name, now - mark)); mark = now }
        // Prepared post-copy: the runtime goes now, while the guest runs; at the stop only what
        // was written in it since (by the guest or by this VMM) is named, and comes after STATE.
        let prepared = options.mode == .postcopy
        if prepared {
            try g.vm.setSlotFlags(id: GuestLayout.runtimeSlot, .logDirtyPages)
            g.runtime.vmmWrites.arm()
            _ = try harvestRuntime()
        }
        _ = try harvest()
        report.pagesReprotected = 0
        if prepared {
            resident = [UInt8](repeating: 1, count: dataPages) + (try g.runtime.residency())
            for p in 0..<runtimePages { try sendPage(ch, dataPages + p) }
            try flush(ch)
            resident = []
            phase("prepare_runtime")
            options.sourceHook?(g, "prepared")
        }
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
        let stopMono = monotonicNanoseconds()
        let bytesAtStop = ch.bytesSent, pagesAtStop = report.pagesSent
        try runner.stop()
        report.switchTimes.sourceStopped = monotonicNanoseconds() - stopMono
        phase("stop")
        // Stopped. On the switch path only the runtime slot's residency is read: the data
        // pages sent now are dirty, hence resident; post-copy's push reads the data slot's
        // after STATE (mincore over a large slot costs a millisecond of downtime).
        // Prepared post-copy sends no page here: nothing to look up.
        if !prepared { resident = [UInt8](repeating: 1, count: dataPages) + (try g.runtime.residency()) }
        var missing: [Int] = []
        var stale: [Int] = []
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
            // Runtime pages written since they were sent: named in STATE (the destination drops
            // its copies), pushed first after it.
            stale = try harvestRuntime(reprotect: false)
            g.runtime.vmmWrites.disarm()
            report.runtimePagesStale = UInt64(stale.count)
        }
        report.switchTimes.sourceHarvested = monotonicNanoseconds() - stopMono
        phase("final_harvest")
        if !prepared {
            for p in 0..<runtimePages { try sendPage(ch, dataPages + p) }
            try flush(ch)
            phase("final_send")
        }
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
        // Version 4: the runtime pages whose copy at the destination is stale (prepared
        // post-copy; empty otherwise).
        w.put(UInt64(stale.count))
        for p in stale { w.put(UInt64(p)) }
        report.switchTimes.sourceStateSaved = monotonicNanoseconds() - stopMono
        phase("save_state")
        try ch.send(.state, w.bytes)
        report.switchTimes.sourceStateSent = monotonicNanoseconds() - stopMono
        report.switchTimes.stateBytes = UInt64(w.bytes.count)
        report.switchTimes.bytesStopToState = ch.bytesSent - bytesAtStop
        report.switchTimes.pagesStopToState = report.pagesSent - pagesAtStop
        // The switch: from here the destination may run the guest, so this side never resumes
        // it (two running copies); a failure from now on loses it and fails both sides.
        destinationOwnsGuest = true
        phase("state")
        var pfAfter: UInt64 = 0
        for s in stats { pfAfter += try s.read()["pf_fixed"] }
        report.kvmPfFixedDuringMigration = pfAfter - pfBefore
        if prepared {
            // The stale runtime pages at once (the guest's stack and mailbox: it touches them
            // first), before the residency look-up over the data slot (a millisecond per
            // 512 MiB); then every data page is the post-copy set.
            resident = []
            for p in stale { try sendPage(ch, dataPages + p); report.runtimePagesAfterStop += 1 }
            try flush(ch)
            missing = Array(0..<dataPages)
        }
        if options.mode != .precopy { try refreshResidency() }
        if options.mode == .precopy {
            try ch.send(.end)
            try awaitResumed(ch)
            completedAt = monotonicNanoseconds()
            phase("resumed")
        } else {
            try postcopyPush(ch, missing: missing)
            try checkHashes()
            try ch.send(.done)
            return
        }
        try sendVerify(ch)
        report.bytesSent = ch.bytesSent
        // The destination's summary, after its guest finished.
        while true {
            let (type, payload) = try ch.receive()
            if type == .result { try readResult(payload); break }
            if type == .request || type == .resumed || type == .alive { continue }
            throw KVMError.invalid("migration stream: unexpected \(type) from the destination")
        }
        report.bytesReceived = ch.bytesReceived
        try checkHashes()
        try ch.send(.done)
    }

    /// The source's memory hash (its guest is stopped for good), sent as VERIFY: the
    /// destination refuses a guest whose memory hashes differently.
    mutating func sendVerify(_ ch: MigrationChannel) throws(KVMError) {
        // Hashing a large guest can take longer than the peer's timeout on a loaded host:
        // say ALIVE meanwhile.
        let alive = try Heartbeat(channel: ch, everyNanos: MigrationLink.heartbeat(timeoutNanos: ch.timeoutNanos))
        let h = LiveMigration.memoryHash(g)
        alive.stop()
        report.sourceHash = h
        var w = ByteWriter()
        w.put(h)
        try ch.send(.verify, w.bytes)
    }

    /// A migration whose memory hashes differ failed, whatever else went well.
    func checkHashes() throws(KVMError) {
        guard let s = report.sourceHash, let d = report.destinationHash else {
            throw KVMError.invalid("migration incomplete: no memory hash from \(report.sourceHash == nil ? "this side" : "the destination")")
        }
        guard s == d else {
            throw KVMError.invalid("migration failed: memory hashes differ (source 0x\(String(s, radix: 16)), destination 0x\(String(d, radix: 16))): the destination's guest is not this guest")
        }
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
        let n = try r.getCount(limit: 64, "guest count")
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
        try report.switchTimes.decodeDestination(&r)
    }
}
