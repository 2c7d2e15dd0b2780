import CKVM
import MemVirtCore
import MemVirtGuest
#if canImport(Glibc)
import Glibc
#endif

extension LiveMigration {
    /// Listens on `address:port` (loopback unless told otherwise; port 0: any), calls `ready`
    /// with the bound port, accepts one migration, runs the guest to the end of its workload
    /// and returns the destination's report (it also sends its summary to the source).
    ///
    /// One connection only: the listening socket is closed once it is accepted, so a second
    /// source is refused at once instead of waiting in the backlog; a peer that goes silent is
    /// dropped after `link.timeoutNanos`. A non-loopback address needs a key unless
    /// `insecure` (anyone who reaches the port could otherwise forge or replay a guest).
    public static func listen(address: String = "127.0.0.1", port: UInt16, link: MigrationLink = MigrationLink(), insecure: Bool = false,
                              ready: (UInt16) -> Void) throws(KVMError) -> MigrationReport {
        if link.key == nil && !insecure && !isLoopback(address) {
            throw KVMError.invalid("--bind \(address) is not a loopback address: give --key-file (every message authenticated) or --insecure (anyone who reaches the port can forge or replay a guest)")
        }
        let ch: MigrationChannel
        do {
            let (listener, bound) = try MigrationChannel.listen(address: address, port: port)
            ready(bound)
            ch = try MigrationChannel.accept(listener, timeoutNanos: link.timeoutNanos)
        }  // the listener is closed here
        try ch.authenticate(key: link.key, source: false)
        return try receive(ch)
    }

    /// 127.0.0.0/8, ::1 and localhost.
    static func isLoopback(_ address: String) -> Bool {
        if address == "localhost" || address == "::1" || address == "0:0:0:0:0:0:0:1" { return true }
        let parts = address.split(separator: ".", omittingEmptySubsequences: false)
        return parts.count == 4 && parts[0] == "127" && parts.allSatisfy { UInt8($0) != nil }
    }

    /// The destination's half of the protocol on an accepted connection: HELLO builds the VM,
    /// then pages, DISCARD, SYNC and STATE (the guest resumes) until END; the guest runs to the
    /// end of its workload and the summary goes back as RESULT.
    public static func receive(_ ch: MigrationChannel) throws(KVMError) -> MigrationReport {
        let (t0, p0) = try ch.receive()
        guard t0 == .hello else { throw KVMError.invalid("migration stream: expected HELLO first, got \(t0)") }
        let d = try DestinationSide(hello: try MigrationHello.decode(p0), channel: ch)
        defer { d.release() }
        do {
            try d.receiveStream()
            return try d.finish()
        } catch {
            d.abandon()
            throw error
        }
    }
}

/// The destination's half of the protocol, step by step: built from HELLO, then one method
/// per message kind, then the run to the end and the RESULT.
final class DestinationSide {
    let ch: MigrationChannel
    let hello: MigrationHello
    let mode: MigrationOptions.Mode
    /// The source ran the guest under the guest kernel (KernelMigration).
    let kernelMode: Bool
    let g: GuestVM
    var report: MigrationReport
    let start: UInt64
    let dataPages: Int
    let runtimePages: Int
    /// Per page, the hash of what arrived (the memory hash is their sum).
    var hashes: [UInt64]
    /// Pre-copy: data pages written here (a zero page over one of them must clear it).
    var written: [Bool]
    /// Post-copy and hybrid: the userfaultfd that places pages and asks for missing ones.
    let faults: PostcopyFaults?
    /// Post-copy: the runtime's too (its pages arrive before the stop; STATE names those
    /// written since, dropped here and asked for like data pages).
    let runtimeFaults: PostcopyFaults?
    /// Prepared post-copy (commands on the vCPUs): the vCPU threads, created at SYNC and
    /// waiting at `gate` until STATE is applied.
    var gate: StartGate? = nil
    var prepared: VCPUThreads? = nil
    var pfRead = false
    /// CLOCK_REALTIME when the last byte of STATE was read, and the source's stop time.
    var stateReceivedReal: UInt64 = 0
    var stopReal: UInt64 = 0
    /// Mailboxes in runtime pages dropped at STATE: the switch facts go into the page when it
    /// arrives (keyed by runtime page; the mailbox's offset in it and the source's TSC at the stop).
    var mailboxPatches: [Int: [(offset: Int, tsc: UInt64)]] = [:]
    let patchBuffer: UnsafeMutableRawPointer
    let zero: UnsafeMutableRawPointer
    var gotState = false
    var gotEnd = false
    var runner: VCPUThreads? = nil
    var runStart: UInt64 = 0
    var pfBefore: UInt64 = 0
    var parkedAtSwitch = 0
    let stats: [StatsReader]
    /// Which pages have arrived (a DISCARD takes a page back out): the guest resumes only
    /// with every page it cannot ask for, and END means every page.
    var received: [Bool]
    var receivedCount = 0
    var heartbeat: Heartbeat? = nil

