/// The named scripts both engines run (`memvirt validate`'s guest-kernel cases). Each has a
/// `quick` size (a second or so on /dev/kvm here) and a full size (about ten times the work).
extension GuestOpScript {
    /// Every named script, in the order reports list them.
    public static let names = ["demand-sequential", "demand-uniform", "mmap-churn", "fork-cow-exit", "switch", "switch-pcid", "pt-update-heavy"]

    /// The script called `name` (nil for an unknown name: see `names`).
    public static func named(_ name: String, quick: Bool = false, seed: UInt64 = 1) -> GuestOpScript? {
        switch name {
        case "demand-sequential": demandPaging(.sequential, quick: quick, seed: seed)
        case "demand-uniform": demandPaging(.uniform, quick: quick, seed: seed)
        case "mmap-churn": mmapChurn(quick: quick, seed: seed)
        case "fork-cow-exit": forkCopyOnWriteExit(quick: quick, seed: seed)
        case "switch": addressSpaceSwitching(pcid: false, quick: quick, seed: seed)
        case "switch-pcid": addressSpaceSwitching(pcid: true, quick: quick, seed: seed)
        case "pt-update-heavy": pageTableUpdateHeavy(quick: quick, seed: seed)
        default: nil
        }
    }

    /// Demand paging: one writable region of `pages`, written in `order` (`2 * pages` uniform
    /// draws, so some pages are drawn again and some never). Every first touch is a guest #PF
    /// mapping a zeroed frame.
    public static func demandPaging(_ order: TouchOrder, quick: Bool = false, seed: UInt64 = 1) -> GuestOpScript {
        let pages = quick ? 2048 : 16384
        let touches = order == .sequential ? pages : 2 * pages
        return GuestOpScript(ops: [
            .map(region: 0, pages: pages, writable: true),
            .touch(region: 0, count: touches, order: order, write: true),
            .touch(region: 0, count: touches, order: order, write: false),
        ], seed: seed)
    }

    /// mmap/mprotect/munmap churn: per iteration a 16-page region (flushed page by page: 16 <=
    /// the 33-page ceiling) and a 64-page one (flushed by a CR3 reload) are mapped, written,
    /// made read-only, read and unmapped.
    public static func mmapChurn(quick: Bool = false, seed: UInt64 = 1) -> GuestOpScript {
        let body: [Op] = [
            .map(region: 0, pages: 16, writable: true),
            .map(region: 1, pages: 64, writable: true),
            .touch(region: 0, count: 16, order: .sequential, write: true),
            .touch(region: 1, count: 64, order: .sequential, write: true),
            .protect(region: 0, writable: false),
            .protect(region: 1, writable: false),
            .touch(region: 0, count: 16, order: .sequential, write: false),
            .touch(region: 1, count: 64, order: .sequential, write: false),
            .unmap(region: 0),
            .unmap(region: 1),
        ]
        return GuestOpScript(ops: [.loop(count: quick ? 25 : 250, body: body)], seed: seed)
    }

    /// fork/COW/exit: a parent writes 64 pages, then per iteration forks a child that writes
    /// 24 and reads 24 random pages of the shared memory (COW breaks that copy), exits, and
    /// the parent writes 16 random pages (COW breaks that take the frame over, or copy while
    /// a page is still shared). Fork write-protects the parent's writable PTEs: KVM sees
    /// writes to shadowed page tables (mmu_pte_write / unsync) and INVLPGs.
    public static func forkCopyOnWriteExit(quick: Bool = false, seed: UInt64 = 1) -> GuestOpScript {
        GuestOpScript(ops: [
            .map(region: 0, pages: 64, writable: true),
            .touch(region: 0, count: 64, order: .sequential, write: true),
            .loop(count: quick ? 20 : 200, body: [
                .fork,
                .switchTo(space: 1),
                .touch(region: 0, count: 24, order: .uniform, write: true),
                .touch(region: 0, count: 24, order: .uniform, write: false),
                .switchTo(space: 0),
                .exit(space: 1),
                .touch(region: 0, count: 16, order: .uniform, write: true),
            ]),
        ], seed: seed)
    }

    /// Two address spaces (a parent and a forked child, both reading 32 pages) switched back
    /// and forth; with `pcid`, the CR3 loads keep each other's TLB entries (no-flush bit).
    public static func addressSpaceSwitching(pcid: Bool, quick: Bool = false, seed: UInt64 = 1) -> GuestOpScript {
        GuestOpScript(ops: [
            .map(region: 0, pages: 32, writable: false),
            .touch(region: 0, count: 32, order: .sequential, write: false),
            .fork,
            .loop(count: quick ? 200 : 2000, body: [
                .switchTo(space: 1),
                .touch(region: 0, count: 32, order: .sequential, write: false),
                .switchTo(space: 0),
                .touch(region: 0, count: 32, order: .sequential, write: false),
            ]),
        ], pcid: pcid, seed: seed)
    }

    /// A page-table-update-heavy loop (the RVI study's case (a), `ProcessChurnSpec`'s shape):
    /// a parent with a 256-page heap forks; the child writes 100 and reads 100 random heap
    /// pages, "execs" (unmaps the heap, maps and writes a 64-page image), and exits; the
    /// parent writes 32 random heap pages.
    public static func pageTableUpdateHeavy(quick: Bool = false, seed: UInt64 = 1) -> GuestOpScript {
        GuestOpScript(ops: [
            .map(region: 0, pages: 256, writable: true),
            .touch(region: 0, count: 256, order: .sequential, write: true),
            .loop(count: quick ? 10 : 100, body: [
                .fork,
                .switchTo(space: 1),
                .touch(region: 0, count: 100, order: .uniform, write: true),
                .touch(region: 0, count: 100, order: .uniform, write: false),
                .unmap(region: 0),
                .map(region: 1, pages: 64, writable: true),
                .touch(region: 1, count: 64, order: .sequential, write: true),
                .switchTo(space: 0),
                .exit(space: 1),
                .touch(region: 0, count: 32, order: .uniform, write: true),
            ]),
        ], seed: seed)
    }
}
