import MemVirtCore
import MemVirtGuest

/// A `GuestOpScript` checked and flattened for the guest (guest_ops.c, memvirt_ops.h): 4 words
/// per op {code, a, b, c}; `loop(n, body)` is {LOOP, n, index after its LOOP_END, 0}, the body,
/// {LOOP_END}; the script ends with {END}.
///
/// The check walks the script once as the guest will (loops unrolled, up to
/// `maxExecutedOps`): spaces live where named, regions mapped where touched, writes only to
/// writable regions, and the frames the guest kernel can need at most, for the pool's size.
public struct GuestOpsPlan: Sendable {
    public var words: [UInt64]
    /// Encoded ops (4 words each), the END included.
    public var opCount: Int { words.count / 4 }
    /// Ops the guest will execute (loops unrolled; LOOP/LOOP_END not counted).
    public var executedOps: Int
    /// Frames the guest kernel may hold at once, at most: per live space its root and PDPT,
    /// per region ever mapped in it a page directory and its page tables, per mapped page a
    /// data frame (copy-on-write sharing only lowers it).
    public var peakFramesBound: Int
    /// Touch accesses over the script.
    public var touches: UInt64

    public static let maxExecutedOps = 20_000_000
    /// Touch accesses a script may make (each is a guest access; a fault costs ~100 us here).
    public static let maxTouches: UInt64 = 1 << 36
    public static let maxDepth = Int(MEMVIRT_OPS_MAX_DEPTH)
    public static let maxSpaces = Int(MEMVIRT_OPS_MAX_SPACES)
    public static let maxPagesPerRegion = 1 << 18

    public init(_ script: GuestOpScript) throws(InputError) {
        var words: [UInt64] = []
        try Self.encode(script.ops, into: &words, path: "ops", depth: 0)
        words += [UInt64(MEMVIRT_OP_END.rawValue), 0, 0, 0]
        self.words = words
        var sim = Simulation()
        try sim.run(script.ops, path: "ops")
        executedOps = sim.executed
        peakFramesBound = sim.peak
        touches = sim.touches
    }

    private static func code(_ c: memvirt_op_code) -> UInt64 { UInt64(c.rawValue) }

    private static func encode(_ ops: [GuestOpScript.Op], into w: inout [UInt64], path: String, depth: Int) throws(InputError) {
        for (i, op) in ops.enumerated() {
            let here = "\(path)[\(i)]"
            switch op {
            case .map(let r, let pages, let writable):
                try region(r, here)
                guard pages >= 1, pages <= maxPagesPerRegion else {
                    throw InputError("\(here) (map): \(pages) pages; a region holds 1...\(maxPagesPerRegion) (its 1 GiB slot)")
                }
                w += [code(MEMVIRT_OP_MAP), UInt64(r), UInt64(pages), writable ? 1 : 0]
            case .touch(let r, let count, let order, let write):
                try region(r, here)
                guard count >= 0 else { throw InputError("\(here) (touch): count \(count) must be >= 0") }
                w += [code(MEMVIRT_OP_TOUCH), UInt64(r), UInt64(count), (order == .uniform ? 1 : 0) | (write ? 2 : 0)]
            case .protect(let r, let writable):
                try region(r, here)
                w += [code(MEMVIRT_OP_PROTECT), UInt64(r), writable ? 1 : 0, 0]
            case .unmap(let r):
                try region(r, here)
                w += [code(MEMVIRT_OP_UNMAP), UInt64(r), 0, 0]
            case .fork:
                w += [code(MEMVIRT_OP_FORK), 0, 0, 0]
            case .switchTo(let s):
                guard s >= 0, s < maxSpaces else { throw InputError("\(here) (switchTo): space \(s); ids are 0...\(maxSpaces - 1)") }
                w += [code(MEMVIRT_OP_SWITCH), UInt64(s), 0, 0]
            case .exit(let s):
                guard s >= 0, s < maxSpaces else { throw InputError("\(here) (exit): space \(s); ids are 0...\(maxSpaces - 1)") }
                w += [code(MEMVIRT_OP_EXIT), UInt64(s), 0, 0]
            case .loop(let count, let body):
                guard count >= 0 else { throw InputError("\(here) (loop): count \(count) must be >= 0") }
                guard depth + 1 <= maxDepth else { throw InputError("\(here) (loop): loops nest at most \(maxDepth) deep") }
                let at = w.count
                w += [code(MEMVIRT_OP_LOOP), UInt64(count), 0, 0]
                try encode(body, into: &w, path: "\(here).body", depth: depth + 1)
                w += [code(MEMVIRT_OP_LOOP_END), 0, 0, 0]
                w[at + 2] = UInt64(w.count / 4)
            }
        }
    }

