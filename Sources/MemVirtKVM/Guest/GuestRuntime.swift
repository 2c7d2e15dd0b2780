import CKVM
import MemVirtCore
import MemVirtGuest

/// Where everything of the guest runtime lives. Guest-physical memory is two slots: the
/// runtime (slot 0 at 0: descriptor tables, per-vCPU TSS/mailbox/stacks, the code image,
/// page tables, the workload's lookup tables and address lists; identity-mapped with 2 MiB
/// pages) and the workload's data (slot 1 at 4 GiB, mapped at `dataVirtual`, 4K/2M/1G
/// guest pages). One more page at `holeVirtual` maps guest-physical `holePhysical`, which no
/// slot backs: touching it exits as MMIO (the misbehaving-guest test).
public struct GuestLayout: Sendable {
    public static let gdt: UInt64 = 0x1000
    public static let idt: UInt64 = 0x2000
    public static let vcpuBlocks: UInt64 = 0x10000
    public static let vcpuBlockSize: UInt64 = 0x10000
    public static let maxVCPUs = 8
    public static let image: UInt64 = 0x10_0000
    // Inside a vCPU block:
    static let tssOffset: UInt64 = 0
    static let tssLimit: UInt64 = 104 + 8192  // header, I/O bitmap (all ports allowed), 0xff terminator
    static let mailboxOffset: UInt64 = 0x3000
    static let kernelStackTop: UInt64 = 0x6000
    /// The vCPU's async-PF area (`struct kvm_vcpu_pv_apf_data`, 64-byte aligned).
    static let apfAreaOffset: UInt64 = 0x2100
    /// Bytes of one guest thread's block: its mailbox (first page) and its user stack.
    public static let threadBlockSize: UInt64 = 0x4000
    static let userStackTop: UInt64 = 0x10000
    public static let dataPhysical = GuestPhysicalAddress(rawValue: 0x1_0000_0000)
    public static let holePhysical = GuestPhysicalAddress(rawValue: 0xC000_0000)
    public static let holeVirtual = GuestVirtualAddress(rawValue: 0x30_0000_0000)
    public static let runtimeSlot: UInt32 = 0
    public static let dataSlot: UInt32 = 1

    public var runtimeSize: UInt64
    public var imageSize: UInt64
    public var pageTables: UInt64
    public var pageTablePages: UInt64
    /// Per-vCPU lookup tables (zipf CDF or chase successors), `tableStride` bytes apart.
    public var tables: UInt64
    public var tableStride: UInt64
    /// The address-list area (WRITE_LIST), `listCapacity` entries.
    public var list: UInt64
    public var listCapacity: Int
    public var dataVirtual: GuestVirtualAddress
    public var dataSize: UInt64
    public var dataPageSize: PageSize
    /// Guest threads' blocks (mailbox page + stack), `threadBlockSize` apart.
    public var threadBlocks: UInt64 = 0
    public var threadCapacity: Int = 0

    public static func mailbox(_ vcpu: Int) -> UInt64 { vcpuBlocks + UInt64(vcpu) * vcpuBlockSize + mailboxOffset }
    static func tss(_ vcpu: Int) -> UInt64 { vcpuBlocks + UInt64(vcpu) * vcpuBlockSize + tssOffset }
    static func tssSelector(_ vcpu: Int) -> UInt16 { UInt16(0x28 + 16 * vcpu) }
    static func kernelStack(_ vcpu: Int) -> UInt64 { vcpuBlocks + UInt64(vcpu) * vcpuBlockSize + kernelStackTop }
    /// vCPU `vcpu`'s async-PF area (guest-physical = guest-virtual in the runtime).
    public static func apfArea(_ vcpu: Int) -> UInt64 { vcpuBlocks + UInt64(vcpu) * vcpuBlockSize + apfAreaOffset }
    /// Guest thread `t`'s mailbox.
    public func threadMailbox(_ t: Int) -> UInt64 { threadBlocks + UInt64(t) * Self.threadBlockSize }
    /// Guest thread `t`'s initial stack pointer.
    public func threadStack(_ t: Int) -> UInt64 { threadBlocks + UInt64(t + 1) * Self.threadBlockSize - 8 }
}

