import MemVirtCore

/// Guest-physical memory as the guest kernel sees it. Natively it is the machine's memory;
/// under a hypervisor every access is translated (and page-table writes may trap).
public protocol GuestPhysicalMemory: AnyObject {
    func read64(_ gpa: UInt64) -> UInt64
    func write64(_ gpa: UInt64, _ value: UInt64)
    /// A write to a paging-structure entry (a shadow MMU intercepts these).
    func writePageTableEntry(_ gpa: UInt64, _ value: UInt64)
    /// Clears a fresh frame.
    func zero(_ gpa: UInt64, bytes: UInt64)
    /// Copies `bytes` from `source` to `destination` (a string copy: `rep movsq`).
    func copy(from source: UInt64, to destination: UInt64, bytes: UInt64)
}

extension GuestPhysicalMemory {
    public func copy(from source: UInt64, to destination: UInt64, bytes: UInt64) {
        var off: UInt64 = 0
        while off < bytes {
            write64(destination + off, read64(source + off))
            off += 8
        }
    }
}

/// The CPU operations the guest kernel performs on TLB state (a hypervisor may intercept them).
public protocol GuestCPUControl: AnyObject {
    /// INVLPG for `va` in `space`.
    func invalidatePage(_ va: UInt64, space: AddressSpace)
    /// A context switch: a CR3 write loading `space` (with PCIDs, keeping its TLB entries).
    func switchAddressSpace(to space: AddressSpace)
    /// A full TLB flush of `space` (a CR3 reload without the no-flush bit; flush_tlb_mm).
    func flushTLB(of space: AddressSpace)
    /// The space is gone (its tables freed): the hypervisor may drop what it built for it.
    func addressSpaceDestroyed(_ space: AddressSpace)
}

/// A virtual memory area: a range of a process's address space with its page size and rights.
public struct VirtualMemoryArea: Sendable, Hashable {
    public var start: UInt64
    public var end: UInt64
    public var pageSize: PageSize
    public var writable: Bool
    public var executable: Bool
    /// Backed by a file on the guest's disk: a first touch reads the page (a hard fault).
    public var fileBacked: Bool
    public init(start: UInt64, end: UInt64, pageSize: PageSize, writable: Bool, executable: Bool = false, fileBacked: Bool = false) {
        self.start = start
        self.end = end
        self.pageSize = pageSize
        self.writable = writable
        self.executable = executable
        self.fileBacked = fileBacked
    }
    public func contains(_ va: UInt64) -> Bool { va >= start && va < end }
}

/// One process's address space: a PCID, a root table in guest-physical memory, its areas.
public final class AddressSpace: @unchecked Sendable {
    public let pcid: UInt16
    /// Guest-physical address of the top-level table (what CR3 holds).
    public let root: UInt64
    public internal(set) var areas: [VirtualMemoryArea] = []
    /// Guest-physical addresses of this space's page-table pages (root included).
    public internal(set) var tablePages: [UInt64] = []
    @usableFromInline var lastArea: Int = 0
    /// The PCID may tag a dead space's TLB entries: the first CR3 load of this space flushes it.
    public internal(set) var flushOnFirstLoad = false

    init(pcid: UInt16, root: UInt64) {
        self.pcid = pcid
        self.root = root
        tablePages = [root]
    }

    func area(containing va: UInt64) -> VirtualMemoryArea? {
        if lastArea < areas.count, areas[lastArea].contains(va) { return areas[lastArea] }
        for (i, a) in areas.enumerated() where a.contains(va) {
            lastArea = i
            return a
        }
        return nil
    }
}

/// How the guest kernel handled a page fault.
public enum GuestFaultResolution: Sendable, Equatable {
    /// A fresh zeroed frame was mapped (`tablePages` new page-table pages on the way).
    case demandZero(PageSize, tablePages: Int)
    /// The page was read from the guest's disk into a fresh frame (a hard fault).
    case major(PageSize, tablePages: Int)
    /// A write to a copy-on-write page: copied to a fresh frame (or reused when no longer shared).
    case copyOnWrite(copied: Bool)
    /// The access is not allowed by the area (or no area holds it): the process would get SIGSEGV.
    case segmentationFault(String)
    /// Guest-physical memory is exhausted.
    case outOfMemory
}

