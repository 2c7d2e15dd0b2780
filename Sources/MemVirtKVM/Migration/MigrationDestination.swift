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
    public static func listen(address: String = "127.0.0.1", port: UInt16, ready: (UInt16) -> Void) throws(KVMError) -> MigrationReport {
        let (listener, bound) = try MigrationChannel.listen(address: address, port: port)
        ready(bound)
        let ch = try MigrationChannel.accept(listener)
        return try receive(ch)
    }

    /// The destination's half of the protocol on an accepted connection.
    public static func receive(_ ch: MigrationChannel) throws(KVMError) -> MigrationReport {
        let (t0, p0) = try ch.receive()
        guard t0 == .hello else { throw KVMError.invalid("migration stream: expected HELLO first, got \(t0)") }
        let hello = try MigrationHello.decode(p0)
        guard Int(hello.mode) < MigrationOptions.Mode.allCases.count else { throw KVMError.invalid("migration stream corrupt: mode \(hello.mode)") }
        let mode = MigrationOptions.Mode.allCases[Int(hello.mode)]
        guard let ps = PageSize.allCases.first(where: { $0.bytes == hello.pageSize }) else {
            throw KVMError.invalid("migration stream mismatched: guest page size \(hello.pageSize)")
        }
        guard hello.vcpus >= 1, hello.vcpus <= UInt32(GuestLayout.maxVCPUs), hello.dataSize <= 1 << 40 else {
            throw KVMError.invalid("migration stream mismatched: \(hello.vcpus) vCPUs, \(hello.dataSize) bytes")
        }
        var c = GuestConfig(dataSize: hello.dataSize)
        c.vcpus = Int(hello.vcpus)
        c.tableBytesPerVCPU = hello.tableBytesPerVCPU
        c.dataPageSize = ps
        if hello.multiboot != 0 { c = try Multiboot.config(memory: hello.runtimeSize + hello.dataSize) }
        let kernelMode = hello.kernel & KernelMigration.enabledBit != 0
        if kernelMode {
            guard hello.multiboot == 0 else { throw KVMError.invalid("migration stream mismatched: a multiboot guest under the guest kernel") }
            c.irqchip = true
            c.threads = 2 * c.vcpus
        }
        let kvm = try KVM()
        let g = try GuestVM(kvm: kvm, config: c)
        if kernelMode { try g.vm.disableHaltPolling() }
        /// Where vCPU i's workload keeps its mailbox (a guest thread's under the guest kernel);
        /// nil for a multiboot guest that announced none (nothing of its memory is a mailbox).
        func workloadMailbox(_ i: Int) -> GuestPhysicalAddress? {
            if kernelMode { return KernelMigration.mailboxAddress(g, thread: KernelMigration.workloadThread(i)) }
            if let mb = g.multiboot, mb.mailbox == nil { return nil }
            return g.mailboxAddress(i)
        }
        var parkedAtSwitch = 0
        if let mb = g.multiboot, hello.multibootMailbox != 0 { mb.setMailbox(hello.multibootMailbox) }
        guard g.layout.runtimeSize == hello.runtimeSize else {
            throw KVMError.invalid("migration stream mismatched: the source's runtime area is \(hello.runtimeSize) bytes, this memvirt builds \(g.layout.runtimeSize)")
        }
        var report = MigrationReport(side: "destination", mode: mode)
        let start = monotonicNanoseconds()
        let dataPages = Int(g.data.size / 4096)
        let runtimePages = Int(g.runtime.size / 4096)
        var hashes = [UInt64](repeating: 0, count: dataPages + runtimePages)
        var written = [Bool](repeating: false, count: dataPages)
        let faults: PostcopyFaults? = mode == .precopy ? nil : try PostcopyFaults(region: g.data, channel: ch)
        defer { faults?.stop() }
        let zero = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { zero.deallocate() }
        memset(zero, 0, 4096)
        var gotState = false, gotEnd = false
        var runner: VCPUThreads? = nil
        var savedTSC: UInt64 = 0
        var runStart: UInt64 = 0
        var pfBefore: UInt64 = 0
        let stats = try g.vcpus.map { (v) throws(KVMError) in try v.stats() }
        while !(gotState && gotEnd) {
            let (type, payload) = try ch.receive()
            switch type {
            case .pages:
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
                    if idx >= dataPages {
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
            case .discard:
                guard let f = faults else { throw KVMError.invalid("migration stream: DISCARD in a pre-copy stream") }
                var r = ByteReader(payload, what: "DISCARD")
                let n = Int(try r.get(UInt64.self))
                guard n <= dataPages else { throw KVMError.invalid("migration stream corrupt: DISCARD of \(n) pages") }
                for _ in 0..<n {
                    let p = Int(try r.get(UInt64.self))
                    guard p < dataPages else { throw KVMError.invalid("migration stream corrupt: DISCARD page \(p)") }
                    try f.discard(page: p)
                }
            case .state:
                guard !gotState else { throw KVMError.invalid("migration stream: a second STATE") }
                gotState = true
                var r = ByteReader(payload, what: "STATE")
                let stopReal = try r.get(UInt64.self)
                let n = Int(try r.get(UInt64.self))
                guard n == g.vcpus.count else { throw KVMError.invalid("migration stream mismatched: \(n) vCPU states for \(g.vcpus.count) vCPUs") }
                var done: [Bool] = []
                var states: [VCPUState] = []
                for _ in 0..<n {
                    done.append(try r.get(UInt8.self) != 0)
                    states.append(try VCPUState.decode(&r))
                }
                // The guest kernel goes on from the source's schedulers; it is made before the
                // vCPU states are restored (its set-up writes MSRs the restore then overrides).
                var kernel: GuestKernel? = nil
                if kernelMode {
                    let sched = try KernelMigration.decode(&r, vcpus: n)
                    parkedAtSwitch = sched.map(\.parked).reduce(0, +)
                    let placeholders = (0..<n).map { _ in GuestVM.command(MEMVIRT_CMD_WORKLOAD) }
                    kernel = try GuestKernel(vm: g, threads: KernelMigration.threads(workload: placeholders),
                                             options: KernelMigration.options(vcpus: n, asyncPF: hello.kernel & KernelMigration.asyncPFBit != 0),
                                             resume: sched)
                }
                var k = VCPUThreads(g: g, kicker: VCPUKicker(vm: g), kernel: kernel)
                k.done = done
                if mode == .precopy { report.destinationHash = hashes.reduce(0, &+) }
                faults?.start()
                for (i, s) in states.enumerated() {
                    try g.vcpus[i].restoreState(s)
                    if let tsc = s.msrs.first(where: { $0.0 == 0x10 })?.1 {
                        if i == 0 { savedTSC = tsc }
                        // The guest's TSC goes on from the source's plus the time in between,
                        // so the guest itself sees the switch as a gap (its downtime).
                        let khz = UInt64(s.tscKHz ?? UInt32(tscKHz(g)))
                        let now = realtimeNanos()
                        let elapsed = now > stopReal ? now - stopReal : 0
                        try g.vcpus[i].setMSRs([(0x10, tsc &+ elapsed * khz / 1_000_000)])
                    }
                }
                // The guest keeps the gap that spans the source's TSC at the stop: its downtime.
                for i in 0..<n where !k.done[i] {
                    guard let at = workloadMailbox(i) else { continue }
                    var m = try g.runtime.load(memvirt_mailbox.self, at: at)
                    if m.gap_threshold != 0 {
                        m.switch_tsc = states[i].msrs.first(where: { $0.0 == 0x10 })?.1 ?? 0
                        m.switch_gap = 0
                        try g.runtime.store(m, at: at)
                    }
                }
                for s in stats { pfBefore += try s.read()["pf_fixed"] }
                runStart = monotonicNanoseconds()
                let now = realtimeNanos()
                report.vmmDowntimeNanos = now > stopReal ? now - stopReal : 0
                try k.start()
                runner = k
                try ch.send(.resumed)
            case .sync:
                try ch.send(.synced)
            case .end:
                gotEnd = true
                if mode != .precopy { report.destinationHash = hashes.reduce(0, &+) }
            default:
                throw KVMError.invalid("migration stream: unexpected \(type) from the source")
            }
        }
        guard var k = runner else { throw KVMError.invalid("migration stream ended without the vCPU state") }
        try k.join()
        let runEnd = monotonicNanoseconds()
        var pfAfter: UInt64 = 0
        for s in stats { pfAfter += try s.read()["pf_fixed"] }
        report.destinationRunNanos = runEnd - runStart
        report.destinationPfFixed = pfAfter - pfBefore
        if let f = faults { report.pagesRequested = f.requests }
        faults?.stop()
        report.guest = kernelMode ? try KernelMigration.finalGuest(g) : try finalGuest(g, threads: g.vcpus.count)
        report.guestKernel = try k.kernelReport()
        report.guestKernel?.parkedAtSwitch = parkedAtSwitch
        // The guest's own view of the switch: the gap it logged across the source's TSC at save.
        if let at = workloadMailbox(0) {
            let m = try g.runtime.load(memvirt_mailbox.self, at: at)
            let khz = tscKHz(g)
            if m.switch_gap > 0 { report.downtimeNanos = m.switch_gap * 1_000_000 / khz }
        }
        report.migrated = true
        report.rounds = 0
        report.bytesReceived = ch.bytesReceived
        report.totalNanos = monotonicNanoseconds() - start
        report.console = g.multiboot?.console
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
        try ch.send(.result, w.bytes)
        report.bytesSent = ch.bytesSent
        return report
    }
}