/// What a guest VM is built with.
public struct GuestConfig: Sendable {
    public var dataSize: UInt64
    public var dataVirtual: GuestVirtualAddress = WorkloadSpec.defaultBase
    public var dataPageSize: PageSize = .size4K
    public var vcpus: Int = 1
    public var transparentHugePages = false
    public var dataSlotFlags: MemorySlot.Flags = []
    /// Bytes of each vCPU's dirty ring (0: none).
    public var dirtyRingBytes = 0
    public var manualDirtyProtect = false
    /// Room per vCPU for zipf/chase tables, bytes.
    public var tableBytesPerVCPU: UInt64 = 0
    public var listCapacity = 0
    public var irqchip = false
    /// Blocks for guest threads (the VMM-side scheduler's), across all vCPUs.
    public var threads = 0
    /// Mark guest RAM MADV_MERGEABLE (KSM).
    public var mergeable = false
    /// The runtime's memory comes from a snapshot: do not build it (page tables etc.).
    public var restoring = false
    /// A multiboot guest (Multiboot.swift): RAM is [0, multibootLowBytes) (the runtime slot)
    /// and [multibootLowBytes, + dataSize) (the data slot); nothing is built, vCPUs are left
    /// for the loader to set.
    public var multibootLowBytes: UInt64? = nil

    public init(dataSize: UInt64) { self.dataSize = dataSize }
}

/// What the vCPU saw while running one command.
public struct CommandOutcome: Sendable {
    public var status: UInt64
    /// Monotonic nanoseconds of each `out` to MEMVIRT_PORT_MARK.
    public var marks: [UInt64] = []
    public var pings: UInt64 = 0
    /// KVM_RUN returns by exit, decoded (what reached the VMM).
    public var userspaceExits: [String: UInt64] = [:]
    public var startNanos: UInt64 = 0
    public var endNanos: UInt64 = 0
    /// True when a `VCPUKicker` stopped the vCPU before the guest reported DONE.
    public var stopped = false
}

/// A VM running the guest runtime: slots, page tables, descriptor tables and vCPUs set up
/// before the first KVM_RUN (a shadow MMU does not see the VMM's later page-table writes).
public final class GuestVM: @unchecked Sendable {
    public let kvm: KVM
    public let vm: VirtualMachine
    public let runtime: GuestMemoryRegion
    public let data: GuestMemoryRegion
    public private(set) var vcpus: [VirtualCPU] = []
    public let layout: GuestLayout
    let image: memvirt_guest_image
    /// Multiboot guests: console text, the announced mailbox (Multiboot.swift).
    public let multiboot: MultibootState?
    /// Called on the vCPU's thread at KVM_EXIT_DIRTY_RING_FULL (harvest, then reset).
    var onDirtyRingFull: (@Sendable (VirtualCPU) throws(KVMError) -> Void)?

