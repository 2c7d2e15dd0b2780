/// A workload described once, realized twice: as an access stream for the model engine
/// (`AccessGenerator`, below) and as guest code for the KVM engine, which draws the same
/// SplitMix64 numbers in the same order and so touches the same addresses.
///
/// The stream, exactly (offsets are bytes into the footprint; every access is 8 bytes,
/// 8-byte aligned; `rng` is SplitMix64 seeded with `SplitMix64.derive(seed, thread)`):
/// - `sequential`: access i is at `(i * 64) mod footprint` (one per cache line).
/// - `strided`: access i is at `(i * stride) mod footprint`.
/// - `uniform`: `rng.bounded(footprint / 8) * 8`.
/// - `zipf`: page `zipf.sample(rng.unitDouble())` (rank 0 is page 0, the hottest; a CDF table
///   over the footprint's 4 KiB pages, searched by binary search for the first entry >= u),
///   then word `rng.bounded(512)` of that page.
/// - `chase`: a pointer chase through one random cycle over all 64-byte slots. Sattolo's
///   algorithm shuffles the list `perm = [0, 1, ..., n-1]` (for i = n-1 down to 1: `j =
///   rng.bounded(i)`, swap perm[i] and perm[j]); the cycle then visits the slots in list order:
///   the slot after `perm[k]` is `perm[(k+1) mod n]`. Access i visits the i-th slot of the
///   cycle starting at slot 0 (so the first access is at offset 0).
/// - `gups`: like uniform, but every access is a read-modify-write (a write access that also
///   reads); the write ratio is ignored.
/// After the address, when 0 < writeRatio < 1, one more draw decides: write iff
/// `rng.next() < writeThreshold`, `writeThreshold = UInt64(writeRatio * 2^64)`. A ratio of 0
/// or 1 draws nothing.
public struct WorkloadSpec: Hashable, Sendable {
    public enum Pattern: Hashable, Sendable, CustomStringConvertible {
        case sequential
        case strided(stride: UInt64)
        case uniform
        case zipf(theta: Double)
        case chase
        case gups
        /// A valgrind lackey `--trace-mem=yes` trace, replayed whole.
        case lackey(path: String)

        public var name: String {
            switch self {
            case .sequential: "sequential"
            case .strided: "strided"
            case .uniform: "uniform"
            case .zipf: "zipf"
            case .chase: "chase"
            case .gups: "gups"
            case .lackey: "lackey"
            }
        }
        public var description: String {
            switch self {
            case .strided(let s): "strided(\(s))"
            case .zipf(let t): "zipf(\(t))"
            case .lackey(let p): "lackey:\(p)"
            default: name
            }
        }

        /// Parses `uniform|sequential|strided[:STRIDE]|zipf[:THETA]|chase|gups|lackey:PATH`.
        public init(parsing text: String) throws(InputError) {
            // Empty pieces are kept: "strided:" and ":uniform" are errors, not defaults.
            let parts = text.split(separator: ":", maxSplits: 1, omittingEmptySubsequences: false).map(String.init)
            let arg = parts.count > 1 ? parts[1] : nil
            let name = parts[0]
            if arg != nil, !["strided", "zipf", "lackey"].contains(name) {
                throw InputError("workload '\(text)': \(name) takes no ':' argument")
            }
            switch name {
            case "sequential", "seq": self = .sequential
            case "strided":
                var stride: UInt64 = 4096
                if let a = arg {
                    do { stride = try ByteCount(parsing: a).rawValue } catch { throw InputError("workload '\(text)': \(error.message)") }
                }
                self = .strided(stride: stride)
                if stride == 0 || stride % 8 != 0 {
                    throw InputError("workload '\(text)': the stride must be a positive multiple of 8 bytes")
                }
            case "uniform", "random": self = .uniform
            case "zipf":
                guard let t = arg.map({ Double($0) }) ?? 0.99, t > 0, t < 10 else {
                    throw InputError("workload '\(text)': zipf takes a theta in (0, 10), e.g. zipf:0.99")
                }
                self = .zipf(theta: t)
            case "chase", "pointer-chase": self = .chase
            case "gups": self = .gups
            case "lackey":
                guard let p = arg, !p.isEmpty else { throw InputError("workload '\(text)': say lackey:PATH") }
                self = .lackey(path: p)
            default:
                throw InputError("unknown workload '\(text)' (use uniform, sequential, strided[:STRIDE], zipf[:THETA], chase, gups or lackey:PATH)")
            }
        }
    }