/// The destination's userfaultfd in post-copy: pages arrive with UFFDIO_COPY (which wakes a
/// guest waiting on them); a guest fault on a page not here yet becomes a REQUEST to the source
/// (once per page). Race: a page can arrive between the fault and our look at `present`; then
/// UFFDIO_WAKE is enough (the copy already woke the waiter, or it re-faults and finds the page).
final class PostcopyFaults: @unchecked Sendable {
    let region: GuestMemoryRegion
    let channel: MigrationChannel
    let uffd: FileDescriptor
    let stopRead: FileDescriptor
    let stopWrite: FileDescriptor
    let present: UnsafeMutablePointer<UInt32>
    let pages: Int
    var requested: [Bool]
    var requests: UInt64 = 0
    var thread: DedicatedThread?

    init(region: GuestMemoryRegion, channel: MigrationChannel) throws(KVMError) {
        self.region = region
        self.channel = channel
        pages = Int(region.size / 4096)
        uffd = try userfaultfdForMissing(region, purpose: "post-copy")
        (stopRead, stopWrite) = try stopPipe()
        present = .allocate(capacity: pages)
        present.initialize(repeating: 0, count: pages)
        requested = [Bool](repeating: false, count: pages)
    }
    deinit { stop(); present.deallocate() }

    /// Maps a received page (before or after the guest resumed); nil: a zero page, mapped
    /// with UFFDIO_ZEROPAGE (no page allocated until the guest writes it).
    func place(page p: Int, from src: UnsafeRawPointer?) throws(KVMError) {
        let dst = region.hostAddress.rawValue + UInt64(p) * 4096
        var rc: Int32
        if let src {
            var c = uffdio_copy(dst: dst, src: UInt64(UInt(bitPattern: src)), len: 4096, mode: 0, copy: 0)
            rc = ckvm_uffdio_copy(uffd.raw, &c)
            while rc == -EAGAIN { c.copy = 0; rc = ckvm_uffdio_copy(uffd.raw, &c) }
        } else {
            var z = uffdio_zeropage(range: uffdio_range(start: dst, len: 4096), mode: 0, zeropage: 0)
            rc = ckvm_uffdio_zeropage(uffd.raw, &z)
            while rc == -EAGAIN { z.zeropage = 0; rc = ckvm_uffdio_zeropage(uffd.raw, &z) }
        }
        if rc == -EEXIST {
            // Already mapped: a newer copy of a page sent in an earlier pre-copy round.
            if let src { memcpy(region.mapping.base + p * 4096, src, 4096) } else { memset(region.mapping.base + p * 4096, 0, 4096) }
        } else if rc < 0 {
            _ = try checked(rc, "UFFDIO_COPY/ZEROPAGE(post-copy page \(p))")
        }
        ckvm_store_release_u32(present + p, 1)
    }

