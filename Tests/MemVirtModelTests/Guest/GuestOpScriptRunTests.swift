import MemVirtCore
import Testing

@testable import MemVirtModel

/// A reference interpreter of GuestOpScript's semantics (GuestOpScript.swift), written from the
/// contract alone: pages map to frame ids with share counts, no page tables, no TLB. It gives
/// the guest-side counts a realization must produce (faults by kind, PTE writes of leaves,
/// INVLPGs and full flushes by Linux's single-page ceiling, read_sum).
struct ReferenceOps {
    struct Page { var frame: Int; var writable: Bool }
    struct Region { var pages: Int; var writable: Bool; var present: [Int: Page] = [:] }
    var spaces: [[Int: Region]?] = [[:]]
    var current = 0
    var frameRefs: [Int: Int] = [:]
    var frameValue: [Int: UInt64] = [:]
    var nextFrame = 0
    var rng: SplitMix64
    var n: UInt64 = 0
    let ceiling = 33
    var c = GuestOpCounts()
    var readSum: UInt64 = 0

    init(seed: UInt64) { rng = SplitMix64(seed: seed) }

    mutating func newFrame(_ value: UInt64) -> Int {
        nextFrame += 1
        frameRefs[nextFrame] = 1
        frameValue[nextFrame] = value
        return nextFrame
    }
    mutating func release(_ f: Int) {
        frameRefs[f]! -= 1
        if frameRefs[f]! == 0 { frameRefs[f] = nil; frameValue[f] = nil }
    }
    mutating func flush(_ pages: Int) {
        if pages == 0 { return }
        if pages <= ceiling { c.invlpg += UInt64(pages) } else { c.fullFlushes += 1; c.cr3Loads += 1 }
    }

    mutating func run(_ ops: [GuestOpScript.Op]) {
        for op in ops {
            c.opsExecuted += 1
            switch op {
            case .map(let r, let pages, let w):
                spaces[current]![r] = Region(pages: pages, writable: w)
            case .touch(let r, let count, let order, let write):
                let pages = UInt64(spaces[current]![r]!.pages)
                for i in 0..<UInt64(count) {
                    let p = Int(order == .sequential ? i % pages : rng.bounded(pages))
                    let v = (n + 1) &* 0x9E37_79B9_7F4A_7C15
                    n += 1
                    c.touches += 1
                    var reg = spaces[current]![r]!
                    if var pg = reg.present[p] {
                        if write && !pg.writable {
                            c.guestPageFaults += 1
                            c.copyOnWriteFaults += 1
                            c.leafWrites += 1
                            c.invlpg += 1
                            if frameRefs[pg.frame]! > 1 {
                                let old = pg.frame
                                pg.frame = newFrame(frameValue[old]!)
                                release(old)
                                c.copyOnWriteCopies += 1
                            }
                            pg.writable = true
                        }
                        reg.present[p] = pg
                    } else {
                        c.guestPageFaults += 1
                        c.demandZero += 1
                        c.leafWrites += 1
                        reg.present[p] = Page(frame: newFrame(0), writable: reg.writable)
                    }
                    let f = reg.present[p]!.frame
                    if write { frameValue[f] = v; c.writes += 1 } else { readSum &+= frameValue[f]!; c.reads += 1 }
                    spaces[current]![r] = reg
                }
            case .protect(let r, let w):
                var reg = spaces[current]![r]!
                for (p, pg) in reg.present {
                    reg.present[p]!.writable = w && frameRefs[pg.frame]! == 1
                }
                c.leafWrites += UInt64(reg.present.count)
                flush(reg.present.count)
                reg.writable = w
                spaces[current]![r] = reg
            case .unmap(let r):
                let reg = spaces[current]![r]!
                for (_, pg) in reg.present { release(pg.frame) }
                c.leafWrites += UInt64(reg.present.count)
                c.pagesUnmapped += UInt64(reg.present.count)
                flush(reg.present.count)
                spaces[current]![r] = nil
            case .fork:
                var parent = spaces[current]!
                var changed = 0
                for (r, var reg) in parent {
                    for (p, pg) in reg.present {
                        frameRefs[pg.frame]! += 1
                        if pg.writable { changed += 1; c.leafWrites += 1; reg.present[p]!.writable = false }
                        c.leafWrites += 1  // the child's copy of the entry
                    }
                    parent[r] = reg
                }
                spaces[current] = parent
                flush(changed)
                c.forks += 1
                if let free = spaces.firstIndex(where: { $0 == nil }) { spaces[free] = parent } else { spaces.append(parent) }
            case .switchTo(let s):
                current = s
                c.cr3Loads += 1
            case .exit(let s):
                for (_, reg) in spaces[s]! {
                    for (_, pg) in reg.present { release(pg.frame); c.leafWrites += 1; c.pagesUnmapped += 1 }
                }
                spaces[s] = nil
                c.exits += 1
            case .loop(let count, let body):
                for _ in 0..<count { run(body) }
            }
        }
    }
}

