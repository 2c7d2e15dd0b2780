#if canImport(Glibc)
import Glibc
#endif
import MemVirtCore
import MemVirtModel
import Testing

// Issue 17 defect 8 (model side): before allocating, a run compares what it will need with
// what the host has (or --memory-limit) and refuses with the numbers; a trace, whose pages are
// known only as it is read, is checked as it goes; a fresh 1 GiB frame no longer costs 1 GiB.
@Suite("Model memory bounds")
struct ModelMemoryBoundTests {
    static func refusal(_ spec: WorkloadSpec, _ config: ModelConfig) -> String? {
        do {
            _ = try ModelEngine.run(spec: spec, config: config)
            return nil
        } catch let e as InputError {
            return e.message
        } catch {
            return "\(error)"
        }
    }

    @Test("a run that would touch more than --memory-limit is refused up front, with the numbers")
    func refusedUpFront() throws {
        var config = ModelConfig()
        config.memoryLimit = .mib(100)
        // 1 GiB uniform, 10M accesses: every one of its 262,144 pages can be touched: at least
        // 1 GiB of data alone, far above 100 MiB. The run would otherwise take minutes: the
        // refusal must come before it starts.
        let spec = WorkloadSpec(pattern: .uniform, footprint: .gib(1), accesses: 10_000_000)
        let start = WallClock()
        let message = try #require(Self.refusal(spec, config), "the run was not refused")
        #expect(start.seconds < 5, "the refusal came after \(start.seconds) s")
        #expect(message.contains("--memory-limit: 100MiB"), "\(message)")
        #expect(message.contains("262,144 touched 4K pages"), "\(message)")
        let need = ModelEngine.memoryNeed(spec: spec, config: config)
        #expect(need.touchedPages == 262_144)
        // The need is at least the data of every page it can touch (the oracle: 4 KiB a page).
        #expect(need.total >= 262_144 * 4096)
    }

    @Test("the touched pages are bounded by the accesses: a small run over a large footprint runs")
    func boundedByAccesses() throws {
        var config = ModelConfig()
        config.memoryLimit = .mib(128)
        // 64 GiB footprint, 1,000 accesses: at most 1,000 pages, whatever the footprint.
        let spec = WorkloadSpec(pattern: .uniform, footprint: .gib(64), accesses: 1000)
        #expect(ModelEngine.memoryNeed(spec: spec, config: config).touchedPages == 1000)
        #expect(Self.refusal(spec, config) == nil)
        // Prefault touches every page: refused.
        config.prefault = true
        #expect(Self.refusal(spec, config)?.contains("16,777,216 touched 4K pages") == true)
    }

    @Test("nested paging's up-front records are counted: a 1 TiB footprint under a 1 GiB limit is refused")
    func nestedUpFront() throws {
        var config = ModelConfig()
        config.paging = .nested
        config.memoryLimit = .gib(1)
        let spec = WorkloadSpec(pattern: .uniform, footprint: .gib(1024), accesses: 10)
        let message = try #require(Self.refusal(spec, config))
        #expect(message.contains("nested paging's host frame records"), "\(message)")
        // Oracle: at least one byte per 4 KiB host frame of the 1026 GiB guest + 2 GiB tables.
        let need = ModelEngine.memoryNeed(spec: spec, config: config)
        #expect(need.upFront >= (1028 << 30) / 4096)
        // The same run natively needs only its 10 pages.
        config.paging = .native
        #expect(Self.refusal(spec, config) == nil)
    }

    @Test("chase's per-thread cycles are counted up front")
    func chaseTables() throws {
        var config = ModelConfig()
        config.memoryLimit = .gib(1)
        // 16 GiB / 64 B = 2^28 slots x 4 bytes x (4 threads + 1 being built) = 5 GiB.
        let spec = WorkloadSpec(pattern: .chase, footprint: .gib(16), accesses: 10, threads: 4)
        let message = try #require(Self.refusal(spec, config))
        #expect(message.contains("chase cycles"), "\(message)")
        #expect(message.contains("5GiB"), "\(message)")
    }

    @Test("a fresh 1 GiB frame is zeroed without making it resident")
    func hugeFrameZeroing() throws {
        let m = try PhysicalMemory(capacity: 2 << 30, name: "test")
        // Dirty a few 4 KiB pages of the second GiB, then zero the whole GiB as a fresh frame.
        for k in 0..<8 { m.write64((1 << 30) + UInt64(k) * (64 << 20), 0xDEAD_BEEF) }
        #expect(m.residentBytes(1 << 30, bytes: 1 << 30) >= 8 * 4096)
        m.zero(1 << 30, bytes: 1 << 30)
        // It reads as zero and holds (almost) nothing: before, memset made all 1 GiB resident.
        for k in 0..<8 { #expect(m.read64((1 << 30) + UInt64(k) * (64 << 20)) == 0) }
        #expect(m.residentBytes(1 << 30, bytes: 1 << 30) < 16 << 20)
        // Small zeroing still writes zeros (the page is about to be used).
        m.write64(4096, 7)
        m.zero(4096, bytes: 4096)
        #expect(m.read64(4096) == 0)
    }

    @Test("1 GiB pages: a short run touches a few 4 KiB parts, not whole gigabytes")
    func oneGigPagesRun() throws {
        var config = ModelConfig()
        config.pageSize = .size1G
        config.memoryLimit = .mib(512)
        let spec = WorkloadSpec(pattern: .uniform, footprint: .gib(4), accesses: 100)
        // 4 pages, 25 accesses each: at most 25 x 2 MiB (THP) of each: 200 MiB + baseline.
        let need = ModelEngine.memoryNeed(spec: spec, config: config)
        #expect(need.touchedPages == 4)
        #expect(need.total < 512 << 20)
        #expect(Self.refusal(spec, config) == nil)
    }

    @Test("a trace that outgrows --memory-limit is stopped as it is read, naming the line")
    func traceBudget() throws {
        // 70,000 lines, each a new page: beyond the first check (65,536 accesses) the model
        // holds 65,536 pages x 4352 bytes = 272 MiB, above a 64 MiB baseline + 100 MiB limit.
        var text = ""
        text.reserveCapacity(70_000 * 16)
        for i in 0..<70_000 { text += " L \(String(0x1000_0000 + i * 4096, radix: 16)),8\n" }
        let path = "/tmp/memvirt-trace-budget-\(getpid())"
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        try #require(fd >= 0)
        defer { unlink(path) }
        let bytes = Array(text.utf8)
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeBytes { write(fd, $0.baseAddress! + done, $0.count - done) }
            try #require(n > 0)
            done += n
        }
        close(fd)
        var config = ModelConfig()
        config.memoryLimit = .mib(164)
        let message = try #require(Self.refusal(WorkloadSpec(pattern: .lackey(path: path)), config))
        #expect(message.hasPrefix(path + ": refused at line"), "\(message)")
        #expect(message.contains("65,5"), "\(message)")
        config.memoryLimit = .gib(2)
        #expect(Self.refusal(WorkloadSpec(pattern: .lackey(path: path)), config) == nil)
    }

    @Test("the host's available memory is read (MemAvailable, lowered by a cgroup limit)")
    func hostAvailable() {
        let (bytes, source) = ModelEngine.hostAvailableMemory()
        #expect(bytes > 0)
        #expect(bytes < UInt64.max, "\(source)")
    }
}