    /// The guest configuration HELLO announces, checked against what this side builds.
    static func config(for hello: MigrationHello) throws(KVMError) -> GuestConfig {
        guard let ps = PageSize.allCases.first(where: { $0.bytes == hello.pageSize }) else {
            throw KVMError.invalid("migration stream mismatched: guest page size \(hello.pageSize)")
        }
        guard hello.vcpus >= 1, hello.vcpus <= UInt32(GuestLayout.maxVCPUs), hello.dataSize <= 1 << 40 else {
            throw KVMError.invalid("migration stream mismatched: \(hello.vcpus) vCPUs, \(hello.dataSize) bytes")
        }
        // Checked before any sum: the runtime lives below the 3 GiB hole, the tables in it.
        guard hello.runtimeSize <= GuestLayout.holePhysical.rawValue, hello.tableBytesPerVCPU <= GuestLayout.holePhysical.rawValue else {
            throw KVMError.invalid("migration stream mismatched: a runtime area of \(hello.runtimeSize) bytes with \(hello.tableBytesPerVCPU) bytes of tables per vCPU (at most \(GuestLayout.holePhysical.rawValue))")
        }
        var c = GuestConfig(dataSize: hello.dataSize)
        c.vcpus = Int(hello.vcpus)
        c.tableBytesPerVCPU = hello.tableBytesPerVCPU
        c.dataPageSize = ps
        if hello.multiboot != 0 { c = try Multiboot.config(memory: hello.runtimeSize + hello.dataSize, vcpus: Int(hello.vcpus)) }
        if hello.kernel & KernelMigration.enabledBit != 0 {
            guard hello.multiboot == 0 else { throw KVMError.invalid("migration stream mismatched: a multiboot guest under the guest kernel") }
            c.irqchip = true
            c.threads = 2 * c.vcpus
        }
        return c
    }

    init(hello: MigrationHello, channel: MigrationChannel) throws(KVMError) {
        ch = channel
        self.hello = hello
        guard Int(hello.mode) < MigrationOptions.Mode.allCases.count else { throw KVMError.invalid("migration stream corrupt: mode \(hello.mode)") }
        mode = MigrationOptions.Mode.allCases[Int(hello.mode)]
        let c = try Self.config(for: hello)
        kernelMode = hello.kernel & KernelMigration.enabledBit != 0
        let kvm = try KVM()
        g = try GuestVM(kvm: kvm, config: c)
        if kernelMode { try g.vm.disableHaltPolling() }
        if let mb = g.multiboot, hello.multibootMailbox != 0 { mb.setMailbox(hello.multibootMailbox) }
        guard g.layout.runtimeSize == hello.runtimeSize else {
            throw KVMError.invalid("migration stream mismatched: the source's runtime area is \(hello.runtimeSize) bytes, this memvirt builds \(g.layout.runtimeSize)")
        }
        report = MigrationReport(side: "destination", mode: mode)
        start = monotonicNanoseconds()
        dataPages = Int(g.data.size / 4096)
        runtimePages = Int(g.runtime.size / 4096)
        report.runtimeArrivals = [UInt32](repeating: 0, count: runtimePages)
        hashes = [UInt64](repeating: 0, count: dataPages + runtimePages)
        received = [Bool](repeating: false, count: dataPages + runtimePages)
        written = [Bool](repeating: false, count: dataPages)
        stats = try g.vcpus.map { (v) throws(KVMError) in try v.stats() }
        faults = mode == .precopy ? nil : try PostcopyFaults(region: g.data, channel: channel)
        runtimeFaults = mode == .postcopy ? try PostcopyFaults(region: g.runtime, channel: channel, indexBase: dataPages) : nil
        patchBuffer = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        zero = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        memset(zero, 0, 4096)
    }

