import MemVirtCore
import MemVirtModel

/// `memvirt bench`: how fast the model simulates, beside a native loop over the same addresses,
/// all measured in one run (ratios hold on a noisy machine; absolute rates do not).
public struct SpeedBench: Sendable {
    public struct Config: Sendable {
        /// Accesses per measured stream.
        public var accesses: UInt64 = 20_000_000
        /// Walking stream accesses (slower per access).
        public var walkAccesses: UInt64 = 5_000_000
        /// Footprint of the TLB-hit stream: 16 pages, inside the 96-entry L1 DTLB.
        public var hitFootprint: ByteCount = .kib(64)
        /// Footprint of the walking stream: the same addresses as the TLB-hit stream and the
        /// native loop. Without TLBs every access walks whatever the footprint; a larger one only
        /// adds the host's own cache and TLB misses on the simulated data (measured here: 4 MiB
        /// halves the rate on this VM), which is not the simulator's cost.
        public var walkFootprint: ByteCount = .kib(64)
        /// Paging modes to time on the TLB-hit stream (native always).
        public var modes: [PagingKind] = [.native, .shadow, .nested]
        public var seed: UInt64 = 1
        public init() {}
    }

    public struct Row: Sendable {
        public var name: String
        public var accesses: UInt64
        public var seconds: Double
        public var rate: Double { Double(accesses) / seconds }
    }

    public var config: Config
    public init(config: Config) { self.config = config }

    /// Runs the streams; `rows` are in measurement order, `json` has the keys.
    public func run() throws -> (rows: [Row], json: JSONValue) {
        var rows: [Row] = []
        let hitSpec = WorkloadSpec(pattern: .uniform, footprint: config.hitFootprint, accesses: config.accesses, seed: config.seed)
        // Native loop first and last, so a drift in machine speed shows.
        let native1 = try nativeLoop(hitSpec)
        rows.append(native1)
        var modeRows: [PagingKind: Row] = [:]
        for mode in config.modes {
            var c = ModelConfig()
            c.paging = mode
            c.prefault = true
            let r = try timed("model \(mode.rawValue), TLB hits", hitSpec, c)
            modeRows[mode] = r
            rows.append(r)
        }
        var walkConfig = ModelConfig()
        walkConfig.tlb = .none
        walkConfig.prefault = true
        let walkSpec = WorkloadSpec(pattern: .uniform, footprint: config.walkFootprint, accesses: config.walkAccesses, seed: config.seed)
        let walkLines = try timed("model native, every access walks, with the data-cache model of entry reads", walkSpec, walkConfig)
        rows.append(walkLines)
        walkConfig.modelLineCache = false
        let walk = try timed("model native, every access walks (no TLB, no walk caches)", walkSpec, walkConfig)
        rows.append(walk)
        let native2 = try nativeLoop(hitSpec)
        rows.append(native2)
        let nativeRate = max(native1.rate, native2.rate)
        let hit = modeRows[.native]!
        var kv: [(String, JSONValue)] = [
            ("schema", "memvirt.bench/1"),
            ("tlb_hit_refs_per_s", .double(hit.rate.rounded())),
            ("walk_refs_per_s", .double(walk.rate.rounded())),
            ("walk_with_line_cache_refs_per_s", .double(walkLines.rate.rounded())),
            ("walk_memory_refs_per_s", .double((walk.rate * 4).rounded())),
            ("native_refs_per_s", .double(nativeRate.rounded())),
            ("tlb_hit_slowdown", .double((nativeRate / hit.rate * 100).rounded() / 100)),
        ]
        for mode in config.modes where mode != .native {
            let r = modeRows[mode]!
            kv.append(("\(mode.rawValue)_tlb_hit_refs_per_s", .double(r.rate.rounded())))
            kv.append(("\(mode.rawValue)_vs_native_simulation", .double((hit.rate / r.rate * 100).rounded() / 100)))
        }
        kv.append(("rows", .array(rows.map { .object([("name", .string($0.name)), ("accesses", .uint($0.accesses)), ("seconds", .double($0.seconds)), ("per_second", .double($0.rate.rounded()))]) })))
        return (rows, .object(kv))
    }

    func timed(_ name: String, _ spec: WorkloadSpec, _ c: ModelConfig) throws -> Row {
        let r = try ModelEngine.run(spec: spec, config: c)
        // The run's wall time includes set-up and pre-faulting; time the access loop itself.
        return Row(name: name, accesses: r.counters[.accesses], seconds: r.facts.loopSeconds ?? r.wallSeconds)
    }

    /// The same SplitMix64 addresses over a real buffer: what the hardware does natively.
    func nativeLoop(_ spec: WorkloadSpec) throws -> Row {
        let bytes = Int(spec.footprint.rawValue)
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 4096)
        defer { buffer.deallocate() }
        buffer.initializeMemory(as: UInt8.self, repeating: 1, count: bytes)
        var g = try AccessGenerator(spec: spec)
        let base = spec.base.rawValue
        var sum: UInt64 = 0
        let clock = WallClock()
        for _ in 0..<spec.accesses {
            let a = g.next()
            sum = (sum ^ buffer.load(fromByteOffset: Int(a.address.rawValue &- base), as: UInt64.self)) &* 0x100_0000_01B3
        }
        let s = clock.seconds
        blackHole(sum)
        return Row(name: "native Swift loop, same addresses", accesses: spec.accesses, seconds: s)
    }
}

@inline(never) func blackHole(_ x: UInt64) {
    if x == 0x1234_5678_9ABC_DEF0 { print("") }
}
