import MemVirtCore
import Testing

@testable import MemVirtModel

/// The guest kernel's string stores (`rep stosq` zeroing, `rep movsq` copying a frame) into
/// frames KVM shadows, and its direct map under a new shadow root, each against the counts
/// KVM's rules give (arch/x86/kvm/mmu/mmu.c, x86.c), derived here case by case.
@Suite("Shadow MMU: string stores into shadowed frames, the direct map under a new root")
struct ShadowStringWriteTests {
    /// Runs `body` on a shadow-paged machine whose kernel reaches guest memory through a
    /// direct map (as the KVM engine's guest), space 0 loaded.
    static func withMachine(_ body: @escaping (Machine<ShadowPaging>, ShadowPaging) throws -> Void) throws {
        var config = ModelConfig()
        config.paging = .shadow
        config.shadow.guestDirectMap = true
        try ModelEngine.withMachine(config: config, capacity: 1 << 30, MachineBody { r in
            let m = try #require(r as? Machine<ShadowPaging>)
            m.switchAddressSpace(to: m.space)
            try body(m, m.mode)
        })
    }

    static func frame(_ m: Machine<ShadowPaging>) throws -> UInt64 {
        guard let f = m.kernel.frames.allocate(.size4K) else { throw InputError("test: guest memory exhausted") }
        return f
    }

    /// Counter deltas over `body`.
    static func delta(_ m: Machine<ShadowPaging>, _ body: () throws -> Void) rethrows -> [Counter: UInt64] {
        let counters: [Counter] = [.pfTaken, .pfFixed, .pfEmulate, .pfSpurious, .mmuPteWrite, .insnEmulation, .mmuShadowZapped]
        let before = counters.map { m.cpu.counters[$0] }
        try body()
        var d: [Counter: UInt64] = [:]
        for (c, b) in zip(counters, before) { d[c] = m.cpu.counters[c] - b }
        return d
    }

    /// A frame the kernel has written once through its direct map (its spte present and
    /// writable), under a root that has linked the map.
    static func writtenFrame(_ m: Machine<ShadowPaging>) throws -> UInt64 {
        let f = try frame(m)
        m.mode.guestMemory.write64(f, 1)
        return f
    }

    @Test("Into a frame shadowed only at level 1: one fault, the page goes unsync (mmu_try_to_unsync_pages), the string runs natively")
    func leafOnly() throws {
        try Self.withMachine { m, s in
            let f = try Self.writtenFrame(m)
            s.shadowGuestTable(gfn: f >> 12, level: 1, cpu: m.cpu)
            #expect(s.isWriteProtected(f >> 12))
            let d = Self.delta(m) { m.mode.guestMemory.zero(f, bytes: 4096) }
            // The first store faults (write-protected); make_spte unsyncs the level-1 page and
            // maps the frame writable: RET_PF_FIXED. The other 511 stores run natively.
            #expect(d[.pfTaken] == 1 && d[.pfFixed] == 1, "\(d)")
            #expect(d[.pfEmulate] == 0 && d[.mmuPteWrite] == 0 && d[.mmuShadowZapped] == 0, "\(d)")
            #expect(!s.isWriteProtected(f >> 12))
            // Written again: no fault (writable spte, unsync page).
            let again = Self.delta(m) { m.mode.guestMemory.zero(f, bytes: 4096) }
            #expect(again[.pfTaken] == 0, "\(again)")
        }
    }

    @Test("Into an upper-level table that is no root in use: one pf_emulate, the gfn unprotected, the string retried natively (no mmu_pte_write), its first store refaulting writable")
    func upperLevelRetried() throws {
        for level in [2, 3] {
            try Self.withMachine { m, s in
                let f = try Self.writtenFrame(m)
                s.shadowGuestTable(gfn: f >> 12, level: level, cpu: m.cpu)
                let d = Self.delta(m) { m.mode.guestMemory.zero(f, bytes: 4096) }
                // Fault 1: write-tracked gfn -> RET_PF_EMULATE -> x86_emulate_instruction; `stos` is
                // not a page-table-writing instruction, so kvm_mmu_unprotect_gfn_and_retry zaps the
                // gfn's one shadow page (onto the invalid list) and the guest re-executes. Fault 2:
                // the re-executed store through the read-only spte, now untracked: fixed writable.
                #expect(d[.pfEmulate] == 1 && d[.insnEmulation] == 1, "level \(level): \(d)")
                #expect(d[.mmuPteWrite] == 0, "level \(level): \(d)")
                #expect(d[.mmuShadowZapped] == 1, "level \(level): \(d)")
                #expect(d[.pfFixed] == 1 && d[.pfTaken] == 2, "level \(level): \(d)")
                #expect(s.byGfn[f >> 12] == nil && !s.isWriteProtected(f >> 12))
                let again = Self.delta(m) { m.mode.guestMemory.write64(f + 8, 2) }
                #expect(again[.pfTaken] == 0, "level \(level): \(again)")
            }
        }
    }

