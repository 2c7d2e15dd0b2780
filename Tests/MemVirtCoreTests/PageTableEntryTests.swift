import MemVirtCore
import Testing

// x86-64 paging-structure entries against the Intel SDM vol. 3, section 4.5, tables 4-15 to
// 4-20 (4-level and 5-level paging). Expected values are literal bit positions from the
// tables, never the code's own constants.

@Suite("PageTableEntry: SDM 4.5 layout")
struct PageTableEntryTests {

    @Test(
        "each flag sits at its SDM bit",
        arguments: [
            (PageTableEntry.Flags.present, 0), (.writable, 1), (.user, 2), (.writeThrough, 3),
            (.cacheDisable, 4), (.accessed, 5), (.dirty, 6), (.pageSize, 7), (.global, 8),
            (.noExecute, 63),
        ] as [(PageTableEntry.Flags, Int)]
    )
    func flagBits(flag: PageTableEntry.Flags, position: Int) {
        #expect(flag.rawValue == bit(position))
        #expect(PageTableEntry(rawValue: bit(position)).has(flag))
        #expect(PageTableEntry(rawValue: bit(position)).flags == flag)
    }

    @Test("each accessor reads exactly its own bit", arguments: 0..<64)
    func accessorsReadOneBit(position: Int) {
        let e = PageTableEntry(rawValue: bit(position))
        #expect(e.isPresent == (position == 0))
        #expect(e.isWritable == (position == 1))
        #expect(e.isUser == (position == 2))
        #expect(e.isAccessed == (position == 5))
        #expect(e.isDirty == (position == 6))
        #expect(e.isLargePage == (position == 7))
        #expect(e.isNoExecute == (position == 63))
        // Bits 51:12 are the address; bits 62:59 the protection key.
        #expect(e.address == ((12...51).contains(position) ? bit(position) : 0))
        #expect(e.protectionKey == ((59...62).contains(position) ? 1 << (position - 59) : 0))
        // Every other bit reads as nothing.
        let all = PageTableEntry(rawValue: ~bit(position))
        #expect(all.isPresent == (position != 0))
        #expect(all.isDirty == (position != 6))
        #expect(all.isNoExecute == (position != 63))
    }

    @Test("the address field is bits 51:12 and the protection key bits 62:59")
    func addressAndKeyFields() {
        #expect(PageTableEntry.addressMask == bits(12, 51))
        #expect(PageTableEntry.protectionKeyShift == 59)
        let e = PageTableEntry(rawValue: 0b1011 << 59 | 0x0000_1234_5678_9000 | 0x67)
        #expect(e.protectionKey == 11)
        #expect(e.address == 0x0000_1234_5678_9000)
        // Everything outside 51:12 is dropped by init(frameAddress:flags:).
        let built = PageTableEntry(frameAddress: 0xFFFF_FFFF_FFFF_FFFF, flags: [.present, .writable])
        #expect(built.rawValue == bits(12, 51) | 0b11)
        let plain = PageTableEntry(frameAddress: 0x0000_0008_0000_0ABC, flags: [.present, .user, .noExecute])
        #expect(plain.rawValue == 0x8000_0008_0000_0005)
    }

    @Test("a large page's base drops the PAT bit 12 and the offset bits")
    func largePageBase() {
        // 2 MiB PDE: bit 12 is PAT, bits 20:13 reserved; base is bits 51:21.
        let pde = PageTableEntry(rawValue: 0x0000_0004_0020_0000 | bit(12) | 0x83)
        #expect(pde.pageBase(.size2M) == 0x0000_0004_0020_0000)
        #expect(pde.address == 0x0000_0004_0020_1000)
        // 1 GiB PDPTE: base is bits 51:30.
        let pdpte = PageTableEntry(rawValue: 0x0000_0040_4000_0000 | bit(12) | 0x83)
        #expect(pdpte.pageBase(.size1G) == 0x0000_0040_4000_0000)
        // 4 KiB PTE: base is bits 51:12.
        let pte = PageTableEntry(rawValue: 0x8000_0000_0ABC_D000 | 0x3)
        #expect(pte.pageBase(.size4K) == 0x0000_0000_0ABC_D000)
    }

    @Test("setting and clearing flags touch only those bits")
    func settingClearing() {
        let e = PageTableEntry(rawValue: 0x0000_0000_1234_5001)
        #expect(e.setting([.accessed, .dirty]).rawValue == 0x0000_0000_1234_5061)
        #expect(e.setting(.noExecute).clearing(.present).rawValue == 0x8000_0000_1234_5000)
    }

