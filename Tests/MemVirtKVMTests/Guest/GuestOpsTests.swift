import Foundation
import MemVirtCore
import Testing
@testable import MemVirtKVM

/// A page-level reference of the guest kernel's policy (SimulatedGuestKernel's, as
/// docs/guest-ops.md states it), written here independently of guest_ops.c: no page tables,
/// only which pages each space maps to which frame, with which rights, what each frame holds
/// in word 0, and which page directories / page tables exist. Its counts are the oracle.
struct ReferenceGuestKernel {
    struct Region { var pages: Int; var writable: Bool; var mapped: Bool }
    struct PTE { var frame: Int; var writable: Bool }
    struct Space {
        var regions: [Int: Region] = [:]
        var ptes: [Int: [Int: PTE]] = [:]     // region -> page -> entry
        var tables: Set<Int> = []             // page directories (-1 - region) and page tables (region << 9 | pt)
        var pcid = 0
    }
    var spaces: [Int: Space] = [0: Space(pcid: 1)]
    var current = 0
    var word0: [Int: UInt64] = [:]            // frame -> word 0
    var mappings: [Int: Int] = [:]            // frame -> PTEs naming it
    var nextFrame = 0
    var nextPCID = 2
    var rng: SplitMix64
    let pcid: Bool
    let ceiling: Int
    let kernelEntries: Int

    var guestPF: UInt64 = 0, demandZero: UInt64 = 0, cowFaults: UInt64 = 0, cowCopies: UInt64 = 0
    var leafWrites: UInt64 = 0, tableWrites: UInt64 = 0, kernelWrites: UInt64 = 0
    var invlpg: UInt64 = 0, cr3Loads: UInt64 = 0, cr3NoFlush: UInt64 = 0, fullFlushes: UInt64 = 0
    var framesInUse: UInt64 = 2, peakFrames: UInt64 = 2, tablePages: UInt64 = 0
    var touches: UInt64 = 0, reads: UInt64 = 0, writes: UInt64 = 0, readSum: UInt64 = 0, pagesUnmapped: UInt64 = 0
    var forks: UInt64 = 0, exits: UInt64 = 0

    init(_ script: GuestOpScript, ceiling: Int = 33, kernelEntries: Int = 1) {
        rng = SplitMix64(seed: script.seed)
        pcid = script.pcid
        self.ceiling = ceiling
        self.kernelEntries = kernelEntries
        run(script.ops)
    }

    mutating func alloc() -> Int {
        framesInUse += 1
        peakFrames = max(peakFrames, framesInUse)
        nextFrame += 1
        return nextFrame
    }
    mutating func release(_ f: Int) {
        mappings[f]! -= 1
        if mappings[f] == 0 { mappings[f] = nil; word0[f] = nil; framesInUse -= 1 }
    }
    mutating func flush(_ n: Int) {
        if n == 0 { return }
        if n <= ceiling { invlpg += UInt64(n) } else { cr3Loads += 1; fullFlushes += 1 }
    }
    /// The tables on the way to `page` of region `r` in space `id`, built where missing.
    mutating func buildTables(_ id: Int, _ r: Int, _ page: Int) {
        for t in [-1 - r, (r << 9) | (page >> 9)] where !spaces[id]!.tables.contains(t) {
            spaces[id]!.tables.insert(t)
            tableWrites += 1
            tablePages += 1
            framesInUse += 1
            peakFrames = max(peakFrames, framesInUse)
        }
    }

    mutating func access(_ r: Int, _ page: Int, write: Bool) {
        let id = current
        if spaces[id]!.ptes[r]?[page] == nil {
            guestPF += 1
            demandZero += 1
            let f = alloc()
            mappings[f] = 1
            word0[f] = 0
            buildTables(id, r, page)
            spaces[id]!.ptes[r, default: [:]][page] = PTE(frame: f, writable: spaces[id]!.regions[r]!.writable)
            leafWrites += 1
        }
        var e = spaces[id]!.ptes[r]![page]!
        if write && !e.writable {
            guestPF += 1
            cowFaults += 1
            if mappings[e.frame]! > 1 {
                let f = alloc()
                mappings[f] = 1
                word0[f] = word0[e.frame]
                release(e.frame)
                e.frame = f
                cowCopies += 1
            }
            e.writable = true
            spaces[id]!.ptes[r]![page] = e
            leafWrites += 1
            invlpg += 1
        }
        let v = (touches &+ 1) &* 0x9E37_79B9_7F4A_7C15
        if write { word0[e.frame] = v; writes += 1 } else { readSum &+= word0[e.frame]!; reads += 1 }
        touches += 1
    }

