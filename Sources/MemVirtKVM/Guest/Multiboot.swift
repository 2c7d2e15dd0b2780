import CKVM
import MemVirtCore
import MemVirtGuest
#if canImport(Glibc)
import Glibc
#endif

// Multiboot (v1) images: loading one the way QEMU's `-kernel` does, and writing the guest
// runtime as one (`memvirt kvm image`).
//
// The Multiboot Specification 0.6.96 (GNU GRUB): a header of magic 0x1BADB002, flags and a
// checksum (magic + flags + checksum = 0 mod 2^32) in the first 8192 bytes, 4-byte aligned.
// Flag bits 0-15 are requirements a loader must refuse if it cannot meet them (0: align
// modules on pages, 1: memory information, 2: video mode); bit 16 says the header carries the
// load addresses itself (the "a.out kludge"), else the image is ELF (QEMU takes ELF32 only and
// refuses x86-64 ELF). Machine state at entry: EAX = 0x2BADB002, EBX = physical address of
// the multiboot information, CS/DS/ES/FS/GS/SS flat 4 GiB segments (code: read/execute,
// data: read/write), CR0.PE = 1, CR0.PG = 0, EFLAGS.IF = 0, ESP undefined.

/// What a multiboot guest said on the ports both VMMs see (memvirt_multiboot.h).
public final class MultibootState: @unchecked Sendable {
    private var lock = pthread_mutex_t()
    private var text: [UInt8] = []
    private var _exit: UInt64?
    private var _mailbox: UInt64?
    init() { pthread_mutex_init(&lock, nil) }
    deinit { pthread_mutex_destroy(&lock) }

    /// Everything written to port 0xE9 so far.
    public var console: String { pthread_mutex_lock(&lock); defer { pthread_mutex_unlock(&lock) }; return String(decoding: text, as: UTF8.self) }
    /// The value written to port 0xF4 (the guest powered off), if it did.
    public var exitValue: UInt64? { pthread_mutex_lock(&lock); defer { pthread_mutex_unlock(&lock) }; return _exit }
    /// The guest-physical address of the mailbox the guest announced (our image does).
    public var mailbox: UInt64? { pthread_mutex_lock(&lock); defer { pthread_mutex_unlock(&lock) }; return _mailbox }

    func setMailbox(_ a: UInt64?) { pthread_mutex_lock(&lock); _mailbox = a; pthread_mutex_unlock(&lock) }
    func clearExit() { pthread_mutex_lock(&lock); _exit = nil; pthread_mutex_unlock(&lock) }

    /// Handles an `out`; false for a port a multiboot guest does not use.
    func port(_ port: UInt16, _ data: UInt64) throws(KVMError) -> Bool {
        pthread_mutex_lock(&lock); defer { pthread_mutex_unlock(&lock) }
        switch Int32(port) {
        case MEMVIRT_MB_PORT_CONSOLE:
            // Bounded: a guest printing forever cannot take the VMM's memory.
            if text.count < 1 << 20 { text.append(UInt8(truncatingIfNeeded: data)) }
        case MEMVIRT_MB_PORT_EXIT: _exit = data
        case MEMVIRT_MB_PORT_MAILBOX: _mailbox = data
        default: return false
        }
        return true
    }
}

/// A parsed multiboot image: what to copy where, and where to enter.
public struct MultibootImage: Sendable {
    public struct Segment: Sendable {
        public var address: UInt64
        public var bytes: [UInt8]
        /// Bytes in memory (the rest after `bytes` is zero: bss).
        public var memorySize: UInt64
    }
    public var headerOffset: Int
    public var flags: UInt32
    public var entry: UInt32
    public var segments: [Segment]
    /// "elf32" or "a.out kludge".
    public var format: String

    public static let magic: UInt32 = 0x1BAD_B002

    /// The requirement bits (0-15) of a header's flags, named as the specification names them:
    /// 0 page-aligned modules, 1 memory information, 2 video mode information; 3-15 are
    /// reserved (a loader must refuse an image that sets one it does not know).
    public static func describeRequirements(_ bits: UInt32) -> String {
        let names = [0: "page-aligned modules", 1: "memory information", 2: "video mode information"]
        return (0..<16).filter { bits & (1 << UInt32($0)) != 0 }
            .map { "bit \($0): " + (names[$0] ?? "reserved requirement, unknown to this loader") }
            .joined(separator: "; ")
    }
    public static let bootloaderMagic: UInt32 = 0x2BAD_B002