/// A guest kernel model: processes with address spaces made of areas, page tables built in
/// guest-physical memory as x86-64 hardware reads them, and a page-fault handler that maps
/// fresh zeroed frames on demand (so a workload runs from an empty address space).
public final class SimulatedGuestKernel: @unchecked Sendable {
    public let memory: GuestPhysicalMemory
    public let paging: PagingConfig
    public var frames: FrameAllocator
    public private(set) var spaces: [AddressSpace] = []
    private var nextPCID: UInt16 = 1
    /// The PCIDs have wrapped past 4095: every PCID handed out from now on may be a reused one.
    private var pcidsWrapped = false

    private func advancePCID(_ p: UInt16) -> UInt16 {
        if p == 4095 { pcidsWrapped = true; return 1 }
        return p + 1
    }
    /// Page-table pages allocated over the run.
    public private(set) var tablePagesAllocated: UInt64 = 0
    /// Frames mapped by more than one page-table entry (fork's copy-on-write), by address.
    var shareCount: [UInt64: Int] = [:]
    /// The CPU whose TLB the kernel keeps coherent (INVLPG, CR3 writes).
    public weak var cpu: GuestCPUControl?
    /// Linux flushes page by page up to this many pages, then the whole TLB
    /// (tlb_single_page_flush_ceiling, arch/x86/mm/tlb.c).
    public var singlePageFlushCeiling = 33
    /// Counts of kernel events.
    public private(set) var forks: UInt64 = 0
    public private(set) var exits: UInt64 = 0
    public private(set) var copyOnWriteCopies: UInt64 = 0
    public private(set) var pagesUnmapped: UInt64 = 0
    /// Paging-entry writes the kernel made (leaves and the entries linking new tables), and of
    /// those the entries linking a new table (PML4E, PDPTE, PDE).
    public private(set) var pageTableWrites: UInt64 = 0
    public private(set) var tableEntryWrites: UInt64 = 0
    /// INVLPGs the kernel issued, and full flushes (CR3 reloads of the space: flush_tlb_mm).
    public private(set) var invalidations: UInt64 = 0
    public private(set) var fullFlushes: UInt64 = 0
    /// mprotect calls.
    public private(set) var protects: UInt64 = 0

    /// Every paging-entry write of the kernel goes through here (counted, then to memory,
    /// where a shadow MMU may intercept it).
    @inline(__always) func writeEntry(_ gpa: UInt64, _ value: UInt64) {
        pageTableWrites &+= 1
        memory.writePageTableEntry(gpa, value)
    }

    public init(memory: GuestPhysicalMemory, capacity: UInt64, paging: PagingConfig) {
        self.memory = memory
        self.paging = paging
        frames = FrameAllocator(capacity: capacity)
    }

    /// A new, empty address space (its root table allocated and zeroed).
    public func createAddressSpace() throws(InputError) -> AddressSpace {
        guard let root = frames.allocate(.size4K) else { throw InputError("guest memory exhausted creating an address space") }
        memory.zero(root, bytes: 4096)
        tablePagesAllocated += 1
        // PCIDs 1...4095 round robin, skipping those of live spaces. Once they have wrapped, a
        // PCID may still tag a dead space's TLB entries: its first CR3 load flushes them, as
        // Linux loads a reused ASID without the no-flush bit (arch/x86/mm/tlb.c, need_flush).
        var pcid = nextPCID
        var tried = 0
        while spaces.contains(where: { $0.pcid == pcid }) {
            tried += 1
            guard tried < 4095 else {
                frames.free(root, .size4K)
                throw InputError("more than 4,095 live address spaces: PCIDs 1-4095 are all in use")
            }
            pcid = advancePCID(pcid)
        }
        let reused = pcidsWrapped
        nextPCID = advancePCID(pcid)
        let s = AddressSpace(pcid: pcid, root: root)
        spaces.append(s)
        s.flushOnFirstLoad = reused
        return s
    }

    /// Adds an area (mmap): nothing is mapped until it is touched.
    public func map(_ area: VirtualMemoryArea, in space: AddressSpace) throws(InputError) {
        guard area.start & area.pageSize.offsetMask == 0, area.end & area.pageSize.offsetMask == 0, area.end > area.start else {
            throw InputError("area \(GuestVirtualAddress(area.start))-\(GuestVirtualAddress(area.end)) is not aligned to \(area.pageSize)")
        }
        let bits = paging.virtualAddressBits
        let first = GuestVirtualAddress(area.start), last = GuestVirtualAddress(area.end - 1)
        guard first.isCanonical(bits: bits), last.isCanonical(bits: bits), (area.start >> 63) == ((area.end - 1) >> 63) else {
            throw InputError("area \(first)-\(GuestVirtualAddress(area.end)) is not canonical for \(paging.levels)-level paging")
        }
        for a in space.areas where a.start < area.end && area.start < a.end {
            throw InputError("area \(GuestVirtualAddress(area.start)) overlaps an existing area")
        }
        space.areas.append(area)
        space.areas.sort { $0.start < $1.start }
    }

