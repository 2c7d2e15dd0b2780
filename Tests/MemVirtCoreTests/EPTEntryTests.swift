import MemVirtCore
import Testing

// EPT paging-structure entries against the Intel SDM vol. 3, section 29.3.2 (tables "Format of
// an EPT PML4 entry" .. "Format of an EPT page-table entry") and 29.3.3.1 (EPT
// misconfigurations). Expected values are literal bit positions.

@Suite("EPTEntry: SDM 29.3.2 layout and misconfigurations")
struct EPTEntryTests {

    @Test(
        "each flag sits at its SDM bit",
        arguments: [
            (EPTEntry.Flags.read, 0), (.write, 1), (.execute, 2), (.ignorePAT, 6), (.pageSize, 7),
            (.accessed, 8), (.dirty, 9), (.userExecute, 10), (.suppressVE, 63),
        ] as [(EPTEntry.Flags, Int)]
    )
    func flagBits(flag: EPTEntry.Flags, position: Int) {
        #expect(flag.rawValue == bit(position))
        #expect(EPTEntry(rawValue: bit(position)).has(flag))
    }

    @Test("each accessor reads exactly its own bit", arguments: 0..<64)
    func accessorsReadOneBit(position: Int) {
        let e = EPTEntry(rawValue: bit(position))
        #expect(e.isReadable == (position == 0))
        #expect(e.isWritable == (position == 1))
        #expect(e.isExecutable == (position == 2))
        #expect(e.isPresent == (position <= 2))
        #expect(e.isLargePage == (position == 7))
        #expect(e.isAccessed == (position == 8))
        #expect(e.isDirty == (position == 9))
        #expect(e.memoryTypeBits == ((3...5).contains(position) ? 1 << UInt64(position - 3) : 0))
        #expect(e.address == ((12...51).contains(position) ? bit(position) : 0))
    }

    @Test(
        "memory types are bits 5:3 with the SDM encodings (0 UC, 1 WC, 4 WT, 5 WP, 6 WB)",
        arguments: [
            (EPTEntry.MemoryType.uncacheable, 0), (.writeCombining, 1), (.writeThrough, 4),
            (.writeProtected, 5), (.writeBack, 6),
        ] as [(EPTEntry.MemoryType, UInt64)]
    )
    func memoryTypes(type: EPTEntry.MemoryType, encoding: UInt64) {
        #expect(type.rawValue == encoding)
        let e = EPTEntry(frameAddress: 0x0000_0001_2345_6000, flags: .readWriteExecute, memoryType: type)
        #expect(e.rawValue == 0x0000_0001_2345_6000 | encoding << 3 | 0b111)
        #expect(e.memoryTypeBits == encoding)
    }

    @Test("init(frameAddress:) keeps only bits 51:12 of the address")
    func frameAddressMasked() {
        #expect(EPTEntry.addressMask == bits(12, 51))
        let e = EPTEntry(frameAddress: 0xFFFF_FFFF_FFFF_FFFF, flags: [.read])
        #expect(e.rawValue == bits(12, 51) | 1)
        let big = EPTEntry(rawValue: 0x0000_0000_4020_1000 | bit(7) | 0x7)
        #expect(big.pageBase(.size2M) == 0x0000_0000_4020_0000)
        #expect(big.pageBase(.size1G) == 0x0000_0000_4000_0000)
    }

    // MARK: Misconfiguration (SDM 29.3.3.1)

    @Test(
        "write without read is a misconfiguration at every level; execute-only is not",
        arguments: [1, 2, 3, 4, 5]
    )
    func writeWithoutRead(level: Int) {
        let wb: UInt64 = level == 1 ? 6 << 3 : 0  // a valid memory type where one is needed
        for rwx: UInt64 in 0...7 {
            let e = EPTEntry(rawValue: 0x0000_0000_0001_0000 | rwx | wb)
            let expected = rwx & 0b011 == 0b010  // W=1, R=0
            #expect(e.isMisconfigured(level: level, physicalAddressBits: 46) == expected, "RWX=\(rwx) level \(level)")
        }
    }

    @Test("a not-present entry (bits 2:0 = 0) is never misconfigured, whatever else is set")
    func notPresentNeverMisconfigured() {
        for level in 1...5 {
            #expect(!EPTEntry(rawValue: ~UInt64(0b111)).isMisconfigured(level: level, physicalAddressBits: 36))
        }
    }

    @Test(
        "a leaf's memory type 2, 3 or 7 is reserved; 0, 1, 4, 5, 6 are valid",
        arguments: 0..<8
    )
    func reservedMemoryTypes(type: UInt64) {
        let reserved = type == 2 || type == 3 || type == 7
        let pte = EPTEntry(rawValue: 0x0000_0000_0001_0000 | type << 3 | 0b111)
        #expect(pte.isMisconfigured(level: 1, physicalAddressBits: 46) == reserved)
        let page2M = EPTEntry(rawValue: 0x0000_0000_0020_0000 | bit(7) | type << 3 | 0b111)
        #expect(page2M.isMisconfigured(level: 2, physicalAddressBits: 46) == reserved)
        let page1G = EPTEntry(rawValue: 0x0000_0000_4000_0000 | bit(7) | type << 3 | 0b111)
        #expect(page1G.isMisconfigured(level: 3, physicalAddressBits: 46) == reserved)
    }