    /// Parses `bytes` (from `name`, for messages). Every refusal says what and where.
    public static func parse(_ bytes: [UInt8], name: String = "image") throws(KVMError) -> MultibootImage {
        func u32(_ o: Int) -> UInt32 { UInt32(bytes[o]) | UInt32(bytes[o + 1]) << 8 | UInt32(bytes[o + 2]) << 16 | UInt32(bytes[o + 3]) << 24 }
        func u16(_ o: Int) -> UInt16 { UInt16(bytes[o]) | UInt16(bytes[o + 1]) << 8 }
        func hex<T: BinaryInteger>(_ v: T) -> String { "0x" + String(v, radix: 16) }
        var found: Int? = nil
        var badChecksum: (Int, UInt32, UInt32)? = nil
        var o = 0
        while o + 12 <= min(bytes.count, 8192) {
            if u32(o) == magic {
                let f = u32(o + 4), c = u32(o + 8)
                if magic &+ f &+ c == 0 { found = o; break }
                if badChecksum == nil { badChecksum = (o, f, c) }
            }
            o += 4
        }
        guard let h = found else {
            if let (bo, f, c) = badChecksum {
                throw KVMError.invalid("\(name): multiboot header at offset \(hex(bo)) has a bad checksum: magic \(hex(magic)) + flags \(hex(f)) + checksum \(hex(c)) = \(hex(magic &+ f &+ c)), must be 0")
            }
            let elf64 = bytes.count >= 5 && bytes[0] == 0x7f && bytes[1] == 0x45 && bytes[2] == 0x4c && bytes[3] == 0x46 && bytes[4] == 2
            throw KVMError.invalid("\(name): not a multiboot image: no header (magic \(hex(magic)), 4-byte aligned) in the first 8192 bytes of \(bytes.count)" + (elf64 ? " (it is a 64-bit ELF: give a multiboot v1 kernel, ELF32 or a.out kludge)" : ""))
        }
        let flags = u32(h + 4)
        // Requirements (bits 0-15): 0 (page-aligned modules: we load none) and 1 (memory
        // information: always given) are met; 2 (video mode) and the undefined ones are not.
        let unmet = flags & 0xffff & ~UInt32(0x3)
        if unmet != 0 {
            throw KVMError.invalid("\(name): multiboot header at offset \(hex(h)) requires flags \(hex(unmet)) (\(MultibootImage.describeRequirements(unmet))), which this loader does not provide")
        }
        if flags & 0x1_0000 != 0 {
            // The a.out kludge: header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr.
            guard h + 32 <= bytes.count else { throw KVMError.invalid("\(name): multiboot header at \(hex(h)) is cut short (the address fields need 32 bytes)") }
            let headerAddr = UInt64(u32(h + 12)), loadAddr = UInt64(u32(h + 16)), loadEnd = UInt64(u32(h + 20))
            let bssEnd = UInt64(u32(h + 24)), entry = u32(h + 28)
            guard headerAddr >= loadAddr, headerAddr - loadAddr <= UInt64(h) else {
                throw KVMError.invalid("\(name): a.out kludge: header_addr \(hex(headerAddr)) and load_addr \(hex(loadAddr)) put the load start before the file's beginning")
            }
            let fileStart = h - Int(headerAddr - loadAddr)
            let length = loadEnd == 0 ? UInt64(bytes.count - fileStart) : (loadEnd >= loadAddr ? loadEnd - loadAddr : UInt64.max)
            guard length != UInt64.max, UInt64(fileStart) + length <= UInt64(bytes.count) else {
                throw KVMError.invalid("\(name): a.out kludge: load_end_addr \(hex(loadEnd)) runs past the file (\(bytes.count) bytes from load_addr \(hex(loadAddr)))")
            }
            let end = bssEnd == 0 ? loadAddr + length : bssEnd
            guard end >= loadAddr + length else { throw KVMError.invalid("\(name): a.out kludge: bss_end_addr \(hex(bssEnd)) lies before load_end_addr") }
            guard UInt64(entry) >= loadAddr, UInt64(entry) < loadAddr + max(length, 1) else {
                throw KVMError.invalid("\(name): a.out kludge: entry_addr \(hex(entry)) is outside the loaded range \(hex(loadAddr))-\(hex(loadAddr + length))")
            }
            let seg = Segment(address: loadAddr, bytes: Array(bytes[fileStart..<(fileStart + Int(length))]), memorySize: end - loadAddr)
            return MultibootImage(headerOffset: h, flags: flags, entry: entry, segments: [seg], format: "a.out kludge")
        }
        // ELF.
        guard bytes.count >= 52, bytes[0] == 0x7f, bytes[1] == 0x45, bytes[2] == 0x4c, bytes[3] == 0x46 else {
            throw KVMError.invalid("\(name): multiboot header at \(hex(h)) without the a.out kludge (flag 16), but the file is not ELF")
        }
        guard bytes[4] == 1 else {
            throw KVMError.invalid("\(name): ELF class \(bytes[4]) (64-bit): a multiboot v1 loader (as QEMU's -kernel) loads ELF32 images")
        }
        guard bytes[5] == 1, u16(18) == 3 else { throw KVMError.invalid("\(name): ELF32 for machine \(u16(18)), byte order \(bytes[5]): need little-endian i386 (3)") }
        let entry = u32(24), phoff = Int(u32(28)), phentsize = Int(u16(42)), phnum = Int(u16(44))
        guard phentsize >= 32, phnum >= 1, phnum <= 64, phoff + phnum * phentsize <= bytes.count else {
            throw KVMError.invalid("\(name): ELF32 program headers (offset \(phoff), \(phnum) x \(phentsize) bytes) are missing or outside the file")
        }
        var segs: [Segment] = []
        for i in 0..<phnum {
            let p = phoff + i * phentsize
            guard u32(p) == 1 else { continue }  // PT_LOAD
            let off = Int(u32(p + 4)), paddr = UInt64(u32(p + 12)), filesz = Int(u32(p + 16)), memsz = UInt64(u32(p + 20))
            guard off <= bytes.count, filesz <= bytes.count - off, UInt64(filesz) <= memsz else {
                throw KVMError.invalid("\(name): ELF32 segment \(i): file bytes \(hex(off))+\(hex(filesz)) outside the file (\(bytes.count) bytes) or larger than its memory size \(hex(memsz))")
            }
            if memsz == 0 { continue }
            segs.append(Segment(address: paddr, bytes: Array(bytes[off..<(off + filesz)]), memorySize: memsz))
        }
        guard !segs.isEmpty else { throw KVMError.invalid("\(name): ELF32 with no loadable (PT_LOAD) segment") }
        return MultibootImage(headerOffset: h, flags: flags, entry: entry, segments: segs, format: "elf32")
    }
}