    /// The page fault handler: demand-zero for a not-present page inside an area.
    public func handlePageFault(_ va: UInt64, code: PageFaultErrorCode, space: AddressSpace) -> GuestFaultResolution {
        guard let area = space.area(containing: va) else {
            return .segmentationFault("no area holds \(GuestVirtualAddress(va))")
        }
        if code.contains(.reservedBit) { return .segmentationFault("reserved bit set in a paging entry for \(GuestVirtualAddress(va))") }
        if code.contains(.write) && !area.writable { return .segmentationFault("write to read-only area at \(GuestVirtualAddress(va))") }
        if code.contains(.instructionFetch) && !area.executable { return .segmentationFault("fetch from non-executable area at \(GuestVirtualAddress(va))") }
        if code.contains(.present) {
            if code.contains(.write) && area.writable, let leaf = lookupLeaf(va, space: space), !leaf.entry.isWritable {
                return copyOnWrite(va, leaf: leaf, space: space)
            }
            return .segmentationFault("protection fault \(code) at \(GuestVirtualAddress(va)) in a mapped page")
        }
        let size = area.pageSize
        guard let frame = frames.allocate(size) else { return .outOfMemory }
        memory.zero(frame, bytes: size.bytes)
        var flags: PageTableEntry.Flags = [.present, .user]
        if area.writable { flags.insert(.writable) }
        if !area.executable && paging.noExecuteEnabled { flags.insert(.noExecute) }
        let before = tablePagesAllocated
        guard installLeaf(va & ~size.offsetMask, frame: frame, size: size, flags: flags, space: space) else { return .outOfMemory }
        if area.fileBacked {
            // The page's content from "disk": a deterministic pattern of its offset in the file.
            var off: UInt64 = 0
            let fileOffset = (va & ~size.offsetMask) - area.start
            while off < size.bytes {
                memory.write64(frame + off, (fileOffset + off) ^ 0x00F1_1E00_0000_0000)
                off += 8
            }
            return .major(size, tablePages: Int(tablePagesAllocated - before))
        }
        return .demandZero(size, tablePages: Int(tablePagesAllocated - before))
    }

    /// Writes the leaf entry for `va` (building missing tables: fresh zeroed pages referenced by
    /// P|W|U entries, permissions live in the leaf, as Linux does). False when out of memory.
    @discardableResult
    public func installLeaf(_ va: UInt64, frame: UInt64, size: PageSize, flags: PageTableEntry.Flags, space: AddressSpace) -> Bool {
        var table = space.root
        var level = paging.levels
        while level > size.leafLevel {
            let entryAddress = table + UInt64(GuestVirtualAddress(va).tableIndex(level: level)) * 8
            var e = PageTableEntry(rawValue: memory.read64(entryAddress))
            if !e.isPresent {
                guard let t = frames.allocate(.size4K) else { return false }
                memory.zero(t, bytes: 4096)
                tablePagesAllocated += 1
                space.tablePages.append(t)
                e = PageTableEntry(frameAddress: t, flags: [.present, .writable, .user])
                tableEntryWrites &+= 1
                writeEntry(entryAddress, e.rawValue)
            }
            precondition(!e.isLargePage, "installLeaf below an existing large page")
            table = e.address
            level -= 1
        }
        var leafFlags = flags
        if size != .size4K { leafFlags.insert(.pageSize) }
        let entryAddress = table + UInt64(GuestVirtualAddress(va).tableIndex(level: level)) * 8
        writeEntry(entryAddress, PageTableEntry(frameAddress: frame, flags: leafFlags).rawValue)
        return true
    }