    /// The 1 GiB-aligned guest-virtual address where the workload's memory starts
    /// (256 GiB: PML4 index 0, PDPT index 256; away from the guest runtime's own pages).
    public static let defaultBase = GuestVirtualAddress(rawValue: 0x0000_0040_0000_0000)

    public var pattern: Pattern
    /// Bytes of memory the workload spreads over (a multiple of 4 KiB).
    public var footprint: ByteCount
    /// Memory accesses to make (per thread).
    public var accesses: UInt64
    /// Fraction of accesses that write, 0...1.
    public var writeRatio: Double
    public var seed: UInt64
    /// Threads, each with its own stream (`SplitMix64.derive(seed, thread)`) over the same memory.
    public var threads: Int
    /// Simulated compute between accesses, in cycles (the KVM guest spins this many `pause`-free adds).
    public var computePerAccess: UInt64
    public var base: GuestVirtualAddress

    public init(
        pattern: Pattern = .uniform, footprint: ByteCount = .mib(64), accesses: UInt64 = 1_000_000,
        writeRatio: Double = 0, seed: UInt64 = 1, threads: Int = 1, computePerAccess: UInt64 = 0,
        base: GuestVirtualAddress = WorkloadSpec.defaultBase
    ) {
        self.pattern = pattern
        self.footprint = footprint
        self.accesses = accesses
        self.writeRatio = writeRatio
        self.seed = seed
        self.threads = threads
        self.computePerAccess = computePerAccess
        self.base = base
    }

    /// Checks the spec; the error says which field is wrong and why.
    public func validate() throws(InputError) {
        if footprint.rawValue < 4096 || footprint.rawValue % 4096 != 0 {
            throw InputError("footprint \(footprint): must be a positive multiple of 4KiB")
        }
        if footprint.rawValue > 1 << 40 { throw InputError("footprint \(footprint): at most 1TiB") }
        if !(writeRatio >= 0 && writeRatio <= 1) { throw InputError("write ratio \(writeRatio): must be between 0 and 1") }
        if threads < 1 || threads > 1024 { throw InputError("threads \(threads): must be 1...1024") }
        if !base.isAligned(to: .size1G) { throw InputError("base \(base): must be 1GiB-aligned") }
        if case .strided(let s) = pattern, s == 0 || s % 8 != 0 {
            throw InputError("stride \(s): must be a positive multiple of 8 bytes")
        }
        if case .zipf = pattern, footprint.rawValue / 4096 > 1 << 26 {
            throw InputError("footprint \(footprint): zipf's table supports at most 256GiB")
        }
    }

    /// `UInt64(writeRatio * 2^64)`, saturated: the threshold the write draw is compared to.
    public var writeThreshold: UInt64 {
        if writeRatio <= 0 { return 0 }
        if writeRatio >= 1 { return .max }
        let v = writeRatio * 18_446_744_073_709_551_616.0
        return v >= 18_446_744_073_709_549_568.0 ? .max - 1 : UInt64(v)
    }
}

/// One memory access of a workload.
public struct Access: Hashable, Sendable {
    public var address: GuestVirtualAddress
    public var kind: AccessKind
    /// Bytes accessed (1...4096 for traces; 8 for synthetic workloads).
    public var size: UInt16
    @inlinable public init(address: GuestVirtualAddress, kind: AccessKind, size: UInt16 = 8) {
        self.address = address
        self.kind = kind
        self.size = size
    }
}

