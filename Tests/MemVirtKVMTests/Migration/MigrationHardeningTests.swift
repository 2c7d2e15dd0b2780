import CKVM
import MemVirtCore
import MemVirtGuest
import Testing
#if canImport(Glibc)
import Glibc
#endif
@testable import MemVirtKVM

/// A destination (`LiveMigration.receive`) on its own thread, fed by the test over a real
/// socket: crafted messages are built with the stream writer (`MigrationChannel.send`), then
/// one field is altered. Each must be refused with an error naming it; the process lives.
final class CraftedStream {
    let box = ResultBox<MigrationReport>()
    let thread: DedicatedThread
    let ch: MigrationChannel

    init(timeoutNanos: UInt64 = 20_000_000_000) throws {
        let (listener, port) = try MigrationChannel.listen(address: "127.0.0.1", port: 0)
        let box = self.box
        thread = try DedicatedThread.start(name: "test-destination") {
            do { box.value = .success(try LiveMigration.receive(try MigrationChannel.accept(listener, timeoutNanos: timeoutNanos))) } catch let e as KVMError {
                box.value = .failure(e)
            } catch {}
        }
        ch = try MigrationChannel.connect(host: "127.0.0.1", port: port)
    }

    /// The destination's error (the stream must have been refused).
    func refusal() -> String {
        thread.join()
        guard case .failure(let e)? = box.value else { Issue.record("the stream was accepted"); return "" }
        return "\(e)"
    }

    /// A 1 MiB guest with one vCPU, as this memvirt lays it out.
    static func hello(mode: UInt8 = 0) throws -> (MigrationHello, pages: Int) {
        let (h, pages, _) = try helloAndState(mode: mode)
        return (h, pages)
    }

    /// The same, with vCPU 0's state as the runtime sets it up (a state KVM accepts).
    static func helloAndState(mode: UInt8 = 0) throws -> (MigrationHello, pages: Int, VCPUState) {
        let g = try GuestVM(kvm: try KVM(), config: GuestConfig(dataSize: 1 << 20))
        let h = MigrationHello(dataSize: 1 << 20, vcpus: 1, tableBytesPerVCPU: 0, runtimeSize: g.layout.runtimeSize, mode: mode, pageSize: 4096)
        return (h, Int((g.layout.dataSize + g.layout.runtimeSize) / 4096), try g.vcpus[0].saveState())
    }

    /// Every page, as zero pages (kind 0: no data), 256 to a message.
    func sendZeroPages(_ total: Int) throws {
        var i = 0
        while i < total {
            let n = min(PageBatch.maxPages, total - i)
            var w = ByteWriter()
            w.put(UInt32(n))
            for k in 0..<n { w.put(UInt64(i + k)); w.put(UInt8(0)) }
            try ch.send(.pages, w.bytes)
            i += n
        }
    }

    /// A STATE message for one vCPU: `state`'s encoding, then `alter` applied to its bytes,
    /// then the stale runtime pages (version 4; none unless given).
    static func state(_ s: VCPUState, stale: [UInt64] = [], alter: (inout [UInt8]) -> Void = { _ in }) -> [UInt8] {
        var b = s.encoded()
        alter(&b)
        var w = ByteWriter()
        w.put(LiveMigration.realtimeNanos())  // stop time
        w.put(UInt64(1))  // vCPUs
        w.put(UInt8(0))  // not done
        var tail = ByteWriter()
        tail.put(UInt64(stale.count))
        for p in stale { tail.put(p) }
        return w.bytes + b + tail.bytes
    }
}

extension Array where Element == UInt8 {
    mutating func store<T: BitwiseCopyable>(_ v: T, at offset: Int) {
        let bytes = Swift.withUnsafeBytes(of: v) { Array($0) }
        for (i, b) in bytes.enumerated() { self[offset + i] = b }
    }
}

/// Byte offsets in `VCPUState.encoded()` (raw structs, then length-prefixed fields).
enum StateOffsets {
    static let xsaveLength = MemoryLayout<kvm_regs>.size + MemoryLayout<kvm_sregs>.size + MemoryLayout<kvm_fpu>.size
    static func msrCount(xsave: Int) -> Int { xsaveLength + 8 + xsave + 1 + MemoryLayout<kvm_xcrs>.size }
}

@Suite("KVM engine: migration stream hardening", .serialized, .enabled(if: KVM.isUsable, Comment(rawValue: kvmReason)))
struct MigrationHardeningTests {
    // MARK: defect 1 and 2: numbers and lengths from the stream

    @Test("HELLO with per-vCPU tables of 2^64-1 bytes is refused, not trapped")
    func helloTables() throws {
        let c = try CraftedStream()
        var (h, _) = try CraftedStream.hello()
        h.tableBytesPerVCPU = .max
        try c.ch.send(.hello, h.encoded())
        let e = c.refusal()
        #expect(e.contains("tables per vCPU") || e.contains("lookup tables"), "\(e)")
    }

    @Test("GuestVM refuses per-vCPU tables and data sizes that would overflow its layout sums")
    func guestLayoutBounds() throws {
        var c = GuestConfig(dataSize: 1 << 20)
        c.tableBytesPerVCPU = .max - 100
        #expect(throws: KVMError.self) { _ = try GuestVM(kvm: try KVM(), config: c) }
        var d = GuestConfig(dataSize: .max - 4095)
        d.dataPageSize = .size4K
        #expect(throws: KVMError.self) { _ = try GuestVM(kvm: try KVM(), config: d) }
    }

    @Test("a multiboot HELLO whose runtime plus data sizes overflow is refused")
    func helloMultibootSum() throws {
        let c = try CraftedStream()
        var (h, _) = try CraftedStream.hello()
        h.multiboot = 1
        h.runtimeSize = .max - 100
        try c.ch.send(.hello, h.encoded())
        let e = c.refusal()
        #expect(e.contains("runtime area"), "\(e)")
    }

