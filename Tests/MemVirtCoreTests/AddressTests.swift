import MemVirtCore
import Testing

// Typed addresses and PageSize: checked arithmetic, table indices (SDM 4.5: bits 47:39 PML4,
// 38:30 PDPT, 29:21 PD, 20:12 PT; 56:48 PML5), canonical form, frame numbers.

@Suite("Addresses and PageSize")
struct AddressTests {

    @Test("table indices are 9-bit fields starting at bits 12, 21, 30, 39, 48")
    func tableIndices() {
        var rng = ReferenceSplitMix64(seed: 2)
        for _ in 0..<1000 {
            let idx = (0..<5).map { _ in rng.bounded(512) }
            let offset = rng.bounded(4096)
            let raw = idx[4] << 48 | idx[3] << 39 | idx[2] << 30 | idx[1] << 21 | idx[0] << 12 | offset
            let gva = GuestVirtualAddress(rawValue: raw)
            let gpa = GuestPhysicalAddress(rawValue: raw)
            for level in 1...5 {
                #expect(gva.tableIndex(level: level) == Int(idx[level - 1]))
                #expect(gpa.tableIndex(level: level) == Int(idx[level - 1]))
            }
            #expect(gva.pageOffset(.size4K) == offset)
            #expect(gva.pageNumber == raw >> 12)
        }
        let top = GuestVirtualAddress(rawValue: 0xFFFF_FFFF_FFFF_F000)
        #expect((1...5).map { top.tableIndex(level: $0) } == [511, 511, 511, 511, 511])
    }

    @Test(
        "canonical form for 48- and 57-bit addresses",
        arguments: [
            (0x0000_7FFF_FFFF_FFFF, 48, true), (0x0000_8000_0000_0000, 48, false),
            (0xFFFF_8000_0000_0000, 48, true), (0xFFFF_7FFF_FFFF_FFFF, 48, false), (0, 48, true),
            (0xFFFF_FFFF_FFFF_FFFF, 48, true), (0x00FF_FFFF_FFFF_FFFF, 57, true),
            (0x0100_0000_0000_0000, 57, false), (0xFF00_0000_0000_0000, 57, true),
            (0x0000_8000_0000_0000, 57, true),
        ] as [(UInt64, Int, Bool)]
    )
    func canonical(raw: UInt64, bits: Int, expected: Bool) {
        #expect(GuestVirtualAddress(rawValue: raw).isCanonical(bits: bits) == expected)
    }

    @Test("checked arithmetic: adding overflows to nil, offset(from:) is nil below the base")
    func arithmetic() {
        let a = GuestPhysicalAddress(rawValue: 0x1000)
        #expect(a.adding(0x234) == GuestPhysicalAddress(rawValue: 0x1234))
        #expect(GuestPhysicalAddress(rawValue: .max).adding(1) == nil)
        #expect(GuestPhysicalAddress(rawValue: .max - 1).adding(1) == GuestPhysicalAddress(rawValue: .max))
        #expect(a.advanced(by: 8).rawValue == 0x1008)
        #expect(GuestPhysicalAddress(rawValue: 0x1234).offset(from: a) == 0x234)
        #expect(a.offset(from: GuestPhysicalAddress(rawValue: 0x1234)) == nil)
        #expect(a < GuestPhysicalAddress(rawValue: 0x1001))
        #expect(a.description == "0x1000")
    }

    @Test("alignment to 4K, 2M and 1G")
    func alignment() {
        let v = HostVirtualAddress(rawValue: 0x0000_7F12_3456_789A)
        #expect(v.alignedDown(to: .size4K).rawValue == 0x0000_7F12_3456_7000)
        #expect(v.alignedDown(to: .size2M).rawValue == 0x0000_7F12_3440_0000)
        #expect(v.alignedDown(to: .size1G).rawValue == 0x0000_7F12_0000_0000)
        #expect(v.pageOffset(.size2M) == 0x16_789A)
        #expect(!v.isAligned(to: .size4K))
        #expect(HostVirtualAddress(rawValue: 0x4000_0000).isAligned(to: .size1G))
        #expect(!HostVirtualAddress(rawValue: 0x2000_0000).isAligned(to: .size1G))
    }

    @Test("frame numbers are addresses shifted by 12")
    func frames() {
        let gpa = GuestPhysicalAddress(rawValue: 0x1234_5678)
        #expect(gpa.frame == GuestFrameNumber(rawValue: 0x12345))
        #expect(gpa.frame.address == GuestPhysicalAddress(rawValue: 0x1234_5000))
        let hpa = HostPhysicalAddress(rawValue: 0xABC_DEF0)
        #expect(hpa.frame.rawValue == 0xABCD)
        #expect(hpa.frame.address.rawValue == 0xABC_D000)
        #expect(GuestFrameNumber(rawValue: 1) < GuestFrameNumber(rawValue: 2))
    }

    @Test(
        "page sizes: bytes, leaf level, frames",
        arguments: [
            (PageSize.size4K, 4096, 1, 1, "4K"), (.size2M, 2_097_152, 2, 512, "2M"),
            (.size1G, 1_073_741_824, 3, 262_144, "1G"),
        ] as [(PageSize, UInt64, Int, UInt64, String)]
    )
    func pageSizes(size: PageSize, bytes: UInt64, level: Int, frames: UInt64, name: String) {
        #expect(size.bytes == bytes)
        #expect(size.offsetMask == bytes - 1)
        #expect(size.leafLevel == level)
        #expect(size.frames == frames)
        #expect(PageSize(leafLevel: level) == size)
        #expect(size.description == name)
        #expect(PageSize(parsing: name) == size)
        #expect(PageSize(parsing: name.lowercased()) == size)
        #expect(PageSize(parsing: name + "iB") == size)
    }

    @Test("page size parsing refuses other sizes", arguments: ["", "8K", "4M", "2G", "4KB", "1024", "huge"])
    func pageSizeJunk(text: String) {
        #expect(PageSize(parsing: text) == nil)
        #expect(PageSize(leafLevel: 0) == nil && PageSize(leafLevel: 4) == nil)
    }
}