    /// Stops the fault thread and frees the zero page (once, at the end of `receive`).
    func release() {
        heartbeat?.stop()
        // Prepared threads never let run (the stream failed before STATE): end them.
        gate?.cancel()
        if let p = prepared { for t in p.threads { t.join() } }
        prepared = nil
        faults?.stop()
        runtimeFaults?.stop()
        zero.deallocate()
        patchBuffer.deallocate()
    }

    /// A failure after the guest may have resumed: stop saying ALIVE and kick the vCPUs
    /// (not joined: one may wait in a userfaultfd fault for a page that will never come).
    func abandon() {
        heartbeat?.stop()
        heartbeat = nil
        if let k = runner {
            if let kernel = k.kernel { kernel.requestStop() } else { k.kicker.stop() }
        }
    }

    /// The first page not here among `range` (nil: all are).
    func firstMissing(_ range: Range<Int>) -> Int? { range.first { !received[$0] } }

    func markReceived(_ idx: Int, _ yes: Bool) {
        if received[idx] != yes { receivedCount += yes ? 1 : -1; received[idx] = yes }
    }

    /// Where vCPU i's workload keeps its mailbox (a guest thread's under the guest kernel);
    /// nil for a multiboot guest that announced none (nothing of its memory is a mailbox).
    func workloadMailbox(_ i: Int) -> GuestPhysicalAddress? {
        if kernelMode { return KernelMigration.mailboxAddress(g, thread: KernelMigration.workloadThread(i)) }
        if let mb = g.multiboot, mb.mailbox == nil { return nil }
        return g.mailboxAddress(i)
    }

    /// Messages until both STATE and END have arrived.
    func receiveStream() throws(KVMError) {
        while !(gotState && gotEnd) {
            let (type, payload) = try ch.receive()
            switch type {
            case .pages: try applyPages(payload)
            case .discard: try applyDiscard(payload)
            case .state:
                stateReceivedReal = LiveMigration.realtimeNanos()
                try applyState(payload)
            case .sync:
                try prepare()
                try ch.send(.synced)
            case .alive: continue
            case .end:
                guard gotState else { throw KVMError.invalid("migration stream: END before STATE") }
                if let p = firstMissing(0..<(dataPages + runtimePages)) {
                    throw KVMError.invalid("migration stream incomplete: END with \(receivedCount) of \(dataPages + runtimePages) pages (page \(p) never arrived)")
                }
                gotEnd = true
                if mode != .precopy { report.destinationHash = hashes.reduce(0, &+) }
            default:
                throw KVMError.invalid("migration stream: unexpected \(type) from the source")
            }
        }
    }

    /// SYNC: everything before it is applied. Post-copy gets ready for the switch here, while
    /// the source's guest still runs: fault threads up and, for vCPUs running their commands,
    /// the vCPU threads created and waiting (KVM's pf_fixed read now: nothing ran here yet).
    func prepare() throws(KVMError) {
        guard mode != .precopy else { return }
        try faults?.start()
        try runtimeFaults?.start()
        guard mode == .postcopy, !kernelMode, gate == nil else { return }
        if !pfRead { for s in stats { pfBefore += try s.read()["pf_fixed"] }; pfRead = true }
        let gt = StartGate()
        var k = VCPUThreads(g: g, kicker: VCPUKicker(vm: g))
        gate = gt
        do { try k.startGated(gt) } catch {
            gt.cancel()
            for t in k.threads { t.join() }
            throw error
        }
        prepared = k
        gt.awaitWaiting(g.vcpus.count)
        report.preparedVCPUThreads = g.vcpus.count
    }