    @Test("DISCARD with a count or a page index of 2^64-1 is refused", arguments: ["count", "index"])
    func discard(field: String) throws {
        let c = try CraftedStream()
        let (h, _) = try CraftedStream.hello(mode: 1)  // post-copy: DISCARD is legal
        try c.ch.send(.hello, h.encoded())
        var w = ByteWriter()
        w.put(UInt64(1)); w.put(UInt64(3))
        var b = w.bytes
        if field == "count" { b.store(UInt64.max, at: 0) } else { b.store(UInt64.max, at: 8) }
        try c.ch.send(.discard, b)
        let e = c.refusal()
        #expect(e.contains("DISCARD") && e.contains(field == "count" ? "page count 18446744073709551615" : "page index 18446744073709551615"), "\(e)")
    }

    @Test("STATE with a stop time decades off (the TSC scaling would overflow) is refused")
    func stateStopTime() throws {
        let c = try CraftedStream()
        let (h, pages) = try CraftedStream.hello()
        try c.ch.send(.hello, h.encoded())
        try c.sendZeroPages(pages)
        var b = CraftedStream.state(VCPUState())
        b.store(UInt64(0), at: 0)
        try c.ch.send(.state, b)
        let e = c.refusal()
        #expect(e.contains("stop time 0 ns"), "\(e)")
    }

    @Test("STATE with a vCPU count of 2^64-1 is refused")
    func stateCount() throws {
        let c = try CraftedStream()
        let (h, pages) = try CraftedStream.hello()
        try c.ch.send(.hello, h.encoded())
        try c.sendZeroPages(pages)
        var b = CraftedStream.state(VCPUState())
        b.store(UInt64.max, at: 8)
        try c.ch.send(.state, b)
        let e = c.refusal()
        #expect(e.contains("vCPU count 18446744073709551615"), "\(e)")
    }

    @Test("STATE with an MSR count, an XSAVE length or a LAPIC length out of bounds, or a short XSAVE area, is refused",
          arguments: ["msrs", "xsave-length", "xsave-short", "lapic-length"])
    func stateFields(field: String) throws {
        let c = try CraftedStream()
        let (h, pages) = try CraftedStream.hello()
        try c.ch.send(.hello, h.encoded())
        try c.sendZeroPages(pages)
        var s = VCPUState()
        s.xsave = [UInt8](repeating: 0, count: field == "xsave-short" ? 100 : 4096)
        let b = CraftedStream.state(s) { b in
            switch field {
            case "msrs": b.store(UInt64.max, at: StateOffsets.msrCount(xsave: 4096))
            case "xsave-length": b.store(UInt64.max - 7, at: StateOffsets.xsaveLength)
            case "lapic-length":
                // Right after the (empty) MSR list: the LAPIC flag, then its length.
                b.store(UInt8(1), at: StateOffsets.msrCount(xsave: 4096) + 8)
                b.store(UInt64(10), at: StateOffsets.msrCount(xsave: 4096) + 9)
            default: break
            }
        }
        try c.ch.send(.state, b)
        let e = c.refusal()
        switch field {
        case "msrs": #expect(e.contains("MSR count 18446744073709551615"), "\(e)")
        case "xsave-length": #expect(e.contains("XSAVE area of 18446744073709551608 bytes claimed"), "\(e)")
        case "xsave-short": #expect(e.contains("XSAVE area of 100 bytes"), "\(e)")
        default: #expect(e.contains("LAPIC"), "\(e)")
        }
    }

    @Test("the shared decoders refuse the same crafted bytes directly (the snapshot reader uses them)")
    func decoders() throws {
        var s = VCPUState()
        s.xsave = [UInt8](repeating: 0, count: 64)
        let short = s.encoded()
        #expect(throws: KVMError.self) { try short.withUnsafeBytes { b in var r = ByteReader(b, what: "test"); _ = try VCPUState.decode(&r) } }
        var w = ByteWriter()
        w.put(UInt64.max)
        let huge = w.bytes
        #expect(throws: KVMError.self) { try huge.withUnsafeBytes { b in var r = ByteReader(b, what: "test"); _ = try r.getBytes() } }
        #expect(throws: KVMError.self) { try huge.withUnsafeBytes { b in var r = ByteReader(b, what: "test"); _ = try r.getCount(limit: 10, "n") } }
    }

    // MARK: defect 5: a stream without the whole memory

    @Test("HELLO, STATE and END with no pages: refused before the guest resumes")
    func noPages() throws {
        let c = try CraftedStream()
        let (h, pages) = try CraftedStream.hello()
        try c.ch.send(.hello, h.encoded())
        try c.ch.send(.state, CraftedStream.state(VCPUState()))
        try? c.ch.send(.end)
        let e = c.refusal()
        #expect(e.contains("incomplete") && e.contains("0 of \(pages) pages"), "\(e)")
    }

    @Test("post-copy END with a page missing is refused")
    func postcopyMissing() throws {
        let c = try CraftedStream()
        let (h, pages, st) = try CraftedStream.helloAndState(mode: 1)
        try c.ch.send(.hello, h.encoded())
        // Every page, then page 7 taken back (DISCARD), the vCPU, END.
        try c.sendZeroPages(pages)
        var w = ByteWriter()
        w.put(UInt64(1)); w.put(UInt64(7))
        try c.ch.send(.discard, w.bytes)
        try c.ch.send(.state, CraftedStream.state(st))
        try? c.ch.send(.end)
        let e = c.refusal()
        #expect(e.contains("incomplete: END") && e.contains("page 7 never arrived"), "\(e)")
    }
}