    /// Builds the missing tables on `va`'s path down to the table at `level` (3: the PDPT
    /// under the root), as a VMM presets a first address space. False when out of memory.
    @discardableResult
    public func prepareTables(_ va: UInt64, downTo level: Int, in space: AddressSpace) -> Bool {
        var table = space.root
        var l = paging.levels
        while l > level {
            let entryAddress = table + UInt64(GuestVirtualAddress(va).tableIndex(level: l)) * 8
            var e = PageTableEntry(rawValue: memory.read64(entryAddress))
            if !e.isPresent {
                guard let t = frames.allocate(.size4K) else { return false }
                memory.zero(t, bytes: 4096)
                tablePagesAllocated += 1
                space.tablePages.append(t)
                e = PageTableEntry(frameAddress: t, flags: [.present, .writable, .user])
                tableEntryWrites &+= 1
                writeEntry(entryAddress, e.rawValue)
            }
            table = e.address
            l -= 1
        }
        return true
    }

    /// Breaks copy-on-write sharing for the page holding `va` (do_wp_page): a private copy if
    /// the frame is still shared, else the same frame made writable; then INVLPG.
    func copyOnWrite(_ va: UInt64, leaf: (entryAddress: UInt64, entry: PageTableEntry, size: PageSize), space: AddressSpace) -> GuestFaultResolution {
        let frame = leaf.entry.pageBase(leaf.size)
        let shared = (shareCount[frame] ?? 1) > 1
        var target = frame
        if shared {
            guard let f = frames.allocate(leaf.size) else { return .outOfMemory }
            memory.copy(from: frame, to: f, bytes: leaf.size.bytes)
            release(frame, leaf.size)
            target = f
            copyOnWriteCopies += 1
        }
        let e = PageTableEntry(rawValue: (leaf.entry.rawValue & ~PageTableEntry.addressMask) | target).setting([.writable, .dirty])
        writeEntry(leaf.entryAddress, e.rawValue)
        if let c = cpu {
            invalidations &+= 1
            c.invalidatePage(va & ~leaf.size.offsetMask, space: space)
        }
        return .copyOnWrite(copied: shared)
    }

    /// Drops one mapping of `frame`; frees it with the last.
    func release(_ frame: UInt64, _ size: PageSize) {
        if let n = shareCount[frame], n > 1 {
            shareCount[frame] = n == 2 ? nil : n - 1
        } else {
            frames.free(frame, size)
        }
    }

    /// Every present leaf of `space`: (va, entry address, entry, size).
    public func leaves(of space: AddressSpace) -> [(va: UInt64, entryAddress: UInt64, entry: PageTableEntry, size: PageSize)] {
        var out: [(UInt64, UInt64, PageTableEntry, PageSize)] = []
        func visit(_ table: UInt64, _ level: Int, _ vaBase: UInt64) {
            for idx in 0..<512 {
                let ea = table + UInt64(idx) * 8
                let e = PageTableEntry(rawValue: memory.read64(ea))
                guard e.isPresent else { continue }
                var va = vaBase | (UInt64(idx) << UInt64(12 + 9 * (level - 1)))
                if level == paging.levels && idx >= 256 { va |= paging.levels == 5 ? 0xFE00_0000_0000_0000 : 0xFFFF_0000_0000_0000 }
                if level == 1 || (level <= 3 && e.isLargePage) {
                    out.append((va, ea, e, PageSize(leafLevel: level)!))
                } else {
                    visit(e.address, level - 1, va)
                }
            }
        }
        visit(space.root, paging.levels, 0)
        return out
    }

    /// Flushes `pages` virtual pages of `space` the way Linux does: INVLPG each up to the
    /// ceiling, else a full flush (a CR3 reload).
    func flush(_ pages: [UInt64], in space: AddressSpace) {
        guard let c = cpu, !pages.isEmpty else { return }
        if pages.count <= singlePageFlushCeiling {
            invalidations &+= UInt64(pages.count)
            for va in pages { c.invalidatePage(va, space: space) }
        } else {
            fullFlushes &+= 1
            c.flushTLB(of: space)
        }
    }

    /// fork(): a child with the parent's areas; every private writable page becomes read-only
    /// and shared copy-on-write in both (copy_page_range); the parent's TLB is flushed.
    public func fork(_ parent: AddressSpace) throws(InputError) -> AddressSpace {
        let child = try createAddressSpace()
        child.areas = parent.areas
        var changed: [UInt64] = []
        for leaf in leaves(of: parent) {
            var e = leaf.entry
            if e.isWritable {
                e = e.clearing(.writable)
                writeEntry(leaf.entryAddress, e.rawValue)
                changed.append(leaf.va)
            }
            let frame = e.pageBase(leaf.size)
            shareCount[frame] = (shareCount[frame] ?? 1) + 1
            guard installLeaf(leaf.va, frame: frame, size: leaf.size, flags: e.flags.subtracting([.pageSize, .accessed, .dirty]), space: child) else {
                throw InputError("guest memory exhausted in fork")
            }
        }
        flush(changed, in: parent)
        forks += 1
        return child
    }