/// A multiboot guest booted on /dev/kvm: the VM, its console, its exit.
public struct MultibootRunReport: Sendable {
    public var exitValue: UInt64?
    public var console: String
    /// The guest's `result` line (our image), parsed.
    public var result: [String: UInt64]
    public var wallNanos: UInt64
    public var memoryBytes: UInt64
    public var format: String
    public var vcpuStats: StatValues

    /// A result `GuestReport` (nil when the guest printed no result line).
    public var guest: GuestReport? {
        guard let rs = result["read_sum"] else { return nil }
        return GuestReport(accesses: result["accesses"] ?? 0, reads: result["reads"] ?? 0, writes: result["writes"] ?? 0, readSum: rs, memoryChecksum: result["memory_checksum"])
    }

    public var json: JSONValue {
        .object([
            ("schema", "memvirt.multiboot-run/1"), ("format", .string(format)),
            ("exit_value", exitValue.map { .uint($0) } ?? .null), ("memory_bytes", .uint(memoryBytes)),
            ("wall_ms", .double(Double(wallNanos / 1000) / 1000)),
            ("result", .object(result.sorted { $0.key < $1.key }.map { ($0.key, .uint($0.value)) })),
            ("exits", .uint(vcpuStats["exits"])), ("io_exits", .uint(vcpuStats["io_exits"])), ("pf_fixed", .uint(vcpuStats["pf_fixed"])),
            ("insn_emulation", .uint(vcpuStats["insn_emulation"])),
            ("console", .string(console)),
        ])
    }

    /// key=value pairs of the last line holding `memvirt-guest: result` (`cpu`: 1 for the
    /// second CPU's `memvirt-guest: cpu1 result` line of a vcpus=2 guest).
    public static func parseResult(_ console: String, cpu: Int = 0) -> [String: UInt64] {
        var out: [String: UInt64] = [:]
        let prefix = cpu == 0 ? "memvirt-guest: result " : "memvirt-guest: cpu\(cpu) result "
        for line in console.split(separator: "\n") where line.hasPrefix(prefix) {
            out = [:]
            for tok in line.split(separator: " ") {
                let kv = tok.split(separator: "=", maxSplits: 1)
                if kv.count == 2, let v = UInt64(kv[1]) { out[String(kv[0])] = v }
            }
        }
        return out
    }
}

public enum Multiboot {
    /// Where MemVirt splits guest RAM into two KVM slots: below, the runtime (sent whole at a
    /// migration's stop), above, the dirty-logged data slot. Our image puts its workload here.
    public static let lowBytes = UInt64(MEMVIRT_MB_DATA_BASE)
    /// Guest RAM limits: the low slot plus at least one page; at most 3 GiB (below the
    /// 32-bit PCI hole that PC machines such as QEMU's keep at 3-4 GiB).
    public static let maxMemory: UInt64 = 3 << 30

    /// The most vCPUs a multiboot VM gets here (our image starts its second CPU itself).
    public static let maxVCPUs = 2