    /// Kernel mode after STATE named stale runtime pages: the guest kernel's set-up here writes
    /// the runtime, so its pages must be here first (the source pushes them first).
    func awaitRuntimePages() throws(KVMError) {
        while let p = firstMissing(dataPages..<(dataPages + runtimePages)) {
            let (type, payload) = try ch.receive()
            switch type {
            case .pages: try applyPages(payload)
            case .alive: continue
            default: throw KVMError.invalid("migration stream: expected the stale runtime pages after STATE, got \(type) (runtime page \(p - dataPages) missing)")
            }
        }
    }

    /// Offsets of the mailbox fields the switch sets (the guest reads them on its first gap).
    static let gapThresholdOffset = MemoryLayout<memvirt_mailbox>.offset(of: \.gap_threshold)!
    static let switchTSCOffset = MemoryLayout<memvirt_mailbox>.offset(of: \.switch_tsc)!
    static let switchGapOffset = MemoryLayout<memvirt_mailbox>.offset(of: \.switch_gap)!
    static let switchFieldsEnd = max(gapThresholdOffset, switchTSCOffset, switchGapOffset) + 8

    /// The guest keeps the gap that spans the source's TSC at the stop (its downtime): with gap
    /// logging on, the mailbox at `m` gets that TSC and a cleared gap.
    static func patchMailbox(_ m: UnsafeMutableRawPointer, tsc: UInt64) {
        if m.loadUnaligned(fromByteOffset: gapThresholdOffset, as: UInt64.self) != 0 {
            m.storeBytes(of: tsc, toByteOffset: switchTSCOffset, as: UInt64.self)
            m.storeBytes(of: UInt64(0), toByteOffset: switchGapOffset, as: UInt64.self)
        }
    }

    /// PAGES: the table (index, kind), then the data of the pages of kind 1 in order.
    func applyPages(_ payload: UnsafeRawBufferPointer) throws(KVMError) {
        var r = ByteReader(payload, what: "PAGES")
        let n = Int(try r.get(UInt32.self))
        guard n <= PageBatch.maxPages else { throw KVMError.invalid("migration stream corrupt: \(n) pages in one message") }
        var table: [(Int, Bool)] = []
        for _ in 0..<n {
            let idx = try r.get(UInt64.self)
            let kind = try r.get(UInt8.self)
            guard idx < UInt64(dataPages + runtimePages), kind <= 1 else {
                throw KVMError.invalid("migration stream corrupt: page \(idx) kind \(kind) (the guest has \(dataPages + runtimePages) pages)")
            }
            table.append((Int(idx), kind == 1))
        }
        let dataCount = table.filter { $0.1 }.count
        guard r.remaining == dataCount * 4096 else {
            throw KVMError.invalid("migration stream corrupt: PAGES carries \(r.remaining) bytes for \(dataCount) pages")
        }
        var at = r.offset
        for (idx, hasData) in table {
            let src: UnsafeRawPointer = hasData ? payload.baseAddress! + at : UnsafeRawPointer(zero)
            if hasData { at += 4096 }
            hashes[idx] = hasData ? ckvm_page_hash(src, UInt64(idx)) : ckvm_page_hash_zero(UInt64(idx))
            markReceived(idx, true)
            if idx >= dataPages { report.runtimeArrivals[idx - dataPages] &+= 1 }
            if idx >= dataPages, let rf = runtimeFaults {
                if let patches = mailboxPatches.removeValue(forKey: idx - dataPages) {
                    memcpy(patchBuffer, src, 4096)
                    for (off, tsc) in patches { Self.patchMailbox(patchBuffer + off, tsc: tsc) }
                    try rf.place(page: idx - dataPages, from: UnsafeRawPointer(patchBuffer))
                } else {
                    try rf.place(page: idx - dataPages, from: hasData ? src : nil)
                }
            } else if idx >= dataPages {
                memcpy(g.runtime.mapping.base + (idx - dataPages) * 4096, src, 4096)
            } else if let f = faults {
                try f.place(page: idx, from: hasData ? src : nil)
            } else {
                // A zero page over a page never written here: nothing to do (reading
                // it to check would fault it in).
                let dst = g.data.mapping.base + idx * 4096
                if hasData { memcpy(dst, src, 4096); written[idx] = true } else if written[idx] { memset(dst, 0, 4096) }
            }
            report.pagesSent += 1
            if !hasData { report.zeroPages += 1 }
        }
    }