    /// Drops a stale page (hybrid): the guest's next touch faults and asks the source.
    func discard(page p: Int) throws(KVMError) {
        if madvise(region.mapping.base + p * 4096, 4096, MADV_DONTNEED) != 0 { throw KVMError.call("madvise(MADV_DONTNEED, page \(p))", lastErrno()) }
        ckvm_store_release_u32(present + p, 0)
    }

    func start() {
        guard thread == nil else { return }
        thread = try? DedicatedThread.start(name: "memvirt-postcopy-faults") { [self] in loop() }
    }

    func stop() {
        guard let t = thread else { return }
        var one: UInt8 = 1
        _ = write(stopWrite.raw, &one, 1)
        t.join()
        thread = nil
    }

    private func loop() {
        var fds = [pollfd(fd: uffd.raw, events: Int16(POLLIN), revents: 0), pollfd(fd: stopRead.raw, events: Int16(POLLIN), revents: 0)]
        var msgs = [UInt8](repeating: 0, count: 32 * 64)
        let base = region.hostAddress.rawValue
        while true {
            let n = poll(&fds, 2, -1)
            if n < 0 { if errno == EINTR { continue }; return }
            if fds[1].revents != 0 { return }
            let got = msgs.withUnsafeMutableBytes { read(uffd.raw, $0.baseAddress, $0.count) }
            if got <= 0 { continue }
            var ask = ByteWriter()
            var asked = 0
            for i in 0..<(got / 32) {
                let (event, address) = msgs.withUnsafeBytes { b in (b[i * 32], b.loadUnaligned(fromByteOffset: i * 32 + 16, as: UInt64.self)) }
                guard event == UInt8(UFFD_EVENT_PAGEFAULT), address >= base, address - base < region.size else { continue }
                let p = Int((address - base) / 4096)
                if ckvm_load_acquire_u32(present + p) != 0 {
                    var range = uffdio_range(start: base + UInt64(p) * 4096, len: 4096)
                    _ = ckvm_uffdio_wake(uffd.raw, &range)
                } else if !requested[p] {
                    requested[p] = true
                    ask.put(UInt64(p))
                    asked += 1
                }
            }
            if asked > 0 {
                requests += UInt64(asked)
                do { try channel.send(.request, ask.bytes) } catch { return }
            }
        }
    }
}