@Suite("The model realizes GuestOpScript")
struct GuestOpScriptRunTests {
    static let k = 0x9E37_79B9_7F4A_7C15 as UInt64

    /// The scripts of the validate cases, at a small size.
    static let scripts: [(String, GuestOpScript)] = [
        ("demand-sequential", GuestOpScript(ops: [
            .map(region: 0, pages: 1100, writable: true),
            .touch(region: 0, count: 1100, order: .sequential, write: true),
            .touch(region: 0, count: 1100, order: .sequential, write: false),
        ], seed: 3)),
        ("demand-uniform", GuestOpScript(ops: [
            .map(region: 0, pages: 600, writable: true),
            .touch(region: 0, count: 1200, order: .uniform, write: true),
            .touch(region: 0, count: 1200, order: .uniform, write: false),
        ], seed: 5)),
        ("mmap-churn", GuestOpScript(ops: [.loop(count: 4, body: [
            .map(region: 0, pages: 16, writable: true), .map(region: 1, pages: 64, writable: true),
            .touch(region: 0, count: 16, order: .sequential, write: true), .touch(region: 1, count: 64, order: .sequential, write: true),
            .protect(region: 0, writable: false), .protect(region: 1, writable: false),
            .touch(region: 0, count: 16, order: .sequential, write: false), .touch(region: 1, count: 64, order: .sequential, write: false),
            .unmap(region: 0), .unmap(region: 1),
        ])], seed: 1)),
        ("fork-cow-exit", GuestOpScript(ops: [
            .map(region: 0, pages: 64, writable: true),
            .touch(region: 0, count: 64, order: .sequential, write: true),
            .loop(count: 6, body: [
                .fork, .switchTo(space: 1),
                .touch(region: 0, count: 24, order: .uniform, write: true), .touch(region: 0, count: 24, order: .uniform, write: false),
                .switchTo(space: 0), .exit(space: 1),
                .touch(region: 0, count: 16, order: .uniform, write: true),
            ]),
        ], seed: 7)),
        ("switch-pcid", GuestOpScript(ops: [
            .map(region: 0, pages: 32, writable: false),
            .touch(region: 0, count: 32, order: .sequential, write: false),
            .fork,
            .loop(count: 10, body: [
                .switchTo(space: 1), .touch(region: 0, count: 32, order: .sequential, write: false),
                .switchTo(space: 0), .touch(region: 0, count: 32, order: .sequential, write: false),
            ]),
        ], pcid: true, seed: 1)),
        ("pt-update-heavy", GuestOpScript(ops: [
            .map(region: 0, pages: 256, writable: true),
            .touch(region: 0, count: 256, order: .sequential, write: true),
            .loop(count: 4, body: [
                .fork, .switchTo(space: 1),
                .touch(region: 0, count: 100, order: .uniform, write: true), .touch(region: 0, count: 100, order: .uniform, write: false),
                .unmap(region: 0), .map(region: 1, pages: 64, writable: true),
                .touch(region: 1, count: 64, order: .sequential, write: true),
                .switchTo(space: 0), .exit(space: 1),
                .touch(region: 0, count: 32, order: .uniform, write: true),
            ]),
        ], seed: 9)),
    ]