    public init(kvm: KVM, config c: GuestConfig) throws(KVMError) {
        guard c.vcpus >= 1, c.vcpus <= GuestLayout.maxVCPUs else {
            throw KVMError.invalid("vCPUs \(c.vcpus): this runtime supports 1...\(GuestLayout.maxVCPUs)")
        }
        guard c.dataSize >= 4096, c.dataSize % c.dataPageSize.bytes == 0 else {
            throw KVMError.invalid("data size \(ByteCount(c.dataSize)) must be a positive multiple of the guest page size \(c.dataPageSize)")
        }
        guard c.dataVirtual.isAligned(to: .size1G), c.dataVirtual.isCanonical(bits: 48),
              c.dataVirtual.rawValue >= 1 << 39 || c.dataVirtual.rawValue >= 0x40_0000_0000 else {
            throw KVMError.invalid("data base \(c.dataVirtual): must be 1GiB-aligned, canonical and at or above 256GiB")
        }
        // Sizes may come from a migration stream or a snapshot: each is bounded before it is
        // rounded, summed or multiplied (an overflow would trap the process).
        guard c.dataSize <= 0x8000_0000_0000, c.dataVirtual.rawValue <= 0x8000_0000_0000 - c.dataSize else {
            throw KVMError.invalid("data base \(c.dataVirtual) + \(ByteCount(c.dataSize)) leaves the lower canonical half")
        }
        var img = memvirt_guest_image()
        memvirt_guest_image_get(&img)
        image = img
        guard c.tableBytesPerVCPU <= GuestLayout.holePhysical.rawValue else {
            throw KVMError.invalid("lookup tables of \(c.tableBytesPerVCPU) bytes per vCPU: at most \(ByteCount(GuestLayout.holePhysical.rawValue)) (they live in the runtime area, below the 3GiB hole)")
        }
        guard c.listCapacity >= 0, c.listCapacity <= Int(GuestLayout.holePhysical.rawValue / 8) else {
            throw KVMError.invalid("address list of \(c.listCapacity) entries: at most \(GuestLayout.holePhysical.rawValue / 8)")
        }
        func up(_ v: UInt64, _ a: UInt64) -> UInt64 { (v + a - 1) / a * a }
        let imageSize = up(img.size, 4096)
        let f = c.dataSize
        let tablePages = 8 + up(f, 2 << 20) / (2 << 20) + up(f, 1 << 30) / (1 << 30) + up(f, 1 << 39) / (1 << 39) + 4
        let pageTables = GuestLayout.image + imageSize
        let tables = pageTables + tablePages * 4096
        let stride = up(c.tableBytesPerVCPU, 4096)
        let list = tables + stride * UInt64(c.vcpus)
        guard c.threads >= 0, c.threads <= 64 else { throw KVMError.invalid("guest threads \(c.threads): use 0...64") }
        let threadBlocks = list + up(UInt64(c.listCapacity) * 8, 4096)
        let runtimeSize = c.multibootLowBytes ?? up(threadBlocks + UInt64(c.threads) * GuestLayout.threadBlockSize + 4096, 2 << 20)
        guard runtimeSize <= GuestLayout.holePhysical.rawValue else {
            throw KVMError.invalid("runtime area of \(ByteCount(runtimeSize)) (tables for this footprint) exceeds 3GiB")
        }
        layout = GuestLayout(
            runtimeSize: runtimeSize, imageSize: imageSize, pageTables: pageTables, pageTablePages: tablePages,
            tables: tables, tableStride: stride, list: list, listCapacity: c.listCapacity,
            dataVirtual: c.dataVirtual, dataSize: c.dataSize, dataPageSize: c.dataPageSize,
            threadBlocks: threadBlocks, threadCapacity: c.threads)

        self.kvm = kvm
        vm = try VirtualMachine(kvm: kvm)
        if c.irqchip { try vm.createIRQChip() }
        runtime = try GuestMemoryRegion(guestPhysical: GuestPhysicalAddress(rawValue: 0), size: runtimeSize)
        multiboot = c.multibootLowBytes == nil ? nil : MultibootState()
        data = try GuestMemoryRegion(guestPhysical: c.multibootLowBytes.map { GuestPhysicalAddress(rawValue: $0) } ?? GuestLayout.dataPhysical, size: c.dataSize, transparentHugePages: c.transparentHugePages)
        if c.mergeable { try data.markMergeable() }
        if c.manualDirtyProtect { try vm.enableManualDirtyProtect() }
        if c.dirtyRingBytes > 0 { try vm.enableDirtyRing(bytes: c.dirtyRingBytes) }
        try vm.addSlot(id: GuestLayout.runtimeSlot, region: runtime)
        try vm.addSlot(id: GuestLayout.dataSlot, region: data, flags: c.dataSlotFlags)
        if !c.restoring && multiboot == nil { try buildRuntime(vcpus: c.vcpus) }
        for i in 0..<c.vcpus {
            let v = try vm.createVCPU(id: i)
            if multiboot == nil { try enterUserMode(v) }
            vcpus.append(v)
        }
    }