    /// The GuestConfig of a multiboot VM with `memory` bytes of RAM and `vcpus` vCPUs. With
    /// more than one, KVM's in-kernel irqchip: the local APICs the guest sends INIT and SIPI
    /// through, and vCPUs past 0 waiting for them (KVM_MP_STATE_UNINITIALIZED), as on a PC.
    public static func config(memory: UInt64, vcpus: Int = 1) throws(KVMError) -> GuestConfig {
        guard memory % 4096 == 0, memory >= lowBytes + (4 << 20), memory <= maxMemory else {
            throw KVMError.invalid("guest memory \(ByteCount(memory)): use a multiple of 4KiB from \(ByteCount(lowBytes + (4 << 20))) to \(ByteCount(maxMemory))")
        }
        guard vcpus >= 1, vcpus <= maxVCPUs else { throw KVMError.invalid("multiboot vCPUs \(vcpus): use 1...\(maxVCPUs)") }
        var c = GuestConfig(dataSize: memory - lowBytes)
        c.multibootLowBytes = lowBytes
        c.vcpus = vcpus
        c.irqchip = vcpus > 1
        return c
    }

    /// Copies `bytes` to guest-physical `gpa`, across the two slots.
    static func write(_ g: GuestVM, _ bytes: UnsafeRawBufferPointer, at gpa: UInt64) throws(KVMError) {
        var done = 0
        while done < bytes.count {
            let a = gpa + UInt64(done)
            let region = a < g.runtime.size ? g.runtime : g.data
            let room = Int(region.guestPhysical.rawValue + region.size - a)
            let n = min(room, bytes.count - done)
            try region.write(UnsafeRawBufferPointer(rebasing: bytes[done..<(done + n)]), at: GuestPhysicalAddress(rawValue: a))
            done += n
        }
    }

    static func write(_ g: GuestVM, _ bytes: [UInt8], at gpa: UInt64) throws(KVMError) {
        let r: Result<Void, KVMError> = bytes.withUnsafeBytes { b in
            do throws(KVMError) { try write(g, b, at: gpa); return .success(()) } catch { return .failure(error) }
        }
        try r.get()
    }

    /// Loads `image` into `g` (RAM `memory` bytes), writes the multiboot information after the
    /// highest loaded byte (as QEMU does), and sets vCPU 0 to the multiboot entry state.
    /// `cmdline` is what the guest gets (QEMU passes "<kernel path> <append>").
    public static func load(_ image: MultibootImage, into g: GuestVM, cmdline: String) throws(KVMError) {
        let memory = g.runtime.size + g.data.size
        func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }
        var top: UInt64 = 0
        for (i, s) in image.segments.enumerated() {
            guard s.address >= 0x1000, s.address <= memory, s.memorySize <= memory - s.address else {
                throw KVMError.invalid("multiboot segment \(i) at \(hex(s.address)), \(s.memorySize) bytes, lies outside guest RAM (0x1000-\(hex(memory)))")
            }
            try write(g, s.bytes, at: s.address)
            // bss: fresh guest RAM is already zero.
            top = max(top, s.address + s.memorySize)
        }
        let entry = UInt64(image.entry)
        guard image.segments.contains(where: { entry >= $0.address && entry < $0.address + $0.memorySize }) else {
            throw KVMError.invalid("multiboot entry \(hex(entry)) is in no loaded segment")
        }
        // The information block: info (0x000), memory map (0x100), loader name (0x200),
        // command line (0x1000, up to 4095 bytes).
        let info = (top + 4095) / 4096 * 4096
        let cmd = Array(cmdline.utf8)
        guard cmd.count < 4096, !cmd.contains(0) else { throw KVMError.invalid("multiboot command line of \(cmd.count) bytes: at most 4095, no NUL") }
        guard info + 0x2000 <= memory else {
            throw KVMError.invalid("no room for the multiboot information after the image (ends at \(hex(top))) in guest RAM of \(hex(memory))")
        }
        var w = ByteWriter()
        let mmapEntries: [(UInt64, UInt64, UInt32)] = [(0, 0x9_fc00, 1), (0x9_fc00, 0x6_0400, 2), (0x10_0000, memory - 0x10_0000, 1)]
        // flags: 0 mem_lower/mem_upper, 2 cmdline, 6 mmap, 9 boot_loader_name.
        w.put(UInt32(1 | 1 << 2 | 1 << 6 | 1 << 9))
        w.put(UInt32(0x9_fc00 / 1024))                       // mem_lower (KiB below 1 MiB)
        w.put(UInt32((memory - 0x10_0000) / 1024))          // mem_upper (KiB from 1 MiB)
        w.put(UInt32(0xffff_ffff))                           // boot_device (none)
        w.put(UInt32(info + 0x1000))                         // cmdline
        w.put(UInt32(0)); w.put(UInt32(0))                   // mods_count, mods_addr
        for _ in 0..<4 { w.put(UInt32(0)) }                  // syms
        w.put(UInt32(mmapEntries.count * 24)); w.put(UInt32(info + 0x100))  // mmap_length, mmap_addr
        w.put(UInt32(0)); w.put(UInt32(0)); w.put(UInt32(0)) // drives, config_table
        w.put(UInt32(info + 0x200))                          // boot_loader_name
        while w.bytes.count < 0x100 { w.put(UInt8(0)) }
        for (b, l, t) in mmapEntries { w.put(UInt32(20)); w.put(b); w.put(l); w.put(t) }
        while w.bytes.count < 0x200 { w.put(UInt8(0)) }
        w.bytes += Array("memvirt".utf8) + [0]
        while w.bytes.count < 0x1000 { w.put(UInt8(0)) }
        w.bytes += cmd + [0]
        try write(g, w.bytes, at: info)