    // MARK: Reserved bits (SDM tables 4-15..4-20; 4.5.4 "Reserved bits")

    /// The reserved bits of a present entry, transcribed from the SDM tables as bit ranges.
    static func sdmReserved(level: Int, ps: Bool, maxPhy: Int, nxe: Bool) -> UInt64 {
        var m: UInt64 = maxPhy <= 51 ? bits(maxPhy, 51) : 0  // "Reserved (must be 0)" M..51
        if !nxe { m |= bit(63) }  // XD is reserved when IA32_EFER.NXE = 0.
        switch level {
        case 5, 4: m |= bit(7)  // PML5E/PML4E: bit 7 (PS) reserved.
        case 3 where ps: m |= bits(13, 29)  // PDPTE mapping 1 GiB: bits 29:13.
        case 2 where ps: m |= bits(13, 20)  // PDE mapping 2 MiB: bits 20:13.
        default: break  // Table-referencing PDPTE/PDE and 4 KiB PTE: only M..51.
        }
        return m
    }

    @Test(
        "reservedBits flags exactly the SDM's reserved bits, one bit at a time",
        arguments: [1, 2, 3, 4, 5], [36, 39, 46, 52]
    )
    func reservedBitSweep(level: Int, maxPhy: Int) {
        for ps in [false, true] {
            for nxe in [true, false] {
                let oracle = Self.sdmReserved(level: level, ps: ps, maxPhy: maxPhy, nxe: nxe)
                for b in 0..<64 {
                    let raw = 0x1 | (ps ? bit(7) : 0) | bit(b)
                    let e = PageTableEntry(rawValue: raw)
                    let got = e.reservedBits(level: level, physicalAddressBits: maxPhy, nxe: nxe)
                    #expect(got == raw & oracle, "level \(level) PS=\(ps) NXE=\(nxe) MAXPHYADDR=\(maxPhy) bit \(b)")
                }
            }
        }
    }

    @Test(
        "given hand-picked entries, reserved-bit checks match the SDM",
        arguments: [
            // (raw entry, level, MAXPHYADDR, reserved bits expected)
            (0x0000_0000_0010_0083, 4, 46, 0x80),  // PML4E with PS set.
            (0x0000_0000_0010_0083, 5, 46, 0x80),  // PML5E with PS set.
            (0x0000_0000_0010_0003, 4, 46, 0),  // Normal PML4E.
            (0x0000_0000_4000_2083, 3, 46, 0x2000),  // 1G page with bit 13 set.
            (0x0000_0000_6000_0083, 3, 46, 0x2000_0000),  // 1G page with bit 29 set.
            (0x0000_0000_4000_1083, 3, 46, 0),  // 1G page with PAT (bit 12): fine.
            (0x0000_0000_4000_2003, 3, 46, 0),  // PDPTE -> PD: bit 13 is address.
            (0x0000_0000_0010_0083, 2, 46, 0x10_0000),  // 2M page with bit 20 set.
            (0x0000_0000_0020_1083, 2, 46, 0),  // 2M page with PAT: fine.
            (0x0000_0000_0000_2083, 1, 46, 0),  // 4K PTE: bit 7 is PAT, bit 13 address.
            (0x0000_4000_0000_1003, 1, 46, 0x0000_4000_0000_0000),  // bit 46 >= MAXPHYADDR.
            (0x0000_2000_0000_1003, 1, 46, 0),  // bit 45 < MAXPHYADDR.
            (0x0008_0000_0000_1003, 1, 52, 0),  // bit 51 with MAXPHYADDR 52.
            (0x7FF0_0000_0000_1003, 1, 46, 0),  // bits 62:52 ignored / protection key.
        ] as [(UInt64, Int, Int, UInt64)]
    )
    func reservedExamples(raw: UInt64, level: Int, maxPhy: Int, expected: UInt64) {
        #expect(PageTableEntry(rawValue: raw).reservedBits(level: level, physicalAddressBits: maxPhy) == expected)
    }

    @Test("XD (bit 63) is reserved only when IA32_EFER.NXE = 0")
    func executeDisableReserved() {
        let e = PageTableEntry(rawValue: 0x8000_0000_0000_1001)
        #expect(e.reservedBits(level: 1, physicalAddressBits: 46, nxe: true) == 0)
        #expect(e.reservedBits(level: 1, physicalAddressBits: 46, nxe: false) == 0x8000_0000_0000_0000)
    }

    @Test("description names the set flags")
    func describe() {
        let e = PageTableEntry(rawValue: 0x8000_0000_0000_1067)
        #expect(e.description == "0x8000000000001067 [P W U A D XD]")
    }
}