    // MARK: building

    private func buildRuntime(vcpus n: Int) throws(KVMError) {
        let rt = runtime
        func gpa(_ v: UInt64) -> GuestPhysicalAddress { GuestPhysicalAddress(rawValue: v) }
        // The code image.
        try rt.write(UnsafeRawBufferPointer(start: image.start, count: Int(image.size)), at: gpa(GuestLayout.image))
        // GDT: null, kernel code 0x08, kernel data 0x10, user data 0x18 (0x1b), user code 0x20 (0x23), TSS i at 0x28 + 16i.
        var gdt: [UInt64] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0x00cf_f300_0000_ffff, 0x00af_fb00_0000_ffff]
        for i in 0..<n {
            let base = GuestLayout.tss(i), limit = GuestLayout.tssLimit
            var lo = limit & 0xffff
            lo |= (base & 0xff_ffff) << 16
            lo |= UInt64(0x89) << 40  // present, 64-bit TSS (available)
            lo |= ((limit >> 16) & 0xf) << 48
            lo |= ((base >> 24) & 0xff) << 56
            gdt += [lo, base >> 32]
        }
        try rt.write(array: gdt, at: gpa(GuestLayout.gdt))
        // IDT: vectors 0-31 to the trap stubs (DPL 0); nothing else is delivered.
        var idt = [UInt64](repeating: 0, count: 512)
        func gate(_ v: Int, _ offset: UInt64, dpl: UInt64) {
            let target = GuestLayout.image + offset
            idt[2 * v] = (target & 0xffff) | (0x08 << 16) | ((0x8e | dpl << 5) << 40) | (((target >> 16) & 0xffff) << 48)
            idt[2 * v + 1] = target >> 32
        }
        for v in 0..<Int(MEMVIRT_TRAP_VECTORS) { gate(v, image.trap_stubs_offset + UInt64(v) * UInt64(MEMVIRT_TRAP_STUB_SIZE), dpl: 0) }
        try rt.write(array: idt, at: gpa(GuestLayout.idt))
        // TSS per vCPU: RSP0 = its kernel stack, I/O bitmap right after the header, all ports
        // allowed (zero bits; the guest's `out`s exit to us), then the 0xff terminator.
        for i in 0..<n {
            let tss = GuestLayout.tss(i)
            try rt.store(GuestLayout.vcpuBlocks + UInt64(i) * GuestLayout.vcpuBlockSize + GuestLayout.kernelStackTop, at: gpa(tss + 4))
            try rt.store(UInt16(104), at: gpa(tss + 102))
            try rt.store(UInt8(0xff), at: gpa(tss + 104 + 8192))
        }
        // Page tables.
        var pt = PageTableBuilder(memory: rt, next: layout.pageTables, limit: layout.pageTables + layout.pageTablePages * 4096)
        _ = try pt.allocate()  // the PML4
        var a: UInt64 = 0
        while a < layout.runtimeSize {
            try pt.map(GuestVirtualAddress(rawValue: a), to: gpa(a), size: .size2M)
            a += 2 << 20
        }
        let ps = layout.dataPageSize
        var off: UInt64 = 0
        while off < layout.dataSize {
            try pt.map(layout.dataVirtual.advanced(by: off), to: GuestLayout.dataPhysical.advanced(by: off), size: ps)
            off += ps.bytes
        }
        try pt.map(GuestLayout.holeVirtual, to: GuestLayout.holePhysical, size: .size4K)
    }

    /// Puts a vCPU in 64-bit mode at CPL3 at the runtime's entry, with no CPL0 instruction run.
    private func enterUserMode(_ v: VirtualCPU) throws(KVMError) {
        var s = try v.getSregs()
        func seg(_ sel: UInt16, type: UInt8, dpl: UInt8, l: UInt8, db: UInt8) -> kvm_segment {
            kvm_segment(base: 0, limit: 0xffff_ffff, selector: sel, type: type, present: 1, dpl: dpl, db: db, s: 1, l: l, g: 1, avl: 0, unusable: 0, padding: 0)
        }
        s.cs = seg(0x23, type: 11, dpl: 3, l: 1, db: 0)
        let data = seg(0x1b, type: 3, dpl: 3, l: 0, db: 1)
        s.ds = data; s.es = data; s.fs = data; s.gs = data; s.ss = data
        s.tr = kvm_segment(base: GuestLayout.tss(v.id), limit: UInt32(GuestLayout.tssLimit), selector: GuestLayout.tssSelector(v.id),
                           type: 11, present: 1, dpl: 0, db: 0, s: 0, l: 0, g: 0, avl: 0, unusable: 0, padding: 0)
        s.ldt = kvm_segment(base: 0, limit: 0xffff, selector: 0, type: 2, present: 1, dpl: 0, db: 0, s: 0, l: 0, g: 0, avl: 0, unusable: 1, padding: 0)
        s.gdt = kvm_dtable(base: GuestLayout.gdt, limit: UInt16(8 * (5 + 2 * GuestLayout.maxVCPUs) - 1), padding: (0, 0, 0))
        s.idt = kvm_dtable(base: GuestLayout.idt, limit: 4095, padding: (0, 0, 0))
        s.cr0 = 0x8001_0033      // PG, WP, NE, ET, MP, PE
        s.cr3 = layout.pageTables
        s.cr4 = 0x620            // PAE, OSFXSR, OSXMMEXCPT
        s.efer = 0x500           // LME, LMA
        try v.setSregs(s)
        try resetRegisters(v)
    }

    /// Runs `memvirt_guest_cpl0_loop` at CPL0 for `iterations` (2 instructions each) and
    /// returns the nanoseconds of that KVM_RUN; then puts the vCPU back at CPL3 at the entry.
    public func timeCPL0Loop(vcpu index: Int, iterations: UInt64) throws(KVMError) -> UInt64 {
        let v = vcpus[index]
        let saved = try v.getSregs()
        var s = saved
        s.cs = kvm_segment(base: 0, limit: 0xffff_ffff, selector: 0x08, type: 11, present: 1, dpl: 0, db: 0, s: 1, l: 1, g: 1, avl: 0, unusable: 0, padding: 0)
        let d = kvm_segment(base: 0, limit: 0xffff_ffff, selector: 0x10, type: 3, present: 1, dpl: 0, db: 1, s: 1, l: 0, g: 1, avl: 0, unusable: 0, padding: 0)
        s.ss = d; s.ds = d; s.es = d
        try v.setSregs(s)
        var r = kvm_regs()
        r.rip = GuestLayout.image + image.cpl0_loop_offset
        r.rsp = GuestLayout.vcpuBlocks + UInt64(v.id) * GuestLayout.vcpuBlockSize + GuestLayout.kernelStackTop - 8
        r.rcx = max(1, iterations)
        r.rflags = 0x2
        try v.setRegs(r)
        let t0 = monotonicNanoseconds()
        let exit = try v.runOnce()
        let t1 = monotonicNanoseconds()
        // KVM_SET_REGS does not change the privilege level: restore the CPL3 segments first.
        try v.setSregs(saved)
        try resetRegisters(v)
        guard case .ioOut(let port, _, _) = exit, port == UInt16(MEMVIRT_PORT_MARK) else {
            throw KVMError.invalid("CPL0 loop ended with \(exit), expected a MARK exit")
        }
        return t1 - t0
    }

    /// The GVA of vCPU `index`'s TSS.RSP0 (the triple-fault test overwrites it).
    public static func tssRSP0(_ index: Int) -> GuestVirtualAddress { GuestVirtualAddress(rawValue: GuestLayout.tss(index) + 4) }

    /// rip = the runtime's entry, rsp = the vCPU's user stack, rdi = its mailbox.
    func resetRegisters(_ v: VirtualCPU) throws(KVMError) {
        var r = kvm_regs()
        r.rip = GuestLayout.image + image.entry_offset
        r.rsp = GuestLayout.vcpuBlocks + UInt64(v.id) * GuestLayout.vcpuBlockSize + GuestLayout.userStackTop - 8
        r.rdi = GuestLayout.mailbox(v.id)
        r.rflags = 0x2
        try v.setRegs(r)
    }

    // MARK: mailbox

    /// Where vCPU `vcpu`'s command mailbox is (a multiboot guest's announced one, if any).
    public func mailboxAddress(_ vcpu: Int) -> GuestPhysicalAddress {
        GuestPhysicalAddress(rawValue: multiboot?.mailbox ?? GuestLayout.mailbox(vcpu))
    }
    public func mailbox(_ vcpu: Int) throws(KVMError) -> memvirt_mailbox {
        try runtime.load(memvirt_mailbox.self, at: mailboxAddress(vcpu))
    }
    public func setMailbox(_ vcpu: Int, _ m: memvirt_mailbox) throws(KVMError) {
        try runtime.store(m, at: mailboxAddress(vcpu))
    }
    /// The guest's own memory_checksum of the first `bytes` of its data, computed by vCPU 0
    /// (on a dedicated thread; the vCPU must be between commands). vCPU 0's mailbox is put back
    /// afterwards, with the checksum in it.
    public func checksumInGuest(bytes: UInt64) throws(KVMError) -> UInt64 {
        let saved = try mailbox(0)
        var m = GuestVM.command(MEMVIRT_CMD_CHECKSUM)
        m.base = layout.dataVirtual.rawValue
        m.footprint = bytes
        try setMailbox(0, m)
        _ = try onDedicatedThread(name: "memvirt-checksum") { () throws(KVMError) in try self.execute(vcpu: 0) }
        var back = saved
        back.memory_checksum = try mailbox(0).memory_checksum
        try setMailbox(0, back)
        return back.memory_checksum
    }

    /// A fresh mailbox for `command`.
    public static func command(_ c: memvirt_command) -> memvirt_mailbox {
        var m = memvirt_mailbox()
        m.command = UInt64(c.rawValue)
        return m
    }

    // MARK: running

    /// Runs vCPU `index` until the guest reports MEMVIRT_PORT_DONE, on the calling thread
    /// (callers put it on a dedicated thread). A misbehaving guest throws `.guest(...)`.
    public func execute(vcpu index: Int, kicker: VCPUKicker? = nil) throws(KVMError) -> CommandOutcome {
        let v = vcpus[index]
        kicker?.register(index)
        defer { kicker?.unregister(index) }
        var o = CommandOutcome(status: 0)
        o.startNanos = monotonicNanoseconds()
        while true {
            let exit = try v.runOnce()
            switch exit {
            case .ioOut(let port, _, let data):
                o.userspaceExits["io", default: 0] += 1
                // Multiboot guests' ports first (0xE9 lies in the trap stubs' port range).
                if let mb = multiboot, try mb.port(port, data) {
                    if mb.exitValue != nil { o.endNanos = monotonicNanoseconds(); return o }
                    continue
                }
                switch Int32(port) {
                case MEMVIRT_PORT_DONE:
                    o.endNanos = monotonicNanoseconds()
                    o.status = data
                    if data != UInt64(MEMVIRT_STATUS_OK.rawValue) { throw KVMError.guest(.badStatus(data)) }
                    return o
                case MEMVIRT_PORT_PING: o.pings += 1
                case MEMVIRT_PORT_MARK: o.marks.append(monotonicNanoseconds())
                case MEMVIRT_PORT_VECTOR_BASE..<(MEMVIRT_PORT_VECTOR_BASE + MEMVIRT_TRAP_VECTORS):
                    throw KVMError.guest(try trapReport(v, vector: UInt8(Int32(port) - MEMVIRT_PORT_VECTOR_BASE)))
                default: throw KVMError.guest(.unknownPort(port: port, isWrite: true, size: 0, data: data))
                }
            case .ioIn(let port, let size):
                throw KVMError.guest(.unknownPort(port: port, isWrite: false, size: size, data: 0))
            case .mmio(let a, let w, let l): throw KVMError.guest(.outsideMemory(address: a, isWrite: w, length: l))
            case .shutdown: throw KVMError.guest(.tripleFault(rip: (try? v.getRegs().rip) ?? 0))
            case .halt: throw KVMError.guest(.unexpectedHalt(rip: (try? v.getRegs().rip) ?? 0))
            case .failEntry(let r): throw KVMError.guest(.failEntry(reason: r))
            case .internalError(let s): throw KVMError.guest(.internalError(suberror: s))
            case .dirtyRingFull:
                o.userspaceExits["dirty_ring_full", default: 0] += 1
                guard let h = onDirtyRingFull else { throw KVMError.invalid("dirty ring full and nobody harvests it") }
                try h(v)
            case .interrupted:
                o.userspaceExits["intr", default: 0] += 1
                if let k = kicker, k.stopRequested {
                    o.stopped = true
                    o.endNanos = monotonicNanoseconds()
                    return o
                }
            case .other(let r): throw KVMError.guest(.unexpectedExit(reason: r))
            }
        }
    }

    /// Reads the exception frame the CPU pushed on the vCPU's kernel stack.
    func trapReport(_ v: VirtualCPU, vector: UInt8) throws(KVMError) -> GuestFailure {
        let regs = try v.getRegs()
        let sregs = try v.getSregs()
        let hasCode: Set<UInt8> = [8, 10, 11, 12, 13, 14, 17, 21, 29, 30]
        var sp = regs.rsp
        var code: UInt64? = nil
        if hasCode.contains(vector) {
            code = try runtime.load(UInt64.self, at: GuestPhysicalAddress(rawValue: sp))
            sp += 8
        }
        let rip = try runtime.load(UInt64.self, at: GuestPhysicalAddress(rawValue: sp))
        return .exception(vector: vector, errorCode: code, rip: rip, cr2: sregs.cr2)
    }
}