    static func run(_ script: GuestOpScript, _ paging: PagingKind, body: ((any MachineRunner) -> Void)? = nil) throws -> (GuestOpCounts, UInt64, CounterSet) {
        var config = ModelConfig()
        config.paging = paging
        config.tlb.pcid = script.pcid
        config.shadow.guestDirectMap = true
        return try ModelEngine.withMachine(config: config, capacity: 1 << 30, MachineBody { r in
            let counts: GuestOpCounts
            switch r {
            case let m as Machine<ShadowPaging>: counts = try m.runGuestOps(script)
            case let m as Machine<NativePaging>: counts = try m.runGuestOps(script)
            case let m as Machine<NestedPaging>: counts = try m.runGuestOps(script)
            default: throw InputError("unknown machine")
            }
            body?(r)
            return (counts, r.checksum, r.finish())
        })
    }

    @Test("Guest-side counts and read_sum equal the reference interpreter's, natively, under shadow and nested paging",
          arguments: scripts.map(\.0))
    func countsMatchReference(_ name: String) throws {
        let script = Self.scripts.first { $0.0 == name }!.1
        var ref = ReferenceOps(seed: script.seed)
        ref.run(script.ops)
        for paging in PagingKind.allCases {
            let (c, readSum, _) = try Self.run(script, paging)
            let where_ = "\(name) \(paging)"
            #expect(c.touches == ref.c.touches && c.reads == ref.c.reads && c.writes == ref.c.writes, "\(where_)")
            #expect(c.guestPageFaults == ref.c.guestPageFaults, "\(where_): guest #PF \(c.guestPageFaults) vs \(ref.c.guestPageFaults)")
            #expect(c.demandZero == ref.c.demandZero, "\(where_): demand-zero \(c.demandZero) vs \(ref.c.demandZero)")
            #expect(c.copyOnWriteFaults == ref.c.copyOnWriteFaults, "\(where_): COW \(c.copyOnWriteFaults) vs \(ref.c.copyOnWriteFaults)")
            #expect(c.copyOnWriteCopies == ref.c.copyOnWriteCopies, "\(where_): COW copies \(c.copyOnWriteCopies) vs \(ref.c.copyOnWriteCopies)")
            #expect(c.leafWrites == ref.c.leafWrites, "\(where_): leaf writes \(c.leafWrites) vs \(ref.c.leafWrites)")
            #expect(c.invlpg == ref.c.invlpg, "\(where_): INVLPG \(c.invlpg) vs \(ref.c.invlpg)")
            #expect(c.fullFlushes == ref.c.fullFlushes, "\(where_): full flushes \(c.fullFlushes) vs \(ref.c.fullFlushes)")
            #expect(c.cr3Loads == ref.c.cr3Loads, "\(where_): CR3 loads \(c.cr3Loads) vs \(ref.c.cr3Loads)")
            #expect(c.forks == ref.c.forks && c.exits == ref.c.exits && c.pagesUnmapped == ref.c.pagesUnmapped, "\(where_)")
            #expect(c.opsExecuted == ref.c.opsExecuted, "\(where_)")
            #expect(readSum == ref.readSum, "\(where_): read_sum")
        }
    }

    @Test("Demand paging: closed forms (one #PF and one PTE write per page, a table page per 512 pages)")
    func demandClosedForm() throws {
        let pages = 1100
        let (c, readSum, _) = try Self.run(Self.scripts[0].1, .shadow)
        #expect(c.guestPageFaults == UInt64(pages) && c.demandZero == UInt64(pages) && c.leafWrites == UInt64(pages))
        // PDPT, PD and ceil(pages / 512) page tables, each linked by one entry write.
        let tables = UInt64(2 + (pages + 511) / 512)
        #expect(c.tablePages == tables && c.tableWrites == tables)
        #expect(c.invlpg == 0 && c.cr3Loads == 0)
        // Root + tables + data frames.
        #expect(c.framesInUse == 1 + tables + UInt64(pages))
        // The reads see the writes: page i holds v(i) = (i + 1) K.
        var sum: UInt64 = 0
        for i in 0..<UInt64(pages) { sum &+= (i + 1) &* Self.k }
        #expect(readSum == sum)
    }

