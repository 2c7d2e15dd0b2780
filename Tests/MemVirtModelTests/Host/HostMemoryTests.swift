import Testing
import MemVirtCore
@testable import MemVirtModel

/// A mapping owner with its own A/D bits, standing in for EPT or shadow tables.
final class FakeMappingOwner: HostMappingOwner {
    var mapped: [UInt64: (accessed: Bool, dirty: Bool)] = [:]
    var zaps = 0
    func zap(gfn: UInt64) -> Bool {
        zaps += 1
        let d = mapped[gfn]?.dirty ?? false
        mapped[gfn] = nil
        return d
    }
    func accessedAndClear(gfn: UInt64) -> Bool {
        guard let m = mapped[gfn] else { return false }
        mapped[gfn] = (false, m.dirty)
        return m.accessed
    }
}

/// The oracle: FNV-1a-style over 512 words, zero except the words written (independent of
/// where the host keeps the page).
func expectedPageHash(_ words: [Int: UInt64]) -> UInt64 {
    var h: UInt64 = 0xCBF2_9CE4_8422_2325
    for i in 0..<512 { h = (h ^ (words[i] ?? 0)) &* 0x0000_0100_0000_01B3 }
    return h
}

/// Drives a HostMemory as a hypervisor would: fault, map, write through the mapping.
struct HostDriver {
    let host: HostMemory
    let owner = FakeMappingOwner()
    let index: Int
    var now: Double = 0
    init(limitPages: UInt64?, device: SwapDeviceModel = .hdd) throws {
        host = try HostMemory(capacity: 64 << 20, limit: limitPages.map { ByteCount($0 * 4096) }, swapDevice: device, swapSlots: 4096)
        index = host.register(owner, guestFrames: 4096)
    }
    /// Makes `gfn` mapped (waiting for I/O by moving the clock); returns its host frame.
    mutating func touch(_ gfn: UInt64, write: Bool) -> UInt64 {
        while true {
            if let m = owner.mapped[gfn], let hpa = frames[gfn] {
                owner.mapped[gfn] = (true, m.dirty || write)
                return hpa
            }
            switch host.fault(owner: index, gfn: gfn, write: write, now: now) {
            case .map(let frame, _, _, let readyAt):
                now = max(now, readyAt)
                owner.mapped[gfn] = (true, write)
                frames[gfn] = frame
                return frame
            case .io(let readyAt, _):
                now = max(now, readyAt)
            case .outOfMemory:
                Issue.record("out of memory")
                return 0
            }
        }
    }
    var frames: [UInt64: UInt64] = [:]
    mutating func write(_ gfn: UInt64, word: Int, _ value: UInt64) {
        let f = touch(gfn, write: true)
        host.memory.write64(f + UInt64(word) * 8, value)
    }
    mutating func read(_ gfn: UInt64, word: Int) -> UInt64 {
        host.memory.read64(touch(gfn, write: false) + UInt64(word) * 8)
    }
}