    private static func region(_ r: Int, _ here: String) throws(InputError) {
        guard r >= 0, r < GuestOpScript.maxRegions else {
            throw InputError("\(here): region \(r); regions are 0...\(GuestOpScript.maxRegions - 1)")
        }
    }

    /// The script's structure, op by op: which spaces live, which regions are mapped.
    struct Simulation {
        struct Region { var pages: Int; var writable: Bool; var mapped: Bool; var tablePages: Int }
        struct Space { var regions: [Int: Region] = [:] }
        var spaces: [Int: Space] = [0: Space()]
        var current = 0
        var executed = 0
        var peak = 2
        var touches: UInt64 = 0

        /// The frames bound of each live space, and their sum (kept as ops change them).
        var spaceBound: [Int: Int] = [0: 2]
        var total = 2

        static func bound(_ s: Space) -> Int {
            var n = 2
            for r in s.regions.values { n += 1 + r.tablePages + (r.mapped ? r.pages : 0) }
            return n
        }

        mutating func setBound(_ id: Int, _ s: Space?) {
            total -= spaceBound[id] ?? 0
            spaceBound[id] = s.map { Self.bound($0) }
            total += spaceBound[id] ?? 0
        }

        mutating func run(_ ops: [GuestOpScript.Op], path: String) throws(InputError) {
            for (i, op) in ops.enumerated() {
                let here = "\(path)[\(i)]"
                if case .loop(let count, let body) = op {
                    for k in 0..<count { try run(body, path: "\(here).body (iteration \(k + 1))") }
                    continue
                }
                executed += 1
                guard executed <= GuestOpsPlan.maxExecutedOps else {
                    throw InputError("\(here): the script executes more than \(GuestOpsPlan.maxExecutedOps) ops (loops unrolled)")
                }
                var s = spaces[current]!
                switch op {
                case .map(let r, let pages, let writable):
                    if let old = s.regions[r], old.mapped { throw InputError("\(here) (map): region \(r) of space \(current) is already mapped") }
                    let tables = (pages + 511) / 512
                    s.regions[r] = Region(pages: pages, writable: writable, mapped: true, tablePages: max(tables, s.regions[r]?.tablePages ?? 0))
                case .touch(let r, let count, _, let write):
                    guard let reg = s.regions[r], reg.mapped else { throw InputError("\(here) (touch): region \(r) is not mapped in space \(current)") }
                    if write && !reg.writable { throw InputError("\(here) (touch): a write to read-only region \(r) of space \(current) (the guest would fault: SIGSEGV)") }
                    touches += UInt64(count)
                    guard touches <= GuestOpsPlan.maxTouches else {
                        throw InputError("\(here) (touch): the script makes more than \(GuestOpsPlan.maxTouches) touches (loops unrolled)")
                    }
                case .protect(let r, let writable):
                    guard s.regions[r]?.mapped == true else { throw InputError("\(here) (protect): region \(r) is not mapped in space \(current)") }
                    s.regions[r]!.writable = writable
                case .unmap(let r):
                    guard s.regions[r]?.mapped == true else { throw InputError("\(here) (unmap): region \(r) is not mapped in space \(current)") }
                    s.regions[r]!.mapped = false
                case .fork:
                    guard let id = (0..<GuestOpsPlan.maxSpaces).first(where: { spaces[$0] == nil }) else {
                        throw InputError("\(here) (fork): \(GuestOpsPlan.maxSpaces) spaces are live already")
                    }
                    var child = Space()
                    for (r, reg) in s.regions where reg.mapped { child.regions[r] = Region(pages: reg.pages, writable: reg.writable, mapped: true, tablePages: (reg.pages + 511) / 512) }
                    spaces[id] = child
                    setBound(id, child)
                case .switchTo(let id):
                    guard spaces[id] != nil else { throw InputError("\(here) (switchTo): space \(id) does not exist (live: \(spaces.keys.sorted()))") }
                case .exit(let id):
                    guard spaces[id] != nil else { throw InputError("\(here) (exit): space \(id) does not exist (live: \(spaces.keys.sorted()))") }
                    guard id != current else { throw InputError("\(here) (exit): space \(id) is current; switch away first") }
                case .loop: break
                }
                switch op {
                case .exit(let id):
                    spaces[id] = nil
                    setBound(id, nil)
                case .map, .unmap:
                    spaces[current] = s
                    setBound(current, s)
                default:
                    spaces[current] = s
                }
                if case .switchTo(let id) = op { current = id }
                peak = max(peak, total)
            }
        }
    }
}

extension GuestOpScript.Op {
    /// The op's kind as the script names it (error messages).
    var kind: String {
        switch self {
        case .map: "map"
        case .touch: "touch"
        case .protect: "protect"
        case .unmap: "unmap"
        case .fork: "fork"
        case .switchTo: "switchTo"
        case .exit: "exit"
        case .loop: "loop"
        }
    }
}