    mutating func run(_ ops: [GuestOpScript.Op]) {
        for op in ops {
            switch op {
            case .map(let r, let pages, let w):
                spaces[current]!.regions[r] = Region(pages: pages, writable: w, mapped: true)
            case .touch(let r, let count, let order, let write):
                let pages = spaces[current]!.regions[r]!.pages
                for i in 0..<count { access(r, order == .uniform ? Int(rng.bounded(UInt64(pages))) : i % pages, write: write) }
            case .protect(let r, let w):
                var n = 0
                for (page, e) in spaces[current]!.ptes[r] ?? [:] {
                    spaces[current]!.ptes[r]![page]!.writable = w && mappings[e.frame] == 1
                    n += 1
                }
                leafWrites += UInt64(n)
                flush(n)
                spaces[current]!.regions[r]!.writable = w
            case .unmap(let r):
                let ptes = spaces[current]!.ptes[r] ?? [:]
                for e in ptes.values { release(e.frame) }
                spaces[current]!.ptes[r] = nil
                leafWrites += UInt64(ptes.count)
                pagesUnmapped += UInt64(ptes.count)
                flush(ptes.count)
                spaces[current]!.regions[r]!.mapped = false
            case .fork:
                let id = (0...).first { spaces[$0] == nil }!
                var pcidValue = nextPCID
                while spaces.values.contains(where: { $0.pcid == pcidValue }) { pcidValue += 1 }
                nextPCID = pcidValue + 1
                spaces[id] = Space(regions: spaces[current]!.regions.filter { $0.value.mapped }, pcid: pcidValue)
                framesInUse += 2
                peakFrames = max(peakFrames, framesInUse)
                tablePages += 2
                kernelWrites += UInt64(2 + kernelEntries)
                var changed = 0
                for r in (spaces[current]!.ptes.keys).sorted() {
                    for page in spaces[current]!.ptes[r]!.keys.sorted() {
                        var e = spaces[current]!.ptes[r]![page]!
                        if e.writable { e.writable = false; spaces[current]!.ptes[r]![page] = e; leafWrites += 1; changed += 1 }
                        mappings[e.frame]! += 1
                        buildTables(id, r, page)
                        spaces[id]!.ptes[r, default: [:]][page] = e
                        leafWrites += 1
                    }
                }
                flush(changed)
                forks += 1
            case .switchTo(let id):
                cr3Loads += 1
                if pcid { cr3NoFlush += 1 }
                current = id
            case .exit(let id):
                let s = spaces[id]!
                for ptes in s.ptes.values {
                    for e in ptes.values { release(e.frame) }
                    leafWrites += UInt64(ptes.count)
                    pagesUnmapped += UInt64(ptes.count)
                }
                framesInUse -= UInt64(2 + s.tables.count)
                spaces[id] = nil
                exits += 1
            case .loop(let count, let body):
                for _ in 0..<count { run(body) }
            }
        }
    }

    /// guest_ops.c's final_checksum over this state.
    var checksum: UInt64 {
        var h: UInt64 = 0
        for id in spaces.keys.sorted() {
            let s = spaces[id]!
            for (r, reg) in s.regions where reg.mapped {
                for (page, e) in s.ptes[r] ?? [:] {
                    let k = (UInt64(id * 64 + r) << 18) | UInt64(page)
                    h &+= word0[e.frame]! &* (2 &* k &+ 1)
                }
            }
        }
        return h
    }
}