/// A Zipf distribution over `n` items as a cumulative table: P(rank k) ∝ 1/(k+1)^theta.
public struct ZipfTable: Sendable {
    public let cdf: [Double]
    public init(items n: Int, theta: Double) {
        var weights = [Double](repeating: 0, count: n)
        var total = 0.0
        for k in 0..<n {
            let w = 1.0 / pow(Double(k + 1), theta)
            weights[k] = w
            total += w
        }
        var acc = 0.0
        for k in 0..<n {
            acc += weights[k] / total
            weights[k] = acc
        }
        weights[n - 1] = 1.0
        cdf = weights
    }
    /// The first rank whose cumulative probability is >= u.
    @inlinable public func sample(_ u: Double) -> Int {
        var lo = 0
        var hi = cdf.count - 1
        while lo < hi {
            let mid = (lo + hi) >> 1
            if cdf[mid] >= u { hi = mid } else { lo = mid + 1 }
        }
        return lo
    }
}

/// x^y for x > 0 without Foundation: exp(y * ln x) by argument reduction.
@usableFromInline func pow(_ x: Double, _ y: Double) -> Double { exp(y * log(x)) }

@usableFromInline func log(_ x: Double) -> Double {
    // x = m * 2^e, m in [1, 2); ln x = e ln 2 + 2 atanh((m-1)/(m+1)).
    let e = Double(x.exponent)
    let m = x.significand
    let s = (m - 1) / (m + 1)
    let s2 = s * s
    var term = s
    var sum = 0.0
    var k = 1.0
    while abs(term / k) > 1e-17 {
        sum += term / k
        term *= s2
        k += 2
    }
    return e * 0.693_147_180_559_945_3 + 2 * sum
}

@usableFromInline func exp(_ x: Double) -> Double {
    // e^x = 2^k * e^r, |r| <= ln2/2.
    let k = (x / 0.693_147_180_559_945_3).rounded()
    let r = x - k * 0.693_147_180_559_945_3
    var term = 1.0
    var sum = 1.0
    var i = 1.0
    while abs(term) > 1e-17 {
        term *= r / i
        sum += term
        i += 1
    }
    return sum * Double(sign: .plus, exponent: Int(k), significand: 1)
}

/// The reference realization of a synthetic `WorkloadSpec` for one thread: the exact stream
/// the KVM guest runtime also draws. Value type, no allocation per access.
public struct AccessGenerator: Sendable {
    public let spec: WorkloadSpec
    @usableFromInline var rng: SplitMix64
    @usableFromInline var index: UInt64 = 0
    @usableFromInline let words: UInt64
    @usableFromInline let threshold: UInt64
    @usableFromInline let base: UInt64
    @usableFromInline let footprint: UInt64
    @usableFromInline let kindCode: UInt8  // 0 seq, 1 strided, 2 uniform, 3 zipf, 4 chase, 5 gups
    @usableFromInline let stride: UInt64
    @usableFromInline let zipf: ZipfTable?
    @usableFromInline let chaseNext: [UInt32]
    @usableFromInline var chaseSlot: UInt32 = 0

    /// The stream of `thread` (0-based). Throws for a lackey spec (a trace is read, not generated).
    public init(spec: WorkloadSpec, thread: Int = 0) throws(InputError) {
        try spec.validate()
        self.spec = spec
        rng = SplitMix64(seed: SplitMix64.derive(seed: spec.seed, stream: UInt64(thread)))
        footprint = spec.footprint.rawValue
        words = footprint / 8
        threshold = spec.writeThreshold
        base = spec.base.rawValue
        var stride: UInt64 = 64
        var zipf: ZipfTable? = nil
        var chase: [UInt32] = []
        switch spec.pattern {
        case .sequential: kindCode = 0
        case .strided(let s): kindCode = 1; stride = s
        case .uniform: kindCode = 2
        case .zipf(let theta):
            kindCode = 3
            zipf = ZipfTable(items: Int(footprint / 4096), theta: theta)
        case .chase:
            kindCode = 4
            let n = footprint / 64
            guard n <= UInt64(UInt32.max) else { throw InputError("chase footprint \(spec.footprint): at most 256GiB") }
            chase = AccessGenerator.sattoloCycle(slots: Int(n), rng: &rng)
        case .gups: kindCode = 5
        case .lackey: throw InputError("a lackey trace is replayed by the trace reader, not generated")
        }
        self.stride = stride
        self.zipf = zipf
        chaseNext = chase
    }