@Suite("Host memory")
struct HostMemoryTests {
    @Test("randomized: resident pages never exceed the limit and every page's content survives swap cycles", arguments: [1, 2, 3, 4] as [UInt64])
    func limitAndContent(seed: UInt64) throws {
        var rng = SplitMix64(seed: seed)
        let limit = 4 + rng.bounded(28)
        var d = try HostDriver(limitPages: limit, device: SwapDeviceModel(name: "t", readLatency: 1_000, writeLatency: 500, bandwidth: 1, queueDepth: 2))
        var oracle: [UInt64: [Int: UInt64]] = [:]
        for step in 0..<3000 {
            let gfn = rng.bounded(96)
            // A zapped mapping is gone: the driver's cache of frames follows the owner's map.
            if d.owner.mapped[gfn] == nil { d.frames[gfn] = nil }
            if rng.bounded(3) == 0 {
                let w = Int(rng.bounded(512))
                let expected = oracle[gfn]?[w] ?? 0
                #expect(d.read(gfn, word: w) == expected)
            } else {
                let w = Int(rng.bounded(512)), v = rng.next()
                d.write(gfn, word: w, v)
                oracle[gfn, default: [:]][w] = v
            }
            d.now += 100
            #expect(d.host.residentFrames <= limit)
            if step % 500 == 0 { #expect(d.host.invariantViolations() == []) }
        }
        #expect(d.host.peakResidentFrames <= limit)
        #expect(d.host.stats(owner: d.index).swapOuts > 200)
        for (gfn, words) in oracle {
            #expect(d.host.contentHash(owner: d.index, gfn: gfn) == expectedPageHash(words), "page \(gfn) (\(d.host.location(owner: d.index, gfn: gfn)))")
        }
    }

    @Test("given a clean page with a swap copy, when it is evicted again, then no write is made")
    func cleanPageDroppedWithoutWrite() throws {
        var d = try HostDriver(limitPages: 2)
        d.host.timing = false
        d.write(0, word: 0, 42)
        d.write(1, word: 0, 43)
        d.write(2, word: 0, 44)  // evicts 0 or 1 (dirty: written out)
        // Read everything back (clean swap-ins), several rounds: a page is written to swap once
        // (when first evicted dirty); afterwards its clean copy is dropped without a write.
        for _ in 0..<5 {
            for g: UInt64 in 0..<3 {
                if d.owner.mapped[g] == nil { d.frames[g] = nil }
                #expect(d.read(g, word: 0) == 42 + g)
            }
        }
        #expect(d.host.stats(owner: d.index).swapOuts <= 3)
        #expect(d.host.stats(owner: d.index).majorFaults >= 8)
    }

    @Test("given pages evicted dirty, a fault on one still under writeback is a swap-cache hit; one written out needs I/O")
    func writebackRescue() throws {
        var d = try HostDriver(limitPages: 2)
        d.write(0, word: 0, 7)
        d.write(1, word: 0, 8)
        // Page 2 needs a frame: the dirty pages go to writeback; the wait is the first write.
        _ = d.touch(2, write: true)
        let locations = [0, 1].map { d.host.location(owner: d.index, gfn: UInt64($0)) }
        #expect(locations.sorted() == ["resident", "swapped"])
        let underWriteback = UInt64(locations.firstIndex(of: "resident")!)
        let written = 1 - underWriteback
        if case .map(_, _, let kind, let readyAt) = d.host.fault(owner: d.index, gfn: underWriteback, write: false, now: d.now) {
            #expect(kind == .swapCache)
            #expect(readyAt == d.now)
        } else { Issue.record("a page under writeback needed I/O") }
        switch d.host.fault(owner: d.index, gfn: written, write: false, now: d.now) {
        case .io(let readyAt, let started):
            #expect(started)
            #expect(readyAt >= d.now + SwapDevice(model: .hdd).serviceTime(write: false))
            if case .io(_, let again) = d.host.fault(owner: d.index, gfn: written, write: false, now: d.now) { #expect(!again) } else { Issue.record("still in flight") }
            let after = d.host.fault(owner: d.index, gfn: written, write: false, now: readyAt)
            if case .map(_, _, let kind, _) = after { #expect(kind == .swapCache) } else { Issue.record("not ready after I/O: \(after)") }
        default:
            Issue.record("expected swap I/O")
        }
        #expect(d.host.contentHash(owner: d.index, gfn: 0) == expectedPageHash([0: 7]))
        #expect(d.host.contentHash(owner: d.index, gfn: 1) == expectedPageHash([0: 8]))
        #expect(d.host.invariantViolations() == [])
    }

    @Test("the swap device serves requests first come first served, queueDepth at a time")
    func deviceQueue() {
        var dev = SwapDevice(model: SwapDeviceModel(name: "t", readLatency: 100, writeLatency: 10, bandwidth: 4096.0 / 100, queueDepth: 2))
        let s = dev.serviceTime(write: false)
        #expect(s == 200)
        #expect(dev.submit(at: 0, write: false) == 200)
        #expect(dev.submit(at: 0, write: false) == 200)
        #expect(dev.submit(at: 0, write: false) == 400)
        #expect(dev.submit(at: 1000, write: true) == 1110)
    }

    @Test("KSM merges identical pages copy-on-write and a write breaks the share")
    func ksmMergeAndBreak() throws {
        var d = try HostDriver(limitPages: nil)
        for g: UInt64 in 0..<3 { d.write(g, word: 5, 0xFEED) }
        d.write(3, word: 5, 0xBEEF)
        let resident = d.host.residentFrames
        d.host.ksmScan(pages: 8)  // first look: checksums recorded
        d.host.ksmScan(pages: 8)  // second look: merged
        var k = d.host.ksmStats
        #expect(k.pagesShared == 1)
        #expect(k.pagesSharing == 2)
        #expect(d.host.residentFrames == resident - 2)
        for g: UInt64 in 0..<3 { #expect(d.host.location(owner: d.index, gfn: g) == "ksm") }
        // A read maps the shared page read-only.
        d.frames = [:]
        #expect(d.read(1, word: 5) == 0xFEED)
        if case .map(_, let writable, let kind, _) = d.host.fault(owner: d.index, gfn: 2, write: false, now: 0) {
            #expect(!writable)
            #expect(kind == .ksmShared)
        }
        // A write breaks the share: a private copy with the same content.
        if case .map(let frame, let writable, let kind, _) = d.host.fault(owner: d.index, gfn: 0, write: true, now: 0) {
            #expect(writable)
            #expect(kind == .cowBreak)
            #expect(d.host.memory.read64(frame + 40) == 0xFEED)
        } else { Issue.record("no copy-on-write") }
        k = d.host.ksmStats
        #expect(k.pagesShared == 1)
        #expect(k.pagesSharing == 1)
        #expect(d.host.contentHash(owner: d.index, gfn: 0) == expectedPageHash([5: 0xFEED]))
        #expect(d.host.invariantViolations() == [])
    }
}