    /// munmap(): clears the leaves of `range` in `space`, frees their frames, flushes the TLB;
    /// the area is removed (or trimmed).
    public func unmap(_ range: Range<UInt64>, in space: AddressSpace) {
        var changed: [UInt64] = []
        for leaf in leaves(of: space) where range.contains(leaf.va) {
            writeEntry(leaf.entryAddress, 0)
            release(leaf.entry.pageBase(leaf.size), leaf.size)
            changed.append(leaf.va)
            pagesUnmapped += 1
        }
        flush(changed, in: space)
        var kept: [VirtualMemoryArea] = []
        for a in space.areas {
            if a.end <= range.lowerBound || a.start >= range.upperBound { kept.append(a); continue }
            if a.start < range.lowerBound { var l = a; l.end = range.lowerBound; kept.append(l) }
            if a.end > range.upperBound { var r = a; r.start = range.upperBound; kept.append(r) }
        }
        space.areas = kept
    }

    /// mprotect(): the areas inside `range` take `writable`; every present leaf of the range is
    /// rewritten (change_pte_range writes each present PTE), then flushed as munmap flushes.
    /// A page still shared copy-on-write stays read-only when the range becomes writable (Linux
    /// sets W on a private page only when it is exclusive: can_change_pte_writable).
    public func protect(_ range: Range<UInt64>, writable: Bool, in space: AddressSpace) {
        var changed: [UInt64] = []
        for leaf in leaves(of: space) where range.contains(leaf.va) {
            var e = leaf.entry
            if writable {
                if (shareCount[e.pageBase(leaf.size)] ?? 1) == 1 { e = e.setting(.writable) }
            } else {
                e = e.clearing(.writable)
            }
            writeEntry(leaf.entryAddress, e.rawValue)
            changed.append(leaf.va)
        }
        flush(changed, in: space)
        for i in space.areas.indices where space.areas[i].start >= range.lowerBound && space.areas[i].end <= range.upperBound {
            space.areas[i].writable = writable
        }
        protects += 1
    }

    /// exit(): unmaps everything and frees the page-table pages (they go back to the frame
    /// allocator and are reused: a shadow MMU still write-protects them until it notices).
    public func exit(_ space: AddressSpace) {
        for leaf in leaves(of: space) {
            writeEntry(leaf.entryAddress, 0)
            release(leaf.entry.pageBase(leaf.size), leaf.size)
            pagesUnmapped += 1
        }
        cpu?.addressSpaceDestroyed(space)
        for t in space.tablePages { frames.free(t, .size4K) }
        space.tablePages = []
        space.areas = []
        spaces.removeAll { $0 === space }
        exits += 1
    }

    /// exec(): the old image is unmapped, `areas` are the new one (demand-faulted).
    public func exec(_ space: AddressSpace, areas: [VirtualMemoryArea]) throws(InputError) {
        for a in space.areas { unmap(a.start..<a.end, in: space) }
        for a in areas { try map(a, in: space) }
    }

    /// The leaf entry mapping `va` and its size, by a software walk (no A/D updates).
    public func lookupLeaf(_ va: UInt64, space: AddressSpace) -> (entryAddress: UInt64, entry: PageTableEntry, size: PageSize)? {
        let s = TableWalk.descend(.paging, root: space.root, levels: paging.levels, address: va) { memory.read64($0) }
        guard let s, s.isLeaf else { return nil }
        return (s.entryAddress, PageTableEntry(rawValue: s.raw), s.size)
    }
}

/// Native guest-physical memory: the machine's own memory, no interception.
public final class NativeGuestMemory: GuestPhysicalMemory {
    public let memory: PhysicalMemory
    public init(_ memory: PhysicalMemory) { self.memory = memory }
    public func read64(_ gpa: UInt64) -> UInt64 { memory.read64(gpa) }
    public func write64(_ gpa: UInt64, _ value: UInt64) { memory.write64(gpa, value) }
    public func writePageTableEntry(_ gpa: UInt64, _ value: UInt64) { memory.write64(gpa, value) }
    public func zero(_ gpa: UInt64, bytes: UInt64) { memory.zero(gpa, bytes: bytes) }
}