        // 32-bit protected mode, flat segments, paging off.
        let v = g.vcpus[0]
        var s = try v.getSregs()
        func seg(_ sel: UInt16, type: UInt8) -> kvm_segment {
            kvm_segment(base: 0, limit: 0xffff_ffff, selector: sel, type: type, present: 1, dpl: 0, db: 1, s: 1, l: 0, g: 1, avl: 0, unusable: 0, padding: 0)
        }
        s.cs = seg(0x08, type: 11)
        let d = seg(0x10, type: 3)
        s.ds = d; s.es = d; s.fs = d; s.gs = d; s.ss = d
        s.tr = kvm_segment(base: 0, limit: 0xffff, selector: 0, type: 11, present: 1, dpl: 0, db: 0, s: 0, l: 0, g: 0, avl: 0, unusable: 0, padding: 0)
        s.ldt = kvm_segment(base: 0, limit: 0xffff, selector: 0, type: 2, present: 1, dpl: 0, db: 0, s: 0, l: 0, g: 0, avl: 0, unusable: 1, padding: 0)
        s.gdt = kvm_dtable(base: 0, limit: 0xffff, padding: (0, 0, 0))
        s.idt = kvm_dtable(base: 0, limit: 0xffff, padding: (0, 0, 0))
        s.cr0 = 0x11      // PE, ET
        s.cr3 = 0
        s.cr4 = 0
        s.efer = 0
        try v.setSregs(s)
        var r = kvm_regs()
        r.rip = entry
        r.rax = UInt64(MultibootImage.bootloaderMagic)
        r.rbx = info
        r.rsp = 0x7000    // undefined by the spec; somewhere harmless below 640 KiB
        r.rflags = 0x2
        try v.setRegs(r)
    }

    /// Boots `image` with `memory` bytes of RAM and `cmdline`, runs it until it writes port
    /// 0xF4 (or fails), and reports its console and result.
    /// The default of `timeoutNanos` (`--max-run`): a foreign kernel may never power off.
    public static let defaultMaxRunNanos: UInt64 = 600_000_000_000

    public static func run(_ image: MultibootImage, memory: UInt64, cmdline: String, timeoutNanos: UInt64 = defaultMaxRunNanos,
                           memoryLimit: UInt64? = nil, vcpus: Int = 1) throws(KVMError) -> MultibootRunReport {
        try HostMemoryBudget(parts: [("guest RAM", memory)]).check("this multiboot guest", limit: memoryLimit)
        let kvm = try KVM()
        let g = try GuestVM(kvm: kvm, config: try config(memory: memory, vcpus: vcpus))
        try load(image, into: g, cmdline: cmdline)
        let stats = try g.vcpus[0].stats()
        let before = try stats.read()
        let t0 = monotonicNanoseconds()
        let kicker = VCPUKicker(vm: g)
        let watchdog = try DedicatedThread.start(name: "memvirt-mb-watchdog") {
            let start = monotonicNanoseconds()
            while g.multiboot!.exitValue == nil && monotonicNanoseconds() - start < timeoutNanos && !kicker.stopRequested { usleepNanos(20_000_000) }
            if g.multiboot!.exitValue == nil && !kicker.stopRequested { kicker.stop() }
        }
        // vCPUs past 0 wait in KVM for the guest's INIT/SIPI; one that fails stops the VM.
        let others = ResultBox<Void>()
        var threads: [DedicatedThread] = []
        for i in 1..<g.vcpus.count {
            threads.append(try DedicatedThread.start(name: "memvirt-vcpu\(i)") {
                do { _ = try g.execute(vcpu: i, kicker: kicker) } catch let e as KVMError {
                    others.value = .failure(e)
                    if !kicker.stopRequested { kicker.stop() }
                } catch {}
            })
        }
        let outcome: Result<CommandOutcome, KVMError>
        do { outcome = .success(try onDedicatedThread(name: "memvirt-vcpu0") { () throws(KVMError) in try g.execute(vcpu: 0, kicker: kicker) }) } catch { outcome = .failure(error) }
        if !kicker.stopRequested { kicker.stop() }
        for t in threads { t.join() }
        watchdog.join()
        if case .failure(let e)? = others.value {
            throw KVMError.invalid("the multiboot guest's vCPU 1 failed: \(e); its console:\n" + g.multiboot!.console)
        }
        let t1 = monotonicNanoseconds()
        let after = try stats.read()
        let console = g.multiboot!.console
        switch outcome {
        case .failure(let e):
            throw KVMError.invalid("the multiboot guest failed: \(e)" + (console.isEmpty ? "" : "; its console:\n" + console))
        case .success(let o):
            if o.stopped && g.multiboot!.exitValue == nil {
                throw KVMError.invalid("the multiboot guest did not power off (port 0xf4) within --max-run \(Duration64(rawValue: timeoutNanos)); its console:\n" + console)
            }
        }
        return MultibootRunReport(exitValue: g.multiboot!.exitValue, console: console, result: MultibootRunReport.parseResult(console),
                                  wallNanos: t1 - t0, memoryBytes: memory, format: image.format,
                                  vcpuStats: after.delta(since: before, descriptors: stats.descriptors))
    }

    /// Reads and parses a kernel file.
    public static func read(path: String) throws(KVMError) -> MultibootImage {
        guard let f = fopen(path, "rb") else { throw KVMError.invalid("cannot open kernel '\(path)': \(String(cString: strerror(errno)))") }
        defer { fclose(f) }
        var st = stat()
        if fstat(fileno(f), &st) != 0 { throw KVMError.call("fstat(\(path))", lastErrno()) }
        try requireRegularFile(st, path: path, what: "kernel")
        var bytes: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            let n = fread(&buf, 1, buf.count, f)
            if n <= 0 {
                if ferror(f) != 0 { throw KVMError.call("read kernel '\(path)'", lastErrno()) }
                break
            }
            bytes += buf[0..<n]
            if bytes.count > 1 << 30 { throw KVMError.invalid("kernel '\(path)' is larger than 1 GiB") }
        }
        return try MultibootImage.parse(bytes, name: path)
    }

    // MARK: the guest runtime as a multiboot image

    /// Where the image loads and what is where (offsets from `loadAddress`).
    public static let loadAddress: UInt64 = 0x10_0000
    static let pml4: UInt64 = 0x0, pdpt: UInt64 = 0x1000, pds: UInt64 = 0x2000  // 4 PDs: 0-4 GiB in 2 MiB pages
    static let gdt: UInt64 = 0x6000, idt: UInt64 = 0x7000, tss: UInt64 = 0x8000
    static let tssLimit: UInt64 = 104 + 8192          // header, I/O bitmap (all ports allowed), 0xff terminator
    static let kernelStackTop: UInt64 = 0xC000, mailbox: UInt64 = 0xC000, userStackTop: UInt64 = 0x11000
    static let code: UInt64 = 0x11000
    /// Where the segment starts in the file.
    static let segmentFileOffset = 0x1000

    /// The guest runtime (boot32.S + multiboot.c + guest.c, the section copied out of this
    /// binary) wrapped in an ELF32 multiboot image with prebuilt tables.
    public static func runtimeImage() -> [UInt8] {
        var img = memvirt_mb_image()
        memvirt_guest_multiboot_get(&img)
        let L = loadAddress
        var mem = [UInt8](repeating: 0, count: Int(code) + Int(img.size))
        func put64(_ v: UInt64, _ at: UInt64) { for k in 0..<8 { mem[Int(at) + k] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(k))) } }
        func put32(_ v: UInt32, _ at: UInt64) { for k in 0..<4 { mem[Int(at) + k] = UInt8(truncatingIfNeeded: v >> (8 * UInt32(k))) } }
        func put16(_ v: UInt16, _ at: UInt64) { mem[Int(at)] = UInt8(v & 0xff); mem[Int(at) + 1] = UInt8(v >> 8) }
        // The code.
        let section = UnsafeRawBufferPointer(start: img.start, count: Int(img.size))
        for (k, b) in section.enumerated() { mem[Int(code) + k] = b }
        // Identity map of 0-4 GiB: present, writable, user; 2 MiB leaves (PS).
        put64((L + pdpt) | 0x7, pml4)
        for i in 0..<UInt64(4) {
            put64((L + pds + i * 4096) | 0x7, pdpt + i * 8)
            for j in 0..<UInt64(512) { put64(((i * 512 + j) << 21) | 0x87, pds + i * 4096 + j * 8) }
        }
        // GDT: null, kernel code 0x08 (64-bit), kernel data 0x10, user data 0x18, user code 0x20, TSS 0x28 (as GuestRuntime),
        // and 0x38: a second descriptor of the same TSS for CPU 1 (ltr marks a descriptor busy; in 64-bit mode the CPU
        // reads only RSP0 and the I/O bitmap from the TSS, which both CPUs can share).
        let gdtEntries: [UInt64] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0x00cf_f300_0000_ffff, 0x00af_fb00_0000_ffff]
        for (i, e) in gdtEntries.enumerated() { put64(e, gdt + UInt64(i) * 8) }
        let tb = L + tss
        var lo = tssLimit & 0xffff
        lo |= (tb & 0xff_ffff) << 16
        lo |= UInt64(0x89) << 40
        lo |= ((tssLimit >> 16) & 0xf) << 48
        lo |= ((tb >> 24) & 0xff) << 56
        put64(lo, gdt + 40); put64(tb >> 32, gdt + 48)
        put64(lo, gdt + 56); put64(tb >> 32, gdt + 64)
        // IDT: vectors 0-31 to the stubs (DPL 0).
        for v in 0..<UInt64(32) {
            let target = L + code + img.stubs_offset + 16 * v
            put64((target & 0xffff) | (0x08 << 16) | (UInt64(0x8e) << 40) | (((target >> 16) & 0xffff) << 48), idt + 16 * v)
            put64(target >> 32, idt + 16 * v + 8)
        }
        // TSS: RSP0, I/O bitmap right after the header (zero bits: every port allowed), 0xff.
        put64(L + kernelStackTop, tss + 4)
        put16(104, tss + 102)
        mem[Int(tss + tssLimit)] = 0xff
        // The boot parameters (memvirt_multiboot.h) and the entry's immediate.
        let p = code + img.params_offset
        let gdtLimit = UInt16(9 * 8 - 1)
        put16(gdtLimit, p + 2); put32(UInt32(L + gdt), p + 4)
        put32(UInt32(L + pml4), p + 8)
        put16(UInt16(32 * 16 - 1), p + 22); put64(L + idt, p + 24)
        put64(L + kernelStackTop, p + 32)
        put64(L + userStackTop - 8, p + 40)
        put64(L + code + img.main_offset, p + 48)
        put64(L + mailbox, p + 56)
        put16(0x28, p + 64)
        // CPU 1 (memvirt_multiboot.h): its TSS selector, stacks, entry, mailbox; the trampoline's fields.
        put16(0x38, p + 66)
        put64(UInt64(MEMVIRT_MB_AP_KERNEL_STACK), p + 72)
        put64(UInt64(MEMVIRT_MB_AP_USER_STACK) - 8, p + 80)
        put64(L + code + img.ap_main_offset, p + 88)
        put64(UInt64(MEMVIRT_MB_AP_MAILBOX), p + 96)
        put32(UInt32(L + code + img.ap64_offset), code + img.ap16_far_offset)
        put16(gdtLimit, code + img.ap16_gdtr_offset); put32(UInt32(L + gdt), code + img.ap16_gdtr_offset + 2)
        put32(UInt32(L + pml4), code + img.ap16_cr3_offset)
        put32(UInt32(L + code + img.boot32_offset + 5), code + img.boot32_imm_offset)

        // The file: ELF32 header, one program header, the multiboot header, the segment.
        let entry = UInt32(L + code + img.boot32_offset)
        var w = ByteWriter()
        w.bytes += [0x7f, 0x45, 0x4c, 0x46, 1, 1, 1, 0] + [UInt8](repeating: 0, count: 8)
        w.put(UInt16(2)); w.put(UInt16(3)); w.put(UInt32(1))    // ET_EXEC, EM_386, EV_CURRENT
        w.put(entry); w.put(UInt32(52)); w.put(UInt32(0)); w.put(UInt32(0))  // entry, phoff, shoff, flags
        w.put(UInt16(52)); w.put(UInt16(32)); w.put(UInt16(1)); w.put(UInt16(40)); w.put(UInt16(0)); w.put(UInt16(0))
        w.put(UInt32(1)); w.put(UInt32(segmentFileOffset)); w.put(UInt32(L)); w.put(UInt32(L))  // PT_LOAD
        w.put(UInt32(mem.count)); w.put(UInt32(mem.count)); w.put(UInt32(7)); w.put(UInt32(0x1000))
        while w.bytes.count < 0x60 { w.put(UInt8(0)) }
        let flags: UInt32 = 0x3  // page-align modules, memory information
        w.put(MultibootImage.magic); w.put(flags); w.put(UInt32(0) &- MultibootImage.magic &- flags)
        while w.bytes.count < segmentFileOffset { w.put(UInt8(0)) }
        return w.bytes + mem
    }

    /// The command line our image reads for `spec` (thread 0's stream). `rate` paces accesses
    /// (per second) and `gapMicros` sets the gap threshold; both need `tscKHz`. `vcpus` 2: the
    /// image starts its second CPU, which runs `spec` with seed + 1 over the next footprint.
    public static func commandLine(_ spec: WorkloadSpec, rate: UInt64? = nil, tscKHz: UInt64? = nil, gapMicros: UInt64? = nil, vcpus: Int = 1) throws(KVMError) -> String {
        let p: String
        switch spec.pattern {
        case .sequential: p = "sequential"
        case .strided(let s): p = "strided:\(s)"
        case .uniform: p = "uniform"
        case .gups: p = "gups"
        default: throw KVMError.invalid("the multiboot image runs sequential, strided, uniform and gups workloads, not \(spec.pattern)")
        }
        guard spec.threads == 1 else { throw KVMError.invalid("the multiboot image runs one thread") }
        var s = "pattern=\(p) footprint=\(spec.footprint.rawValue) accesses=\(spec.accesses) write-ratio=\(spec.writeRatio) seed=\(spec.seed)"
        if spec.computePerAccess > 0 { s += " compute=\(spec.computePerAccess)" }
        if let k = tscKHz { s += " tsc-khz=\(k)" }
        if let r = rate { s += " rate=\(r)" }
        if let gm = gapMicros { s += " gap-us=\(gm)" }
        guard vcpus >= 1, vcpus <= maxVCPUs else { throw KVMError.invalid("multiboot vCPUs \(vcpus): use 1...\(maxVCPUs)") }
        if vcpus > 1 { s += " vcpus=\(vcpus)" }
        return s
    }

    /// This host's TSC rate as KVM gives it to guests (KVM_GET_TSC_KHZ), from a scratch VM.
    public static func hostTSCKHz() throws(KVMError) -> UInt64 {
        let kvm = try KVM()
        let vm = try VirtualMachine(kvm: kvm)
        let v = try vm.createVCPU(id: 0)
        let k = ckvm_get_tsc_khz(v.fd.raw)
        guard k > 0 else { throw KVMError.unavailable("KVM_GET_TSC_KHZ gave \(k)") }
        return UInt64(k)
    }
}