    /// DISCARD (hybrid): data pages whose copy here is stale; the guest's next touch asks.
    func applyDiscard(_ payload: UnsafeRawBufferPointer) throws(KVMError) {
        guard let f = faults else { throw KVMError.invalid("migration stream: DISCARD in a pre-copy stream") }
        var r = ByteReader(payload, what: "DISCARD")
        let n = try r.getCount(limit: min(dataPages, r.remaining / 8), "page count")
        for _ in 0..<n {
            let p = try r.getCount(limit: dataPages - 1, "page index")
            try f.discard(page: p)
            markReceived(p, false)
        }
    }

    /// STATE: the vCPUs, the guest kernel's schedulers and (post-copy) the runtime pages
    /// written since they were sent; no page data. The guest resumes here.
    func applyState(_ payload: UnsafeRawBufferPointer) throws(KVMError) {
        guard !gotState else { throw KVMError.invalid("migration stream: a second STATE") }
        gotState = true
        var r = ByteReader(payload, what: "STATE")
        let stopReal = try r.get(UInt64.self)
        // The source's stop time (CLOCK_REALTIME): the elapsed time scales the TSC below, so
        // a time from outside is bounded first (a day of skew or delay at most).
        let nowReal = LiveMigration.realtimeNanos()
        guard stopReal <= nowReal + 86_400_000_000_000, nowReal < stopReal || nowReal - stopReal <= 86_400_000_000_000 else {
            throw KVMError.invalid("migration stream corrupt: STATE stop time \(stopReal) ns is more than a day from this host's clock (\(nowReal) ns)")
        }
        self.stopReal = stopReal
        func sinceStop(_ t: UInt64) -> UInt64 { t > stopReal ? t - stopReal : 0 }
        report.switchTimes.destinationStateReceived = sinceStop(stateReceivedReal)
        let n = try r.getCount(limit: GuestLayout.maxVCPUs, "vCPU count")
        guard n == g.vcpus.count else { throw KVMError.invalid("migration stream mismatched: \(n) vCPU states for \(g.vcpus.count) vCPUs") }
        // The guest resumes now: the runtime must be whole (it arrived before the stop; pages
        // dropped below come again), and in pre-copy every data page too.
        let needed = mode == .precopy ? 0..<(dataPages + runtimePages) : dataPages..<(dataPages + runtimePages)
        if let p = firstMissing(needed) {
            throw KVMError.invalid("migration stream incomplete: STATE with \(receivedCount) of \(dataPages + runtimePages) pages (page \(p) never arrived); the guest is not resumed")
        }
        var done: [Bool] = []
        var states: [VCPUState] = []
        for _ in 0..<n {
            done.append(try r.get(UInt8.self) != 0)
            states.append(try VCPUState.decode(&r))
        }
        let sched = kernelMode ? try KernelMigration.decode(&r, vcpus: n) : nil
        // Runtime pages written at the source since they were sent (by its guest or its VMM).
        let staleCount = try r.getCount(limit: runtimePages, "stale runtime page count")
        guard staleCount == 0 || runtimeFaults != nil else {
            throw KVMError.invalid("migration stream corrupt: STATE names \(staleCount) stale runtime pages in a \(mode.rawValue) stream (only post-copy sends the runtime before the stop)")
        }
        var stale: [Int] = []
        for _ in 0..<staleCount { stale.append(try r.getCount(limit: runtimePages - 1, "stale runtime page")) }
        guard r.remaining == 0 else { throw KVMError.invalid("migration stream corrupt: STATE has \(r.remaining) bytes after its last field") }
        if let rf = runtimeFaults {
            for p in stale {
                try rf.discard(page: p)
                markReceived(dataPages + p, false)
            }
        }
        // The guest kernel goes on from the source's schedulers; it is made before the
        // vCPU states are restored (its set-up writes MSRs the restore then overrides, and the
        // runtime: its pages must be here).
        var kernel: GuestKernel? = nil
        if let sched {
            if !stale.isEmpty { try awaitRuntimePages() }
            parkedAtSwitch = sched.map(\.parked).reduce(0, +)
            let placeholders = (0..<n).map { _ in GuestVM.command(MEMVIRT_CMD_WORKLOAD) }
            kernel = try GuestKernel(vm: g, threads: KernelMigration.threads(workload: placeholders),
                                     options: KernelMigration.options(vcpus: n, asyncPF: hello.kernel & KernelMigration.asyncPFBit != 0),
                                     resume: sched)
        }
        if mode == .precopy { report.destinationHash = hashes.reduce(0, &+) }
        try faults?.start()
        try runtimeFaults?.start()
        for (i, s) in states.enumerated() {
            try g.vcpus[i].restoreState(s)
            if let tsc = s.msrs.first(where: { $0.0 == 0x10 })?.1 {
                // The guest's TSC goes on from the source's plus the time in between,
                // so the guest itself sees the switch as a gap (its downtime).
                let khz = UInt64(s.tscKHz ?? UInt32(LiveMigration.tscKHz(g)))
                let now = LiveMigration.realtimeNanos()
                let elapsed = now > stopReal ? now - stopReal : 0
                try g.vcpus[i].setMSRs([(0x10, tsc &+ elapsed * khz / 1_000_000)])
            }
        }
        // The guest keeps the gap that spans the source's TSC at the stop: its downtime. A
        // mailbox in a page dropped above gets it when the page comes (before the guest can
        // read it: the page is mapped only then).
        for i in 0..<n where !done[i] {
            guard let at = workloadMailbox(i) else { continue }
            let tsc = states[i].msrs.first(where: { $0.0 == 0x10 })?.1 ?? 0
            let a = Int(at.rawValue)
            if let rf = runtimeFaults, UInt64(a + Self.switchFieldsEnd) <= g.runtime.size, !rf.isPresent(a / 4096) {
                if (a % 4096) + Self.switchFieldsEnd <= 4096 {
                    mailboxPatches[a / 4096, default: []].append((a % 4096, tsc))
                    continue
                }
                try awaitRuntimePages()
            }
            guard let m = g.runtime.pointer(at, length: UInt64(Self.switchFieldsEnd)) else { continue }
            Self.patchMailbox(m, tsc: tsc)
        }
        if !pfRead { for s in stats { pfBefore += try s.read()["pf_fixed"] }; pfRead = true }
        report.switchTimes.destinationVCPUSet = sinceStop(LiveMigration.realtimeNanos())
        if let gt = gate, var k = prepared {
            // Prepared: the threads wait at the gate; they enter KVM_RUN now.
            k.done = done
            runStart = monotonicNanoseconds()
            gt.open(skip: done)
            prepared = nil
            runner = k
        } else {
            var k = VCPUThreads(g: g, kicker: VCPUKicker(vm: g), kernel: kernel)
            k.done = done
            runStart = monotonicNanoseconds()
            let now = LiveMigration.realtimeNanos()
            report.vmmDowntimeNanos = sinceStop(now)
            report.switchTimes.destinationFirstRun = sinceStop(now)
            try k.start()
            runner = k
        }
        try ch.send(.resumed)
        heartbeat = try Heartbeat(channel: ch, everyNanos: MigrationLink.heartbeat(timeoutNanos: ch.timeoutNanos))
    }

