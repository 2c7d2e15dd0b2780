import MemVirtCore
import Testing

@testable import MemVirtModel

/// Hand-built tables: every entry written here bit by bit, so the walker is checked against
/// the SDM's rules, not against the builder it shares code with.
struct HandBuiltTables {
    let memory: PhysicalMemory
    var next: UInt64 = 0x10000
    let root: UInt64
    let levels: Int

    init(levels: Int = 4) throws {
        memory = try PhysicalMemory(capacity: 1 << 32, name: "test")
        self.levels = levels
        root = 0x1000
    }

    mutating func newTable() -> UInt64 {
        defer { next += 0x1000 }
        return next
    }

    /// Maps `va` to `pa` with raw leaf bits `leafBits` at `leafLevel`; intermediate entries get `upperBits`.
    mutating func map(_ va: UInt64, to pa: UInt64, leafLevel: Int = 1, leafBits: UInt64 = 0x7, upperBits: UInt64 = 0x7) {
        var table = root
        var level = levels
        while level > leafLevel {
            let idx = (va >> UInt64(12 + 9 * (level - 1))) & 0x1ff
            let ea = table + idx * 8
            var e = memory.read64(ea)
            if e & 1 == 0 {
                e = newTable() | upperBits
                memory.write64(ea, e)
            }
            table = e & 0x000F_FFFF_FFFF_F000
            level -= 1
        }
        let idx = (va >> UInt64(12 + 9 * (level - 1))) & 0x1ff
        memory.write64(table + idx * 8, pa | leafBits | (leafLevel > 1 ? 0x80 : 0))
    }

    func entry(_ va: UInt64, level: Int) -> UInt64 {
        var table = root
        var l = levels
        while true {
            let idx = (va >> UInt64(12 + 9 * (l - 1))) & 0x1ff
            let e = memory.read64(table + idx * 8)
            if l == level { return e }
            table = e & 0x000F_FFFF_FFFF_F000
            l -= 1
        }
    }

    func walk(_ va: UInt64, _ kind: AccessKind, _ mode: PrivilegeMode = .user, config: PagingConfig? = nil) -> WalkResult {
        var m = DirectTableMemory(memory)
        return PageWalker.walk(
            va, root: root, kind: kind, mode: mode, pcid: 1, config: config ?? PagingConfig(levels: levels), caches: nil,
            memory: &m)
    }
}