    @Test("Into a root in use (cached or current): the retry is refused, the whole string emulated, one tracked 8-byte write per element (512 per 4 KiB)")
    func rootInUseEmulated() throws {
        try Self.withMachine { m, s in
            let a = m.space
            let b = try m.kernel.createAddressSpace()
            m.switchAddressSpace(to: b)
            // a's root is a cached previous root (root_count > 0): __kvm_mmu_prepare_zap_page only
            // unlinks it, nothing goes on the invalid list, kvm_mmu_unprotect_gfn_and_retry
            // refuses, and the emulator runs `rep stosq` element by element, each a write
            // kvm_mmu_track_write counts.
            let elements = UInt64(4096 / 8)
            let d = Self.delta(m) { m.mode.guestMemory.zero(a.root, bytes: 4096) }
            #expect(d[.pfEmulate] == 1 && d[.pfTaken] == 1, "\(d)")
            #expect(d[.mmuPteWrite] == elements, "\(d)")
            #expect(d[.pfFixed] == 0, "\(d)")
            #expect(!s.isWriteProtected(a.root >> 12))
            // The emulator wrote around the read-only spte: the kernel's next store faults.
            let next = Self.delta(m) { m.mode.guestMemory.write64(a.root, 0) }
            #expect(next[.pfFixed] == 1 && next[.pfTaken] == 1, "\(next)")
            // The current root: the same, and it stays the current root.
            let current = s.currentRoot
            let dc = Self.delta(m) { m.mode.guestMemory.zero(b.root, bytes: 4096) }
            #expect(dc[.pfEmulate] == 1 && dc[.mmuPteWrite] == elements && dc[.pfFixed] == 0, "\(dc)")
            #expect(s.currentRoot == current && s.pages[current].live)
        }
    }

    @Test("A new shadow root links the direct map on the kernel's first access there: one fault, fixed when make_spte changes the leaf, spurious when not, none extra when the access faults anyway")
    func directMapUnderNewRoot() throws {
        try Self.withMachine { m, s in
            // The spaces first (their roots are zeroed through the map, which sets D in those
            // 2 MiB guest pages); x and y in a 2 MiB page nothing has written yet.
            var spaces = try (0..<5).map { _ in try m.kernel.createAddressSpace() }
            var x = try Self.frame(m)
            while spaces.contains(where: { $0.root >> 21 == x >> 21 }) || m.space.root >> 21 == x >> 21 { x = try Self.frame(m) }
            let y = try Self.frame(m)
            func newRoot() throws { m.switchAddressSpace(to: spaces.removeFirst()) }
            // Under space 0: x read (its 2 MiB guest page clean: a read-only clean spte).
            _ = m.mode.guestMemory.read64(x)
            try newRoot()
            // A read of x: the new root's map entry is empty (a fault); FNAME(fetch) rewrites
            // x's spte as the same read-only clean spte: RET_PF_SPURIOUS.
            var d = Self.delta(m) { _ = m.mode.guestMemory.read64(x) }
            #expect(d[.pfTaken] == 1 && d[.pfSpurious] == 1 && d[.pfFixed] == 0, "read, unchanged: \(d)")
            // A second access under the same root: linked, no fault.
            d = Self.delta(m) { _ = m.mode.guestMemory.read64(x) }
            #expect(d[.pfTaken] == 0, "linked: \(d)")
            try newRoot()
            // A write to x's read-only spte faults anyway: one fault (fixed), nothing extra.
            d = Self.delta(m) { m.mode.guestMemory.write64(x, 5) }
            #expect(d[.pfTaken] == 1 && d[.pfFixed] == 1 && d[.pfSpurious] == 0, "write, read-only: \(d)")
            try newRoot()
            // A read of x (writable and dirty, the 2 MiB page dirty): make_spte gives W and D
            // again, the same spte: spurious.
            d = Self.delta(m) { _ = m.mode.guestMemory.read64(x) }
            #expect(d[.pfTaken] == 1 && d[.pfSpurious] == 1 && d[.pfFixed] == 0, "read, writable: \(d)")
            // x becomes a shadowed table: spte_write_protect clears W, keeps D.
            s.shadowGuestTable(gfn: x >> 12, level: 3, cpu: m.cpu)
            try newRoot()
            // A read now gets a read-only clean spte (no W, so no D): it differs, fixed.
            d = Self.delta(m) { _ = m.mode.guestMemory.read64(x) }
            #expect(d[.pfTaken] == 1 && d[.pfFixed] == 1 && d[.pfSpurious] == 0, "read, write-protected dirty: \(d)")
            try newRoot()
            // A first access to a frame never mapped: its own fault links the root, one fault.
            d = Self.delta(m) { _ = m.mode.guestMemory.read64(y + 0x1000 * 16) }
            #expect(d[.pfTaken] == 1 && d[.pfFixed] == 1 && d[.pfSpurious] == 0, "absent: \(d)")
        }
    }
}