@Suite("A guest that edits its own page tables on /dev/kvm", .serialized, .enabled(if: KVM.isUsable, Comment(rawValue: kvmReason)))
struct GuestOpsTests {
    /// Every guest-side count against the reference; KVM's pf_guest and invlpg against the
    /// guest's own.
    func check(_ name: String, _ script: GuestOpScript) throws -> GuestOpsResult {
        let r = try GuestOpsRunner.run(script)
        let ref = ReferenceGuestKernel(script)
        let g = r.guest
        #expect(g.spuriousFaults == 0, "\(name): spurious faults \(g.spuriousFaults)")
        #expect(g.guestPageFaults == ref.guestPF, "\(name): guest #PFs \(g.guestPageFaults), reference \(ref.guestPF)")
        #expect(g.demandZero == ref.demandZero, "\(name): demand-zero \(g.demandZero), reference \(ref.demandZero)")
        #expect(g.copyOnWriteFaults == ref.cowFaults && g.copyOnWriteCopies == ref.cowCopies,
                "\(name): COW \(g.copyOnWriteFaults)/\(g.copyOnWriteCopies), reference \(ref.cowFaults)/\(ref.cowCopies)")
        #expect(g.leafWrites == ref.leafWrites, "\(name): PTE writes \(g.leafWrites), reference \(ref.leafWrites)")
        #expect(g.tableWrites == ref.tableWrites, "\(name): table entry writes \(g.tableWrites), reference \(ref.tableWrites)")
        #expect(g.kernelWrites == ref.kernelWrites, "\(name): kernel entry writes \(g.kernelWrites), reference \(ref.kernelWrites)")
        #expect(g.invlpg == ref.invlpg, "\(name): INVLPGs \(g.invlpg), reference \(ref.invlpg)")
        #expect(g.cr3Loads == ref.cr3Loads && g.fullFlushes == ref.fullFlushes && g.cr3NoFlush == ref.cr3NoFlush,
                "\(name): CR3 loads \(g.cr3Loads) (full flushes \(g.fullFlushes), no-flush \(g.cr3NoFlush)), reference \(ref.cr3Loads) (\(ref.fullFlushes), \(ref.cr3NoFlush))")
        #expect(g.framesInUse == ref.framesInUse && g.peakFrames == ref.peakFrames,
                "\(name): frames in use \(g.framesInUse) peak \(g.peakFrames), reference \(ref.framesInUse) peak \(ref.peakFrames)")
        #expect(g.tablePages == ref.tablePages, "\(name): table pages \(g.tablePages), reference \(ref.tablePages)")
        #expect(g.touches == ref.touches && g.reads == ref.reads && g.writes == ref.writes)
        #expect(g.pagesUnmapped == ref.pagesUnmapped && g.forks == ref.forks && g.exits == ref.exits)
        // The data: what the reads saw and what every live space holds at the end.
        #expect(g.readSum == ref.readSum, "\(name): read_sum \(g.readSum), reference \(ref.readSum)")
        #expect(g.checksum == ref.checksum, "\(name): checksum \(g.checksum), reference \(ref.checksum)")
        // KVM delivered every #PF the guest handled, and saw every INVLPG it ran.
        #expect(r.kvm("pf_guest") == g.guestPageFaults, "\(name): KVM pf_guest \(r.kvm("pf_guest")), guest handled \(g.guestPageFaults)")
        #expect(r.kvm("invlpg") == g.invlpg, "\(name): KVM invlpg \(r.kvm("invlpg")), guest ran \(g.invlpg)")
        #expect(r.wallSeconds > 0 && r.cpuSeconds > 0)
        // The plan's frame bound (the pool's size) holds what the guest kernel used.
        let bound = try GuestOpsPlan(script).peakFramesBound
        #expect(UInt64(bound) >= g.peakFrames, "\(name): bound \(bound) < peak \(g.peakFrames)")
        return r
    }

    @Test("demand paging through the guest's own #PF handler: N pages, N #PFs, N PTE writes")
    func demandPaging() throws {
        let pages = 512
        let script = GuestOpScript(ops: [
            .map(region: 0, pages: pages, writable: true),
            .touch(region: 0, count: pages, order: .sequential, write: true),
            .touch(region: 0, count: pages, order: .sequential, write: false),
        ])
        let r = try check("demand", script)
        // Closed forms: one #PF and one PTE write per page; one page directory and one page
        // table (512 pages fit one table): two table entries; no INVLPG, no CR3 load.
        #expect(r.guest.guestPageFaults == UInt64(pages))
        #expect(r.guest.leafWrites == UInt64(pages))
        #expect(r.guest.tableWrites == 2)
        #expect(r.guest.invlpg == 0 && r.guest.cr3Loads == 0)
        // Reads see the written values: sum of v(n) for n < pages.
        var sum: UInt64 = 0
        for n in 0..<UInt64(pages) { sum &+= (n + 1) &* 0x9E37_79B9_7F4A_7C15 }
        #expect(r.guest.readSum == sum)
    }

    @Test("fork of P present writable pages: P parent write-protects, P child PTEs; KVM's mmu_pte_write or unsync and invlpg move")
    func forkClosedForm() throws {
        let p = 20
        let script = GuestOpScript(ops: [
            .map(region: 0, pages: p, writable: true),
            .touch(region: 0, count: p, order: .sequential, write: true),
            .fork,
            .switchTo(space: 1),
            .touch(region: 0, count: p, order: .sequential, write: true),
            .switchTo(space: 0),
        ])
        let r = try check("fork", script)
        // P demand faults + P write-protects + P child entries + P COW breaks in the child.
        #expect(r.guest.leafWrites == UInt64(4 * p))
        #expect(r.guest.copyOnWriteCopies == UInt64(p))
        // P <= 33: the parent's pages are flushed one by one; each COW break INVLPGs.
        #expect(r.guest.invlpg == UInt64(2 * p))
        #expect(r.kvm("mmu_pte_write") + r.kvm("mmu_unsync") > 0, "KVM saw no guest page-table write: \(r.kvm)")
    }

    @Test("every named script (quick) against the reference; fork/COW/exit exercises KVM's shadow sync")
    func namedScripts() throws {
        let pcid = try GuestOpsRunner.pcidOffered()
        for name in GuestOpScript.names {
            let script = GuestOpScript.named(name, quick: true)!
            if script.pcid && !pcid {
                // This host's KVM (kvm_pvm) offers no PCID: the runner must refuse, saying why.
                #expect(throws: KVMError.self) { _ = try GuestOpsRunner.run(script) }
                do { _ = try GuestOpsRunner.run(script) } catch { #expect("\(error)".contains("does not offer PCID"), "\(error)") }
                continue
            }
            let r = try check(name, script)
            print("guest-ops \(name) quick: \(r.json.rendered())")
            if name == "fork-cow-exit" || name == "pt-update-heavy" {
                #expect(r.kvm("mmu_pte_write") + r.kvm("mmu_unsync") > 0, "\(name): \(r.kvm)")
                #expect(r.kvm("invlpg") > 0, "\(name): \(r.kvm)")
            }
        }
    }

    @Test("a pool too small for the script stops the guest kernel with a clear error, not a crash")
    func poolExhausted() throws {
        var o = GuestOpsOptions()
        o.poolFrames = 8
        o.realtime = false
        // A 2 MiB pool (512 frames; 8 asked, rounded up) against 1,000 pages.
        let script = GuestOpScript(ops: [.map(region: 0, pages: 1000, writable: true), .touch(region: 0, count: 1000, order: .sequential, write: true)])
        do {
            _ = try GuestOpsRunner.run(script, options: o)
            Issue.record("a 512-frame pool held 1,000 pages")
        } catch {
            #expect("\(error)".contains("frame pool (512 frames) is exhausted"), "\(error)")
        }
    }

    @Test("bad scripts are refused before any VM, naming the op")
    func badScripts() {
        func message(_ s: GuestOpScript) -> String {
            do { _ = try GuestOpsPlan(s); return "" } catch { return error.message }
        }
        #expect(message(GuestOpScript(ops: [.touch(region: 0, count: 1, order: .sequential, write: false)])).contains("ops[0] (touch): region 0 is not mapped"))
        #expect(message(GuestOpScript(ops: [.map(region: 64, pages: 1, writable: true)])).contains("ops[0]: region 64"))
        #expect(message(GuestOpScript(ops: [.map(region: 0, pages: 1, writable: false), .touch(region: 0, count: 1, order: .sequential, write: true)])).contains("read-only"))
        #expect(message(GuestOpScript(ops: [.exit(space: 0)])).contains("is current"))
        #expect(message(GuestOpScript(ops: [.loop(count: 2, body: [.fork, .switchTo(space: 1), .exit(space: 1)])])).contains("ops[0].body (iteration 1)[2] (exit)"))
        #expect(message(GuestOpScript(ops: [.switchTo(space: 3)])).contains("space 3 does not exist"))
        #expect(message(GuestOpScript(ops: [.map(region: 0, pages: 1 << 19, writable: true)])).contains("a region holds 1...262144"))
        #expect(message(GuestOpScript(ops: [.map(region: 0, pages: 1, writable: true), .touch(region: 0, count: 1 << 37, order: .uniform, write: false)])).contains("more than"))
        #expect(message(GuestOpScript(ops: [.loop(count: 64, body: [.fork])])).contains("64 spaces are live already"))
    }
}