extension LiveMigration {
    /// Boots `image` (RAM `memory`, command line `cmdline`) here, migrates it to `host:port`
    /// after `options.afterNanos` with MemVirt's own migration; the destination (`kvm listen`)
    /// runs the guest to its power-off and returns its result (the image's mailbox).
    public static func migrate(kernel image: MultibootImage, memory: UInt64, cmdline: String, to host: String, port: UInt16,
                               options o: MigrationOptions, vcpus: Int = 1) throws(KVMError) -> MigrationReport {
        guard o.groupPages == 1 else { throw KVMError.invalid("--group-pages is for runtime guests") }
        let kvm = try KVM()
        var c = try Multiboot.config(memory: memory, vcpus: vcpus)
        c.dataSlotFlags = .logDirtyPages
        c.manualDirtyProtect = kvm.check(.manualDirtyLogProtect2) > 0
        let g = try GuestVM(kvm: kvm, config: c)
        try Multiboot.load(image, into: g, cmdline: cmdline)
        var r = try migrate(g, threads: 1, to: host, port: port, options: o)
        r.console = g.multiboot?.console
        return r
    }

    /// A multiboot guest's result: from its mailbox if it announced one (our image), else
    /// from its console's result line.
    static func multibootGuest(_ g: GuestVM, _ mb: MultibootState) throws(KVMError) -> [GuestReport] {
        if mb.mailbox != nil {
            let m = try g.mailbox(0)
            return [GuestReport(accesses: m.done_accesses, reads: m.reads, writes: m.writes, readSum: m.read_sum,
                                memoryChecksum: mb.exitValue == 0 ? m.memory_checksum : nil)]
        }
        let r = MultibootRunReport.parseResult(mb.console)
        guard let rs = r["read_sum"] else { return [] }
        return [GuestReport(accesses: r["accesses"] ?? 0, reads: r["reads"] ?? 0, writes: r["writes"] ?? 0, readSum: rs, memoryChecksum: r["memory_checksum"])]
    }
}

extension LiveMigration {
    /// Both sides in this process over loopback: a destination thread (`listen`, port 0), then
    /// the source. Returns both reports (the destination's holds the guest's result).
    public static func migrateLocally(kernel image: MultibootImage, memory: UInt64, cmdline: String,
                                      options o: MigrationOptions, vcpus: Int = 1) throws(KVMError) -> (source: MigrationReport, destination: MigrationReport) {
        try loopback { (port) throws(KVMError) in try migrate(kernel: image, memory: memory, cmdline: cmdline, to: "127.0.0.1", port: port, options: o, vcpus: vcpus) }
    }
}