    /// The reserved bits of a present EPT entry, transcribed from the SDM 29.3.2 tables.
    static func sdmReserved(level: Int, ps: Bool, maxPhy: Int) -> UInt64 {
        var m: UInt64 = maxPhy <= 51 ? bits(maxPhy, 51) : 0  // N..51 in every entry
        switch level {
        case 5, 4: m |= bits(3, 7)  // EPT PML5E/PML4E: bits 7:3 reserved
        case 3 where ps: m |= bits(12, 29)  // EPT PDPTE mapping 1 GiB: bits 29:12
        case 2 where ps: m |= bits(12, 20)  // EPT PDE mapping 2 MiB: bits 20:12
        case 3, 2: m |= bits(3, 7)  // EPT PDPTE/PDE referencing a table: bits 7:3
        default: break  // EPT PTE: 5:3 memory type, 6 ignore PAT, 7 ignored
        }
        return m
    }

    @Test(
        "reserved bits make a misconfiguration exactly where the SDM reserves them",
        arguments: [1, 2, 3, 4, 5], [39, 46, 52]
    )
    func reservedBitSweep(level: Int, maxPhy: Int) {
        for ps in [false, true] where !(ps && level >= 4) {
            let oracle = Self.sdmReserved(level: level, ps: ps, maxPhy: maxPhy)
            let leaf = level == 1 || ps
            let base: UInt64 = 0b111 | (ps ? bit(7) : 0) | (leaf ? 6 << 3 : 0)  // RWX, WB where a leaf
            // Bit 7 of an EPT PDPTE/PDE is PS itself: setting it makes a leaf (the ps = true case).
            for b in 0..<64 where base & bit(b) == 0 && !(b == 7 && (level == 2 || level == 3)) {
                let e = EPTEntry(rawValue: base | bit(b))
                // A leaf's bits 5:3 are its type: WB (110) plus bit 3 gives 7, reserved.
                let badType = leaf && b == 3
                let expected = oracle & bit(b) != 0 || badType
                #expect(e.isMisconfigured(level: level, physicalAddressBits: maxPhy) == expected,
                        "level \(level) PS=\(ps) MAXPHYADDR=\(maxPhy) bit \(b)")
            }
        }
    }

    @Test("description names the set flags")
    func describe() {
        #expect(EPTEntry(rawValue: 0x0000_0000_0020_0387).description == "0x200387 [R W X PS A D]")
    }
}

@Suite("PageFaultErrorCode and EPT-violation qualification bits")
struct FaultCodeTests {
    @Test(
        "#PF error code bits (SDM 4.7): P0 W1 U2 RSVD3 I4 PK5 SS6 SGX15",
        arguments: [
            (PageFaultErrorCode.present, 0), (.write, 1), (.user, 2), (.reservedBit, 3),
            (.instructionFetch, 4), (.protectionKey, 5), (.shadowStack, 6), (.sgx, 15),
        ] as [(PageFaultErrorCode, Int)]
    )
    func errorCodeBits(code: PageFaultErrorCode, position: Int) {
        #expect(code.rawValue == UInt32(1) << UInt32(position))
    }

    @Test("common #PF codes have the values Linux prints")
    func commonCodes() {
        // A user write to a not-present page: 0x6; a user read of a present supervisor page: 0x5;
        // an instruction fetch from an NX user page: 0x15; a reserved bit on a user read: 0xd.
        #expect(PageFaultErrorCode([.write, .user]).rawValue == 0x6)
        #expect(PageFaultErrorCode([.present, .user]).rawValue == 0x5)
        #expect(PageFaultErrorCode([.present, .user, .instructionFetch]).rawValue == 0x15)
        #expect(PageFaultErrorCode([.present, .user, .reservedBit]).rawValue == 0xD)
        #expect(PageFaultErrorCode([.write, .user]).description == "0x6(NP W U)")
        #expect(PageFaultErrorCode([.present, .reservedBit, .instructionFetch]).description == "0x19(P R S RSVD I)")
    }

    @Test(
        "EPT-violation exit qualification bits (SDM table 28-7)",
        arguments: [
            (EPTViolationQualification.dataRead, 0), (.dataWrite, 1), (.instructionFetch, 2),
            (.readable, 3), (.writable, 4), (.executable, 5), (.linearAddressValid, 7),
            (.finalTranslation, 8),
        ] as [(EPTViolationQualification, Int)]
    )
    func qualificationBits(q: EPTViolationQualification, position: Int) {
        #expect(q.rawValue == bit(position))
    }
}