@Suite("memvirt kvm ops from the command line", .serialized,
       .enabled(if: KVM.isUsable && memvirtBinary != nil, Comment(rawValue: "\(kvmReason); \(memvirtReason)")))
struct GuestOpsCLITests {
    @Test("kvm ops fork-cow-exit --quick --json: the guest's counts and KVM's counters; an unknown name is a JSON error")
    func json() throws {
        let r = try memvirt(["kvm", "ops", "fork-cow-exit", "--quick", "--json"])
        #expect(r.status == 0, "\(r.err)")
        let j = try #require(try JSONSerialization.jsonObject(with: Data(r.out.utf8)) as? [String: Any])
        #expect(j["script"] as? String == "fork-cow-exit")
        let guest = try #require(j["guest"] as? [String: Any])
        let kvm = try #require(j["kvm"] as? [String: Any])
        #expect((guest["guest_pf"] as? Int ?? -1) == (kvm["pf_guest"] as? Int ?? -2))
        #expect((guest["forks"] as? Int) == 20)
        #expect((kvm["invlpg"] as? Int ?? 0) > 0)
        #expect(j["exits"] is [String: Any] && j["measured_seconds"] is Double)

        let bad = try memvirt(["kvm", "ops", "no-such-script", "--json"])
        #expect(bad.status != 0)
        let e = try #require(try JSONSerialization.jsonObject(with: Data(bad.out.utf8)) as? [String: Any])
        #expect((e["error"] as? String ?? "").contains("unknown script 'no-such-script'"))
    }
}