@Suite("Page walker on hand-built tables")
struct PageWalkerTests {
    @Test("Given 4 levels, when a 4K page is walked, then 4 references are made and A bits are set on all levels")
    func fourLevelWalk() throws {
        var t = try HandBuiltTables()
        let va: UInt64 = 0x0000_7F12_3456_7000
        t.map(va, to: 0x5555_5000)
        let r = t.walk(va | 0x123, .read)
        #expect(r.kind == .translated)
        #expect(r.refs == 4)
        #expect(r.entry.base == 0x5555_5000)
        #expect(r.entry.size == .size4K)
        for level in 1...4 { #expect(t.entry(va, level: level) & (1 << 5) != 0, "A bit at level \(level)") }
        #expect(t.entry(va, level: 1) & (1 << 6) == 0, "a read does not set D")
        #expect(r.adWrites == 4)
    }

    @Test("A write sets D on the leaf only; a second walk writes nothing back")
    func dirtyBit() throws {
        var t = try HandBuiltTables()
        let va: UInt64 = 0x4000_0000
        t.map(va, to: 0x9000)
        _ = t.walk(va, .write)
        #expect(t.entry(va, level: 1) & 0x60 == 0x60)
        for level in 2...4 { #expect(t.entry(va, level: level) & 0x40 == 0, "D is not set on non-leaf level \(level)") }
        let again = t.walk(va, .write)
        #expect(again.adWrites == 0)
    }

    @Test("Given 5 levels, a 4K walk makes 5 references", arguments: [4, 5])
    func levels(_ levels: Int) throws {
        var t = try HandBuiltTables(levels: levels)
        let va: UInt64 = levels == 5 ? 0x00AB_CDEF_1234_5000 & ((1 << 56) - 1) : 0x7ABC_DEF1_2000
        t.map(va, to: 0x7000)
        let r = t.walk(va, .read)
        #expect(r.kind == .translated)
        #expect(r.refs == levels)
    }

    @Test("Large pages end the walk early: 2M after 3 references, 1G after 2")
    func largePages() throws {
        var t = try HandBuiltTables()
        t.map(0x4000_0000, to: 0x8000_0000, leafLevel: 3)
        t.map(0x8020_0000, to: 0x0060_0000, leafLevel: 2)
        let g = t.walk(0x4000_0000 + 0x1234_5678, .read)
        #expect(g.refs == 2 && g.entry.size == .size1G && g.entry.base == 0x8000_0000)
        let m = t.walk(0x8020_0000 + 0x1_2345, .read)
        #expect(m.refs == 3 && m.entry.size == .size2M && m.entry.base == 0x0060_0000)
    }

    @Test("Not present: error code has P=0 and the access bits")
    func notPresent() throws {
        var t = try HandBuiltTables()
        t.map(0x1000_0000, to: 0x3000)
        let r = t.walk(0x1000_1000, .write)  // same PT, next entry empty
        #expect(r.kind == .fault(PageFaultErrorCode(rawValue: 0b110)))
        #expect(r.faultLevel == 1)
        let top = t.walk(0x7000_0000_0000, .read, .supervisor)  // empty PML4 slot
        #expect(top.kind == .fault(PageFaultErrorCode(rawValue: 0)))
        #expect(top.faultLevel == 4 && top.refs == 1)
    }

    @Test("Write to a read-only page: P=1 W=1 U=1 (0x7); supervisor write honours CR0.WP")
    func writeProtection() throws {
        var t = try HandBuiltTables()
        t.map(0x2000_0000, to: 0x3000, leafBits: 0x5)  // P U, no W
        #expect(t.walk(0x2000_0000, .write).kind == .fault(PageFaultErrorCode(rawValue: 0x7)))
        #expect(t.walk(0x2000_0000, .write, .supervisor).kind == .fault(PageFaultErrorCode(rawValue: 0x3)))
        let noWP = t.walk(0x2000_0000, .write, .supervisor, config: PagingConfig(writeProtect: false))
        #expect(noWP.kind == .translated)
    }

    @Test("User access to a supervisor page: P=1 U=1; an upper-level U=0 is enough")
    func userSupervisor() throws {
        var t = try HandBuiltTables()
        t.map(0x3000_0000, to: 0x4000, leafBits: 0x3)  // P W, supervisor
        #expect(t.walk(0x3000_0000, .read).kind == .fault(PageFaultErrorCode(rawValue: 0x5)))
        #expect(t.walk(0x3000_0000, .read, .supervisor).kind == .translated)
        var u = try HandBuiltTables()
        u.map(0x3000_0000, to: 0x4000, leafBits: 0x7, upperBits: 0x3)
        #expect(u.walk(0x3000_0000, .read).kind == .fault(PageFaultErrorCode(rawValue: 0x5)))
    }

    @Test("NX: a fetch from an XD page faults with I/D set (0x15 for user)")
    func noExecute() throws {
        var t = try HandBuiltTables()
        t.map(0x5000_0000, to: 0x6000, leafBits: 0x7 | (1 << 63))
        #expect(t.walk(0x5000_0000, .execute).kind == .fault(PageFaultErrorCode(rawValue: 0x15)))
        #expect(t.walk(0x5000_0000, .read).kind == .translated)
    }

    @Test("Reserved bits: an address bit above MAXPHYADDR, or PS in a PML4E, sets RSVD (bit 3)")
    func reservedBits() throws {
        var t = try HandBuiltTables()
        t.map(0x6000_0000, to: 0x7000 | (1 << 47), leafBits: 0x7)  // bit 47 >= MAXPHYADDR 46
        #expect(t.walk(0x6000_0000, .read).kind == .fault(PageFaultErrorCode(rawValue: 0x1 | 0x4 | 0x8)))
        var p = try HandBuiltTables()
        p.memory.write64(p.root, 0x20000 | 0x87)  // PML4E with PS=1
        let r = p.walk(0x1000, .read)
        #expect(r.kind == .fault(PageFaultErrorCode(rawValue: 0xD)) && r.faultLevel == 4)
        var q = try HandBuiltTables()
        q.map(0x8000_0000, to: 0x4000_0000 | (1 << 13), leafLevel: 3)  // 1G page with bit 13 set
        #expect(q.walk(0x8000_0000, .read).kind == .fault(PageFaultErrorCode(rawValue: 0xD)))
    }

    @Test("Paging-structure caches: a second walk in the same 2M region makes 1 reference")
    func walkCaches() throws {
        var t = try HandBuiltTables()
        t.map(0x4000_0000, to: 0x1_0000)
        t.map(0x4000_1000, to: 0x2_0000)
        t.map(0x4020_0000, to: 0x3_0000)
        let caches = PagingStructureCaches(config: .goldenCove)
        var m = DirectTableMemory(t.memory)
        let cfg = PagingConfig()
        let a = PageWalker.walk(0x4000_0000, root: t.root, kind: .read, mode: .user, pcid: 1, config: cfg, caches: caches, memory: &m)
        let b = PageWalker.walk(0x4000_1000, root: t.root, kind: .read, mode: .user, pcid: 1, config: cfg, caches: caches, memory: &m)
        let c = PageWalker.walk(0x4020_0000, root: t.root, kind: .read, mode: .user, pcid: 1, config: cfg, caches: caches, memory: &m)
        #expect(a.refs == 4 && !a.walkCacheHit)
        #expect(b.refs == 1 && b.walkCacheHit && b.entry.base == 0x2_0000)
        #expect(c.refs == 2 && c.walkCacheHit && c.entry.base == 0x3_0000)
        let other = PageWalker.walk(0x4000_1000, root: t.root, kind: .read, mode: .user, pcid: 2, config: cfg, caches: caches, memory: &m)
        #expect(other.refs == 4, "another PCID does not hit")
        caches.flush(pcid: 1)
        let d = PageWalker.walk(0x4000_1000, root: t.root, kind: .read, mode: .user, pcid: 1, config: cfg, caches: caches, memory: &m)
        #expect(d.refs == 4)
    }
}
