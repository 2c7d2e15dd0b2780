import CKVM
import MemVirtCore
import MemVirtGuest
import Testing
#if canImport(Glibc)
import Glibc
#endif
@testable import MemVirtKVM

/// Post-copy with a destination prepared before the stop (issue 14, item 3): the runtime goes
/// while the guest runs, the destination's vCPU threads wait; the stop sends STATE only.
@Suite("KVM engine: prepared post-copy", .serialized, .enabled(if: KVM.isUsable, Comment(rawValue: kvmReason)))
struct PreparedPostcopyTests {
    /// A paced writer over 16 MiB (8,000 accesses/s, 60% writes): running at the switch.
    static let writer = WorkloadSpec(pattern: .uniform, footprint: .mib(16), accesses: 16_000, writeRatio: 0.6, seed: 31)

    static func options() -> MigrationOptions {
        var o = MigrationOptions()
        o.mode = .postcopy
        o.afterNanos = 300_000_000
        o.accessesPerSecond = 8_000
        return o
    }

    @Test("the stop sends STATE and nothing else (no page data); the runtime went before it; the result equals the oracle")
    func stopCarriesNoPages() throws {
        let (s, d) = try LiveMigration.loopback(Self.writer, options: Self.options())
        print("prepared post-copy: \(s.json.rendered())")
        #expect(s.migrated && s.error == nil, "\(s.error ?? "")")
        #expect(s.sourceHash != nil && s.sourceHash == s.destinationHash)
        let want = try oracle(Self.writer)
        #expect(s.guest.first?.readSum == want.readSum)
        #expect(s.guest.first?.memoryChecksum == want.checksum)
        #expect(s.guest.first?.accesses == Self.writer.accesses)
        // Bytes per phase: from the stop to the end of STATE the source wrote exactly one
        // message (a 32-byte header and STATE's payload) and no page.
        let t = s.switchTimes
        #expect(t.pagesStopToState == 0)
        #expect(t.stateBytes != nil && t.bytesStopToState == UInt64(MigrationStreamFormat.headerSize) + (t.stateBytes ?? 0))
        // STATE is vCPU state (a few KiB of registers, XSAVE, MSRs) and the stale list: far
        // less than one runtime page per vCPU's worth of the runtime it used to carry.
        #expect((t.stateBytes ?? .max) < 64 << 10)
        // The whole runtime went before the stop (the source's phase) and every page written
        // since came again after STATE, each once.
        #expect(s.phases.contains { $0.0 == "prepare_runtime" })
        #expect(!s.phases.contains { $0.0 == "final_send" })
        #expect(s.runtimePagesAfterStop == s.runtimePagesStale)
        // The destination had its vCPU thread waiting before the stop; its switch ran in order.
        #expect(d.preparedVCPUThreads == 1)
        if let r = d.switchTimes.destinationStateReceived, let v = d.switchTimes.destinationVCPUSet, let f = d.switchTimes.destinationFirstRun {
            #expect(r <= v && v <= f)
            #expect(s.vmmDowntimeNanos == f)
        } else {
            Issue.record("destination switch times missing: \(d.switchTimes)")
        }
        // Page counts: every data page went exactly once (asked or pushed).
        #expect(s.pagesRequested + s.pagesPushed == UInt64(Self.writer.footprint.rawValue / 4096))
    }

    @Test("runtime pages the source VMM writes: one written before the runtime went arrives once; one rewritten after it arrives again; hashes agree")
    func vmmWritesTracked() throws {
        var o = Self.options()
        // Two runtime pages no guest code uses: the last two of the runtime (rounded up to
        // 2 MiB past the guest's own areas; checked against the layout below).
        var pc = GuestConfig(dataSize: Self.writer.footprint.rawValue)
        pc.dataVirtual = Self.writer.base
        pc.tableBytesPerVCPU = KVMRunner.tableBytes(Self.writer)
        let probe = try GuestVM(kvm: try KVM(), config: pc)
        let pages = Int(probe.runtime.size / 4096)
        let used = probe.layout.threadBlocks + UInt64(probe.layout.threadCapacity) * GuestLayout.threadBlockSize + 4096
        try #require(used <= UInt64(pages - 2) * 4096, "the runtime has no spare pages to write (\(used) bytes used of \(probe.runtime.size))")
        let once = pages - 2, twice = pages - 1
        let valueA: UInt64 = 0xA11C_E000_0000_0001, valueB1: UInt64 = 0xB0B0_0000_0000_0001, valueB2: UInt64 = 0xB0B0_0000_0000_0002
        o.sourceHook = { g, phase in
            if phase == "hello" {
                try? g.runtime.store(valueA, at: GuestPhysicalAddress(rawValue: UInt64(once) * 4096 + 8))
                try? g.runtime.store(valueB1, at: GuestPhysicalAddress(rawValue: UInt64(twice) * 4096 + 16))
            } else if phase == "prepared" {
                // After the runtime went: only the VMM's own log can know (KVM's does not).
                try? g.runtime.store(valueB2, at: GuestPhysicalAddress(rawValue: UInt64(twice) * 4096 + 16))
            }
        }
        let (s, d) = try LiveMigration.loopback(Self.writer, options: o)
        #expect(s.migrated && s.error == nil, "\(s.error ?? "")")
        // The hashes cover every page as each side has it: B's second value must be there.
        #expect(s.sourceHash != nil && s.sourceHash == s.destinationHash)
        try #require(d.runtimeArrivals.count == pages)
        #expect(d.runtimeArrivals[once] == 1)
        #expect(d.runtimeArrivals[twice] == 2)
        #expect(s.runtimePagesStale >= 1 && s.runtimePagesAfterStop == s.runtimePagesStale)
        let want = try oracle(Self.writer)
        #expect(s.guest.first?.readSum == want.readSum)
    }