/// Builds x86-64 4-level page tables in runtime memory, allocating table pages from a bump
/// range. Entries come from MemVirtCore's `PageTableEntry`.
struct PageTableBuilder {
    let memory: GuestMemoryRegion
    var next: UInt64
    let limit: UInt64
    var root: UInt64 = 0
    var pages: UInt64 = 0

    init(memory: GuestMemoryRegion, next: UInt64, limit: UInt64) {
        self.memory = memory
        self.next = next
        self.limit = limit
        root = next
    }

    mutating func allocate() throws(KVMError) -> UInt64 {
        guard next + 4096 <= limit else { throw KVMError.invalid("page-table area exhausted (\(pages) pages)") }
        let p = next
        next += 4096
        pages += 1
        // The area is fresh anonymous memory: already zero.
        return p
    }

    /// Maps one page of `size` at `gva` to `gpa`: present, writable, user.
    mutating func map(_ gva: GuestVirtualAddress, to gpa: GuestPhysicalAddress, size: PageSize) throws(KVMError) {
        let inner: PageTableEntry.Flags = [.present, .writable, .user]
        var table = root
        var level = 4
        while level > size.leafLevel {
            let slot = GuestPhysicalAddress(rawValue: table + UInt64(gva.tableIndex(level: level)) * 8)
            var e = PageTableEntry(rawValue: try memory.load(UInt64.self, at: slot))
            if !e.isPresent {
                let t = try allocate()
                e = PageTableEntry(frameAddress: t, flags: inner)
                try memory.store(e.rawValue, at: slot)
            } else if e.isLargePage {
                throw KVMError.invalid("page tables: \(gva) overlaps a large page")
            }
            table = e.address
            level -= 1
        }
        let slot = GuestPhysicalAddress(rawValue: table + UInt64(gva.tableIndex(level: level)) * 8)
        let leaf = PageTableEntry(frameAddress: gpa.rawValue, flags: size == .size4K ? inner : inner.union(.pageSize))
        try memory.store(leaf.rawValue, at: slot)
    }
}