    /// After END: the guest runs to the end of its workload; the report, and RESULT to the source.
    func finish() throws(KVMError) -> MigrationReport {
        guard var k = runner else { throw KVMError.invalid("migration stream ended without the vCPU state") }
        // The source's hash of the memory it had: a guest that differs is not the source's.
        var (type, payload) = try ch.receive()
        while type == .alive { (type, payload) = try ch.receive() }
        guard type == .verify else { throw KVMError.invalid("migration stream: expected VERIFY after END, got \(type)") }
        var vr = ByteReader(payload, what: "VERIFY")
        let sourceHash = try vr.get(UInt64.self)
        report.sourceHash = sourceHash
        guard sourceHash == report.destinationHash else {
            throw KVMError.invalid("migration failed: memory hashes differ (source 0x\(String(sourceHash, radix: 16)), destination 0x\(String(report.destinationHash ?? 0, radix: 16))): the guest here is not the source's; stopped")
        }
        if let first = gate?.firstEntry {
            let d = first > stopReal ? first - stopReal : 0
            report.vmmDowntimeNanos = d
            report.switchTimes.destinationFirstRun = d
        }
        try k.join()
        let runEnd = monotonicNanoseconds()
        var pfAfter: UInt64 = 0
        for s in stats { pfAfter += try s.read()["pf_fixed"] }
        report.destinationRunNanos = runEnd - runStart
        report.destinationPfFixed = pfAfter - pfBefore
        if let f = faults { report.pagesRequested = f.requests }
        faults?.stop()
        report.guest = kernelMode ? try KernelMigration.finalGuest(g) : try LiveMigration.finalGuest(g, threads: g.vcpus.count)
        report.guestKernel = try k.kernelReport()
        report.guestKernel?.parkedAtSwitch = parkedAtSwitch
        // The guest's own view of the switch: the gap it logged across the source's TSC at save.
        if let at = workloadMailbox(0) {
            let m = try g.runtime.load(memvirt_mailbox.self, at: at)
            let khz = LiveMigration.tscKHz(g)
            if m.switch_gap > 0 { report.downtimeNanos = m.switch_gap * 1_000_000 / khz }
        }
        report.migrated = true
        report.rounds = 0
        report.bytesReceived = ch.bytesReceived
        report.totalNanos = monotonicNanoseconds() - start
        report.console = g.multiboot?.console
        // ALIVE went on through the final checksum (the guest computes it, seconds for a
        // large guest on a loaded host); RESULT is next.
        heartbeat?.stop()
        heartbeat = nil
        try ch.send(.result, resultPayload())
        // The source's word that it has the RESULT and the hashes agree: without it the
        // outcome is unknown there, and this side does not claim success either.
        var (last, _) = try ch.receive()
        while last == .alive { (last, _) = try ch.receive() }
        guard last == .done else { throw KVMError.invalid("migration stream: expected DONE from the source after RESULT, got \(last)") }
        report.bytesSent = ch.bytesSent
        return report
    }

