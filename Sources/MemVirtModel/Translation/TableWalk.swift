import MemVirtCore

/// Where a software descent of a page table stopped: the last entry read.
struct TableStep {
    /// Address of the entry and its raw value, at `level` (1 = the 4 KiB level).
    var entryAddress: UInt64
    var raw: UInt64
    var level: Int
    var isPresent: Bool
    /// Present and mapping a page: a level-1 entry, or a large page at levels 2 and 3.
    var isLeaf: Bool
    /// The page size a leaf maps.
    var size: PageSize { PageSize(leafLevel: level)! }
}

/// The one software walk of the model's radix tables (x86-64 paging structures, EPT tables and
/// shadow tables: 512 entries of 8 bytes, 9 address bits a level), without the hardware's side
/// effects: no references counted, no A/D flags. The hardware walks (`PageWalker`, the 2D walk
/// in `NestedPaging.walkEPT`) count and charge each reference and stay separate.
enum TableWalk {
    /// The entry format: what "present" means (bit 0 in x86-64 paging entries, any of the R/W/X
    /// bits 2:0 in EPT entries). Both keep the large-page flag in bit 7 and the next table in
    /// bits 51:12.
    enum Format { case paging, ept }

    /// The address of `address`'s entry at `level` in the table at `table`.
    @inline(__always) static func entryAddress(_ table: UInt64, _ address: UInt64, level: Int) -> UInt64 {
        table &+ (((address >> UInt64(12 + 9 * (level - 1))) & 511) << 3)
    }

    /// Descends from the table at `root` (level `levels`) toward `address`, reading each entry
    /// with `read` (nil: it cannot be read, and the descent answers nil). Stops at the first
    /// entry that is not present or maps a page, or at level `floor`.
    static func descend(_ format: Format, root: UInt64, levels: Int, address: UInt64, floor: Int = 1,
                        read: (UInt64) -> UInt64?) -> TableStep? {
        var table = root
        var level = levels
        while true {
            let ea = entryAddress(table, address, level: level)
            guard let raw = read(ea) else { return nil }
            let present = format == .paging ? raw & 1 != 0 : raw & 7 != 0
            let leaf = present && (level == 1 || (level <= 3 && raw & 0x80 != 0))
            if !present || leaf || level <= floor {
                return TableStep(entryAddress: ea, raw: raw, level: level, isPresent: present, isLeaf: leaf)
            }
            table = raw & PageTableEntry.addressMask
            level -= 1
        }
    }
}
