/// A guest that manages its own memory: a script of operations on address spaces, written
/// once and realized by both engines (the model's `SimulatedGuestKernel` and the KVM engine's
/// guest runtime in its page-table-editing mode), as `WorkloadSpec` is for access streams.
///
/// Semantics (both realizations follow them exactly; the model's guest kernel is the policy
/// reference for which PTE writes, INVLPGs and CR3 writes each operation makes):
/// - Space 0 exists at the start and is current. `fork` gives the new space the smallest id
///   no live space has (1, 2, ...; an exited space's id is reused, so a loop body can name
///   the child it forks: `loop(n, [fork, switchTo(1), ..., switchTo(0), exit(1)])`).
/// - A region `r` of a space spans `pages` 4 KiB pages from `regionBase(r)`; regions of one
///   space never overlap (each has its own 1 GiB slot, so its own page-directory entry).
/// - `map` writes no PTE: the first touch of each page is a guest #PF handled by the guest's
///   own handler (a zeroed frame, one PTE write); a write to a copy-on-write page is a guest
///   #PF that copies the page (or takes it over when no other space maps it).
/// - `touch` makes `count` accesses to word 0 of region pages: `sequential` visits page
///   `i mod pages`, `uniform` draws the page with SplitMix64 seeded by the script's seed
///   (one generator for the whole script, in script order). A write stores
///   v(n) = (n + 1) * 0x9E3779B97F4A7C15 (mod 2^64), n counting the script's touch accesses
///   from 0 (reads and writes alike); a read adds the word it sees to `read_sum`.
public struct GuestOpScript: Sendable, Hashable {
    public enum TouchOrder: String, Sendable, Hashable, CaseIterable {
        case sequential, uniform
    }

    public indirect enum Op: Sendable, Hashable {
        /// mmap of `pages` 4 KiB pages as region `region` of the current space.
        case map(region: Int, pages: Int, writable: Bool)
        /// `count` accesses to the current space's region `region`.
        case touch(region: Int, count: Int, order: TouchOrder, write: Bool)
        /// mprotect of the whole region: each present PTE rewritten, the TLB flushed for it.
        case protect(region: Int, writable: Bool)
        /// munmap of the whole region: each present PTE cleared, its frame freed, the TLB flushed.
        case unmap(region: Int)
        /// A new address space copying the current one; writable pages become copy-on-write
        /// (read-only) in both. The current space stays current.
        case fork
        /// A CR3 load of `space` (tagged with its PCID when the script uses PCIDs).
        case switchTo(space: Int)
        /// `space` exits (it must not be current): its frames and page tables are freed.
        case exit(space: Int)
        /// `count` times `body`.
        case loop(count: Int, body: [Op])
    }

    public var ops: [Op]
    /// CR3 loads keep other spaces' TLB entries (CR4.PCIDE, the no-flush bit) when true.
    public var pcid: Bool
    public var seed: UInt64

    public init(ops: [Op], pcid: Bool = false, seed: UInt64 = 1) {
        self.ops = ops
        self.pcid = pcid
        self.seed = seed
    }

    /// The first byte of region `region`'s 1 GiB slot.
    public static func regionBase(_ region: Int) -> UInt64 { WorkloadSpec.defaultBase.rawValue + (UInt64(region) << 30) }
    /// Regions per space (each a 1 GiB slot).
    public static let maxRegions = 64
}