    /// RESULT: hashes, timings, the guest's counters and the guest kernel's account.
    func resultPayload() -> [UInt8] {
        var w = ByteWriter()
        w.put(report.destinationHash ?? 0)
        w.put(report.downtimeNanos ?? UInt64.max)
        w.put(report.vmmDowntimeNanos ?? 0)
        w.put(report.destinationRunNanos ?? 0)
        w.put(report.destinationPfFixed ?? 0)
        w.put(UInt64(report.guest.count))
        for gr in report.guest {
            w.put(gr.accesses); w.put(gr.reads); w.put(gr.writes); w.put(gr.readSum)
            w.put(gr.memoryChecksum ?? 0); w.put(UInt8(gr.memoryChecksum == nil ? 0 : 1))
        }
        if let k = report.guestKernel {
            w.put(UInt8(1)); w.put(UInt8(k.asyncPF ? 1 : 0)); w.put(UInt32(k.parkedAtSwitch))
            w.put(k.apfNotPresent); w.put(k.apfReady); w.put(k.apfWakeAll); w.put(k.counterIncrements)
            w.put(UInt64(k.counterPerSecond.rounded()))
        } else {
            w.put(UInt8(0))
        }
        report.switchTimes.encodeDestination(into: &w)
        return w.bytes
    }
}