    @Test("a destination that gets SYNC (threads prepared) but never STATE ends its waiting vCPU threads and reports the cut")
    func preparedThenCut() throws {
        let c = try CraftedStream(timeoutNanos: 5_000_000_000)
        let (h, pages) = try CraftedStream.hello(mode: 1)  // post-copy
        try c.ch.send(.hello, h.encoded())
        try c.sendZeroPages(pages)
        try c.ch.send(.sync)
        let (type, _) = try c.ch.receive()
        #expect(type == .synced)
        c.ch.shutdownBoth()
        let e = c.refusal()
        #expect(e.contains("truncated"), "\(e)")
    }

    @Test("STATE naming a stale runtime page past the runtime is refused")
    func staleOutOfRange() throws {
        let c = try CraftedStream()
        let (h, pages, st) = try CraftedStream.helloAndState(mode: 1)
        try c.ch.send(.hello, h.encoded())
        try c.sendZeroPages(pages)
        try c.ch.send(.state, CraftedStream.state(st, stale: [UInt64(pages)]))
        let e = c.refusal()
        #expect(e.contains("stale runtime page"), "\(e)")
    }

    @Test("STATE naming stale runtime pages in a pre-copy stream is refused")
    func staleInPrecopy() throws {
        let c = try CraftedStream()
        let (h, pages, st) = try CraftedStream.helloAndState(mode: 0)
        try c.ch.send(.hello, h.encoded())
        try c.sendZeroPages(pages)
        try c.ch.send(.state, CraftedStream.state(st, stale: [0]))
        let e = c.refusal()
        #expect(e.contains("stale runtime pages in a precopy stream"), "\(e)")
    }

    @Test("a touch of a page not here becomes one REQUEST naming it by its stream index; placing the page wakes the toucher with its data")
    func faultBecomesRequest() throws {
        let (listener, port) = try MigrationChannel.listen(address: "127.0.0.1", port: 0)
        let source = try MigrationChannel.connect(host: "127.0.0.1", port: port)
        let destination = try MigrationChannel.accept(listener)
        let region = try GuestMemoryRegion(guestPhysical: GuestPhysicalAddress(rawValue: 0), size: 16 * 4096)
        let f = try PostcopyFaults(region: region, channel: destination, indexBase: 100)
        try f.start()
        defer { f.stop() }
        let box = ResultBox<UInt64>()
        let at = UInt(bitPattern: region.mapping.base) + 5 * 4096 + 24
        let toucher = try DedicatedThread.start(name: "test-toucher") {
            box.value = .success(UnsafeRawPointer(bitPattern: at)!.load(as: UInt64.self))
        }
        let (type, payload) = try source.receive()
        #expect(type == .request)
        var r = ByteReader(payload, what: "REQUEST")
        #expect(try r.get(UInt64.self) == 105)
        #expect(r.remaining == 0)
        #expect(!f.isPresent(5))
        let page = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { page.deallocate() }
        memset(page, 0, 4096)
        page.storeBytes(of: UInt64(0x5EED_0000_0000_0105), toByteOffset: 24, as: UInt64.self)
        try f.place(page: 5, from: UnsafeRawPointer(page))
        toucher.join()
        #expect(try box.value?.get() == 0x5EED_0000_0000_0105)
        #expect(f.isPresent(5) && f.requests == 1)
        source.shutdownBoth()
    }
}