    @Test("mmap churn: closed forms per iteration (80 faults, 240 PTE writes, 32 INVLPGs and 2 CR3 reloads)")
    func churnClosedForm() throws {
        let (c, _, _) = try Self.run(Self.scripts[2].1, .shadow)
        let it: UInt64 = 4
        #expect(c.guestPageFaults == 80 * it && c.leafWrites == 240 * it && c.invlpg == 32 * it && c.fullFlushes == 2 * it && c.cr3Loads == 2 * it)
        // Tables are kept across munmap: PDPT, two PDs and two PTs, made in the first iteration.
        #expect(c.tablePages == 5 && c.tableWrites == 5)
        #expect(c.framesInUse == 1 + 5)
    }

    @Test("After exit every frame of the space is free; copy-on-write leaves each space its own data")
    func exitFreesEverything() throws {
        let base: [GuestOpScript.Op] = [.map(region: 0, pages: 100, writable: true), .touch(region: 0, count: 100, order: .sequential, write: true)]
        let child: [GuestOpScript.Op] = [
            .fork, .switchTo(space: 1), .map(region: 2, pages: 50, writable: true),
            .touch(region: 2, count: 50, order: .sequential, write: true),
            .touch(region: 0, count: 40, order: .sequential, write: true),
            .switchTo(space: 0), .exit(space: 1),
        ]
        let tail: [GuestOpScript.Op] = [.touch(region: 0, count: 100, order: .sequential, write: false)]
        let (without, sumWithout, _) = try Self.run(GuestOpScript(ops: base + tail), .shadow)
        let (with, sumWith, _) = try Self.run(GuestOpScript(ops: base + child + tail), .shadow)
        #expect(with.framesInUse == without.framesInUse, "frames in use \(with.framesInUse) with a child that exited, \(without.framesInUse) without")
        // The parent's final reads see its own values, not the child's: the read_sum counts
        // the parent's 100 writes v(0...99) only, in both runs.
        var parentSum: UInt64 = 0
        for i in 0..<UInt64(100) { parentSum &+= (i + 1) &* Self.k }
        #expect(sumWithout == parentSum && sumWith == parentSum)
        #expect(with.copyOnWriteCopies == 40 && with.pagesUnmapped == 150)
    }

    @Test("Bad scripts are refused with the op's path and the allowed values")
    func badScripts() throws {
        let cases: [(GuestOpScript, String)] = [
            (GuestOpScript(ops: [.map(region: 64, pages: 1, writable: true)]), "ops[0]: region 64: allowed 0...63"),
            (GuestOpScript(ops: [.loop(count: 1, body: [.map(region: 0, pages: 0, writable: true)])]), "ops[0].body[0] (map): pages 0"),
            (GuestOpScript(ops: [.touch(region: 0, count: 1, order: .sequential, write: false)]), "ops[0]: region 0 is not mapped in space 0"),
            (GuestOpScript(ops: [.switchTo(space: 2)]), "ops[0]: space 2 does not exist"),
            (GuestOpScript(ops: [.exit(space: 0)]), "ops[0] (exit): space 0 is the current space"),
            (GuestOpScript(ops: [.map(region: 0, pages: 1, writable: false), .touch(region: 0, count: 1, order: .sequential, write: true)]),
             "ops[1] (touch): a write to read-only region 0"),
        ]
        for (script, message) in cases {
            do {
                _ = try Self.run(script, .native)
                Issue.record("accepted: \(message)")
            } catch let e as InputError {
                #expect(e.message.contains(message), "\(e.message)")
            }
        }
    }

    @Test("Under shadow paging the guest's PTE writes reach KVM's mechanisms: fork makes mmu_pte_write or unsync, INVLPGs exit")
    func shadowSeesTheWrites() throws {
        let (c, _, counters) = try Self.run(Self.scripts[3].1, .shadow)
        #expect(counters[.invlpg] == c.invlpg && c.invlpg > 0)
        #expect(counters[.pfGuest] == c.guestPageFaults)
        #expect(counters[.mmuPteWrite] + counters[.shadowResyncs] > 0)
    }
}