    /// `next[i]` is the slot after slot i in one random cycle through all slots (Sattolo).
    public static func sattoloCycle(slots n: Int, rng: inout SplitMix64) -> [UInt32] {
        var perm = [UInt32](unsafeUninitializedCapacity: n) { buf, count in
            for i in 0..<n { buf[i] = UInt32(i) }
            count = n
        }
        var i = n - 1
        while i > 0 {
            let j = Int(rng.bounded(UInt64(i)))
            perm.swapAt(i, j)
            i -= 1
        }
        // perm is a cyclic permutation as a sequence; turn it into successor links.
        var next = [UInt32](repeating: 0, count: n)
        for k in 0..<n { next[Int(perm[k])] = perm[(k + 1) % n] }
        return next
    }

    /// The next access; the stream is endless (callers count `spec.accesses`).
    @inlinable public mutating func next() -> Access {
        let offset: UInt64
        var kind: AccessKind = .read
        switch kindCode {
        case 0: offset = (index &* 64) % footprint
        case 1: offset = (index &* stride) % footprint
        case 2: offset = rng.bounded(words) << 3
        case 3:
            let page = UInt64(zipf!.sample(rng.unitDouble()))
            offset = (page << 12) | (rng.bounded(512) << 3)
        case 4:
            offset = UInt64(chaseSlot) << 6
            chaseSlot = chaseNext[Int(chaseSlot)]
        default:
            offset = rng.bounded(words) << 3
            kind = .write
        }
        index &+= 1
        if kindCode != 5 {
            if threshold == .max { kind = .write } else if threshold != 0 && rng.next() < threshold { kind = .write }
        }
        return Access(address: GuestVirtualAddress(rawValue: base &+ offset), kind: kind, size: 8)
    }
}

/// The guest runtime's data rules (memvirt_guest.h), for replaying a workload on the host:
/// access i writes `writeValue(i)` (GUPS xors it in), reads add to read_sum, and
/// memory_checksum is the sum over the footprint's words w[k] of w[k] * (2k + 1) (mod 2^64).
public enum GuestDataRules {
    @inlinable public static func writeValue(_ i: UInt64) -> UInt64 { (i &+ 1) &* 0x9E37_79B9_7F4A_7C15 }
    /// Word k's term of memory_checksum.
    @inlinable public static func checksumTerm(_ word: UInt64, index k: UInt64) -> UInt64 { word &* (2 &* k &+ 1) }

    /// read_sum and memory_checksum of thread 0's stream, over a sparse memory (the
    /// footprint is never allocated): the result any engine must reach from zeroed memory.
    public static func replay(_ spec: WorkloadSpec) throws(InputError) -> (readSum: UInt64, checksum: UInt64) {
        var gen = try AccessGenerator(spec: spec)
        var mem: [UInt64: UInt64] = [:]
        var readSum: UInt64 = 0
        let gups = spec.pattern == .gups
        for i in 0..<spec.accesses {
            let a = gen.next()
            let w = (a.address.rawValue - spec.base.rawValue) / 8
            let v = writeValue(i)
            if gups {
                let x = mem[w] ?? 0
                readSum &+= x
                mem[w] = x ^ v
            } else if a.kind == .write {
                mem[w] = v
            } else {
                readSum &+= mem[w] ?? 0
            }
        }
        var h: UInt64 = 0
        for (k, v) in mem { h &+= checksumTerm(v, index: k) }
        return (readSum, h)
    }
}
