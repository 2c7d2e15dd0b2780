import CKVM
import MemVirtCore
import MemVirtGuest
#if canImport(Glibc)
import Glibc
#endif

/// How `GuestOpsRunner` runs a script.
public struct GuestOpsOptions: Sendable {
    /// Linux's tlb_single_page_flush_ceiling (arch/x86/mm/tlb.c): up to this many changed
    /// pages are flushed by INVLPG each, more by a CR3 reload. The model kernel's
    /// `singlePageFlushCeiling` (33); at most MEMVIRT_OPS_MAX_CEILING.
    public var singlePageFlushCeiling = 33
    /// Frames in the guest kernel's pool (nil: the plan's bound, rounded up to 2 MiB).
    public var poolFrames: Int? = nil
    /// Refuse the run when it would need more host memory than this.
    public var memoryLimit: UInt64? = nil
    /// Run the vCPU thread at SCHED_FIFO priority 1 where permitted (as `kvm calibrate`), so
    /// other processes' load does not sit inside the measured phase's wall time.
    public var realtime = true
    public init() {}
}

/// What the guest kernel counted (the oracle for the model's realization of the same script).
public struct GuestOpsCounts: Sendable, Hashable {
    public var opsExecuted: UInt64
    /// #PFs the guest's handler took (each delivered by KVM: its `pf_guest`).
    public var guestPageFaults: UInt64
    public var demandZero: UInt64
    public var copyOnWriteFaults: UInt64
    public var copyOnWriteCopies: UInt64
    public var spuriousFaults: UInt64
    /// Level-1 entries written (demand faults, COW, protect, unmap, fork, exit).
    public var leafWrites: UInt64
    /// Region PDPT/PD entries written (new page directories and page tables).
    public var tableWrites: UInt64
    /// Entries written into a new space's root and PDPT (the kernel mappings).
    public var kernelWrites: UInt64
    public var invlpg: UInt64
    public var cr3Loads: UInt64
    public var cr3NoFlush: UInt64
    public var fullFlushes: UInt64
    public var framesZeroed: UInt64
    public var tablePages: UInt64
    public var framesInUse: UInt64
    public var peakFrames: UInt64
    public var framesEverUsed: UInt64
    public var forks: UInt64
    public var exits: UInt64
    public var pagesUnmapped: UInt64
    public var touches: UInt64
    public var reads: UInt64
    public var writes: UInt64
    public var readSum: UInt64
    public var checksum: UInt64
    /// Frames handed out again (as data or table) whose last use was a page-table page of an
    /// exited space: KVM may still shadow them, so filling them traps word by word.
    public var reusedTableFrames: UInt64

    init(_ s: memvirt_ops_state) {
        opsExecuted = s.ops_executed
        guestPageFaults = s.guest_pf
        demandZero = s.demand_zero
        copyOnWriteFaults = s.cow_faults
        copyOnWriteCopies = s.cow_copies
        spuriousFaults = s.spurious
        leafWrites = s.leaf_writes
        tableWrites = s.table_writes
        kernelWrites = s.kernel_writes
        invlpg = s.invlpg
        cr3Loads = s.cr3_loads
        cr3NoFlush = s.cr3_noflush
        fullFlushes = s.full_flushes
        framesZeroed = s.frames_zeroed
        tablePages = s.table_pages
        framesInUse = s.frames_in_use
        peakFrames = s.peak_frames
        framesEverUsed = s.bump
        forks = s.forks
        exits = s.exits
        pagesUnmapped = s.pages_unmapped
        touches = s.touches
        reads = s.reads
        writes = s.writes
        readSum = s.read_sum
        checksum = s.checksum
        reusedTableFrames = s.reused_table_frames
    }

    /// By the names of `struct memvirt_ops_state`'s fields (memvirt_ops.h; `frames_ever_used`
    /// is its `bump`), which the model's GuestOpCounts uses too.
    public var fields: [(String, UInt64)] {
        [("ops_executed", opsExecuted), ("guest_pf", guestPageFaults), ("demand_zero", demandZero),
         ("cow_faults", copyOnWriteFaults), ("cow_copies", copyOnWriteCopies), ("spurious", spuriousFaults),
         ("leaf_writes", leafWrites), ("table_writes", tableWrites), ("kernel_writes", kernelWrites),
         ("invlpg", invlpg), ("cr3_loads", cr3Loads), ("cr3_noflush", cr3NoFlush), ("full_flushes", fullFlushes),
         ("frames_zeroed", framesZeroed), ("table_pages", tablePages), ("frames_in_use", framesInUse),
         ("peak_frames", peakFrames), ("frames_ever_used", framesEverUsed), ("forks", forks), ("exits", exits),
         ("pages_unmapped", pagesUnmapped), ("touches", touches), ("reads", reads), ("writes", writes),
         ("read_sum", readSum), ("checksum", checksum), ("reused_table_frames", reusedTableFrames)]
    }

    /// Entry writes of every kind (what a shadow MMU may have to notice).
    public var pageTableWrites: UInt64 { leafWrites + tableWrites + kernelWrites }
}

/// One script's run on /dev/kvm.
public struct GuestOpsResult: Sendable {
    public var script: GuestOpScript
    public var guest: GuestOpsCounts
    /// KVM binary-stat deltas of the measured phase (the script's one command), VM and vCPU
    /// stats together, by KVM's names (cumulative stats; instant ones as their growth).
    public var kvm: [String: UInt64]
    /// KVM's exits by reason over the measured phase (`exits`, `io_exits`, `mmio_exits`, ...).
    public var exits: [String: UInt64] { kvm.filter { $0.key.hasSuffix("_exits") || $0.key == "exits" } }
    /// Exits that reached the VMM (decoded KVM_RUN returns).
    public var vmmExits: [String: UInt64]
    /// The vCPU thread's CPU time (user + system: KVM's work and the guest's) and wall time.
    public var cpuSeconds: Double
    public var wallSeconds: Double
    public var poolFrames: Int
    /// Frames the VMM took for space 0 (its root and PDPT), before the run.
    public var presetFrames: Int
    public var pcidEnabled: Bool
    /// The vCPU thread ran at SCHED_FIFO (see `GuestOpsOptions.realtime`).
    public var realtime: Bool

    public func kvm(_ name: String) -> UInt64 { kvm[name] ?? 0 }

    /// The KVM stats a report shows (what the model predicts), in this order.
    public static let reportedStats = [
        "pf_guest", "pf_fixed", "pf_taken", "pf_emulate", "pf_spurious", "mmu_pte_write", "mmu_unsync", "mmu_shadow_zapped",
        "mmu_pde_zapped", "mmu_flooded", "mmu_recycled", "mmu_cache_miss", "invlpg", "tlb_flush", "insn_emulation",
        "insn_emulation_fail", "exits", "irq_exits", "io_exits", "mmio_exits",
    ]

    /// A table: the guest's counts, KVM's counters and per guest #PF, the times.
    public var text: String {
        func pad(_ s: String, _ n: Int) -> String { s.count >= n ? s : s + String(repeating: " ", count: n - s.count) }
        func lpad(_ s: String, _ n: Int) -> String { s.count >= n ? s : String(repeating: " ", count: n - s.count) + s }
        var t = "guest op script (\(guest.opsExecuted) ops\(pcidEnabled ? ", PCID" : "")): \(formatFixed(wallSeconds, digits: 3)) s wall, \(formatFixed(cpuSeconds, digits: 3)) s vCPU thread CPU, pool \(poolFrames) frames\(realtime ? ", SCHED_FIFO" : "")\n"
        t += "guest kernel:\n"
        for (k, v) in guest.fields { t += "  " + pad(k, 22) + lpad("\(v)", 22) + "\n" }
        t += "KVM (measured phase):\n"
        for k in Self.reportedStats { t += "  " + pad(k, 22) + lpad("\(kvm(k))", 22) + "\n" }
        return t
    }

    public var json: JSONValue {
        .object([
            ("pcid", .bool(pcidEnabled)), ("seed", .uint(script.seed)), ("realtime_scheduling", .bool(realtime)),
            ("measured_seconds", .double(wallSeconds)), ("cpu_seconds", .double(cpuSeconds)),
            ("pool_frames", .int(Int64(poolFrames))), ("preset_frames", .int(Int64(presetFrames))),
            ("guest", .object(guest.fields.map { ($0.0, .uint($0.1)) })),
            ("kvm", .object(kvm.sorted { $0.key < $1.key }.map { ($0.key, .uint($0.value)) })),
            ("exits", .object(exits.sorted { $0.key < $1.key }.map { ($0.key, .uint($0.value)) })),
            ("vmm_exits", .object(vmmExits.sorted { $0.key < $1.key }.map { ($0.key, .uint($0.value)) })),
        ])
    }
}

/// Runs a `GuestOpScript` in a real VM whose guest builds and edits its own page tables
/// (guest_ops.c): the shadow MMU of this host's KVM does its real work, and its counters
/// over the script are the result.
///
/// Guest memory: the runtime (GuestLayout: code, descriptor tables, this state, the script,
/// the per-frame arrays) and the data slot as the guest kernel's frame pool, mapped for CPL3
/// at `directMapBase` with 2 MiB pages (by the VMM's tables, shared by every space through
/// PML4[1]). Space 0's root and PDPT are pool frames 0 and 1, built by the VMM before the
/// first KVM_RUN. A warm-up command first touches the state, the arrays and the code and runs
/// each CPL0 stub once; the measured phase is the script's one command.
public enum GuestOpsRunner {
    /// The direct map: PML4[1], away from the regions (PML4[0], from 256 GiB).
    public static let directMapBase = GuestVirtualAddress(rawValue: 0x80_0000_0000)
    static let pcidBit: UInt64 = 1 << 17

    public static func run(_ script: GuestOpScript, options: GuestOpsOptions = GuestOpsOptions()) throws(KVMError) -> GuestOpsResult {
        let plan: GuestOpsPlan
        do { plan = try GuestOpsPlan(script) } catch { throw KVMError.invalid("guest op script: \(error.message)") }
        guard options.singlePageFlushCeiling >= 0, options.singlePageFlushCeiling <= Int(MEMVIRT_OPS_MAX_CEILING) else {
            throw KVMError.invalid("single-page flush ceiling \(options.singlePageFlushCeiling): use 0...\(MEMVIRT_OPS_MAX_CEILING)")
        }
        let wanted = options.poolFrames ?? plan.peakFramesBound
        guard wanted >= 2, wanted <= 1 << 22 else {
            throw KVMError.invalid("frame pool of \(wanted) frames: use 2...\(1 << 22) (16 GiB)")
        }
        let poolBytes = (UInt64(wanted) * 4096 + (2 << 20) - 1) / (2 << 20) * (2 << 20)
        let frames = Int(poolBytes / 4096)
        let stateBytes = UInt64(MemoryLayout<memvirt_ops_state>.size)
        func up(_ v: UInt64) -> UInt64 { (v + 4095) / 4096 * 4096 }
        let scriptOffset = up(stateBytes)
        let shareOffset = scriptOffset + up(UInt64(plan.words.count * 8))
        let arrayBytes = up(UInt64(frames) * 4)
        let listBytes = shareOffset + 3 * arrayBytes
        try HostMemoryBudget(parts: [("frame pool", poolBytes), ("runtime and script", listBytes + (4 << 20))])
            .check("this guest op script", limit: options.memoryLimit)
        return try onDedicatedThread(name: "memvirt-ops") { () throws(KVMError) -> GuestOpsResult in
            let realtime = options.realtime && enterRealtimeScheduling()
            let kvm = try KVM()
            if script.pcid, try !pcidOffered(kvm) {
                throw KVMError.invalid("this script uses PCIDs, and this host's KVM does not offer PCID to guests (CPUID.01H:ECX bit 17 is clear in KVM_GET_SUPPORTED_CPUID; kvm_pvm does not): run it with pcid off, or on a host whose KVM offers PCID")
            }
            var c = GuestConfig(dataSize: poolBytes)
            c.dataVirtual = directMapBase
            c.dataPageSize = .size2M
            c.listCapacity = Int(listBytes / 8)
            let g = try GuestVM(kvm: kvm, config: c)
            let list = g.layout.list
            let stateGVA = list, scriptGVA = list + scriptOffset, shareGVA = list + shareOffset
            try g.runtime.write(array: plan.words, at: GuestPhysicalAddress(rawValue: scriptGVA))

            // The kernel entries every space carries: PML4[1] (the direct map) and the
            // runtime's PDPT entries, read from the VMM's tables.
            let rootGPA = g.layout.pageTables
            func load(_ a: UInt64) throws(KVMError) -> UInt64 { try g.runtime.load(UInt64.self, at: GuestPhysicalAddress(rawValue: a)) }
            let pml4e0 = try load(rootGPA), pml4e1 = try load(rootGPA + 8)
            let runtimePDPT = PageTableEntry(rawValue: pml4e0).address
            let kernelCount = Int((g.layout.runtimeSize + (1 << 30) - 1) >> 30)
            guard kernelCount <= 3 else { throw KVMError.invalid("runtime area of \(ByteCount(g.layout.runtimeSize)) exceeds 3 GiB") }
            var kernel: [UInt64] = []
            for k in 0..<kernelCount { kernel.append(try load(runtimePDPT + UInt64(8 * k))) }

            // Space 0: pool frames 0 (root) and 1 (PDPT).
            let pool = GuestLayout.dataPhysical.rawValue
            let inner = PageTableEntry.Flags([.present, .writable, .user])
            try g.data.write(array: [PageTableEntry(frameAddress: pool + 4096, flags: inner).rawValue, pml4e1], at: GuestLayout.dataPhysical)
            try g.data.write(array: kernel, at: GuestLayout.dataPhysical.advanced(by: 4096))

            var s = memvirt_ops_state()
            s.script = scriptGVA
            s.script_ops = UInt64(plan.opCount)
            s.pcid = script.pcid ? 1 : 0
            s.seed = script.seed
            s.rng = script.seed
            s.pool_gpa = pool
            s.pool_gva = directMapBase.rawValue
            s.pool_frames = UInt64(frames)
            s.share = shareGVA
            s.link = shareGVA + arrayBytes
            s.free_stack = shareGVA + 2 * arrayBytes
            s.kernel_pml4e1 = pml4e1
            s.kernel_pdpte_count = UInt64(kernelCount)
            withUnsafeMutableBytes(of: &s.kernel_pdpte) { b in
                for (k, v) in kernel.enumerated() { b.storeBytes(of: v, toByteOffset: 8 * k, as: UInt64.self) }
            }
            s.ceiling = UInt64(options.singlePageFlushCeiling)
            s.frames_preset = 2
            s.image_gva = GuestLayout.image
            s.image_bytes = g.layout.imageSize
            s.bump = 2
            s.frames_in_use = 2
            s.peak_frames = 2
            s.next_pcid = 2
            s.spaces.0.root = pool
            s.spaces.0.pdpt = pool + 4096
            s.spaces.0.pcid = 1
            s.spaces.0.live = 1
            s.spaces.0.tables_head = 1
            s.spaces.0.tables_tail = 2
            try g.runtime.store(s, at: GuestPhysicalAddress(rawValue: stateGVA))
            try g.runtime.store(UInt32(2), at: GuestPhysicalAddress(rawValue: s.link))  // frame 0 -> frame 1

            // CPL0: #PF, #UD (INVLPG), #DE (CR3 load); CR3 = space 0 (with PCID 1).
            try g.setGate(vector: 14, offset: g.image.calib_pf_offset)
            try g.setGate(vector: 6, offset: g.image.ops_invlpg_offset)
            try g.setGate(vector: 0, offset: g.image.ops_cr3_offset)
            let v = g.vcpus[0]
            var sr = try v.getSregs()
            // CR4.PCIDE may only be set with CR3[11:0] = 0 (SDM 4.10.1): the VMM enters with
            // PCID 0 and the guest's first CR3 load tags space 0 with its PCID.
            sr.cr3 = pool
            if script.pcid { sr.cr4 |= pcidBit }
            try v.setSregs(sr)

            // Warm-up, then the measured command.
            var m = GuestVM.command(MEMVIRT_CMD_OPS)
            m.table = stateGVA
            try g.runtime.store(UInt64(1), at: GuestPhysicalAddress(rawValue: stateGVA + UInt64(MemoryLayout<memvirt_ops_state>.offset(of: \.prepare_only)!)))
            try g.setMailbox(0, m)
            _ = try g.execute(vcpu: 0)
            try g.runtime.store(UInt64(0), at: GuestPhysicalAddress(rawValue: stateGVA + UInt64(MemoryLayout<memvirt_ops_state>.offset(of: \.prepare_only)!)))
            try g.setMailbox(0, m)

            let probe = try StatProbe(g)
            let before = try probe.read()
            let cpu0 = threadCPUNanoseconds()
            let outcome = try g.execute(vcpu: 0)
            let cpu1 = threadCPUNanoseconds()
            let deltas = try probe.delta(since: before)
            let done = try g.runtime.load(memvirt_ops_state.self, at: GuestPhysicalAddress(rawValue: stateGVA))
            if done.error != 0 {
                throw KVMError.invalid("guest op script stopped at encoded op \(done.error_op): \(describe(done))")
            }
            return GuestOpsResult(
                script: script, guest: GuestOpsCounts(done), kvm: deltas, vmmExits: outcome.userspaceExits,
                cpuSeconds: Double(cpu1 - cpu0) / 1e9, wallSeconds: Double(outcome.endNanos - outcome.startNanos) / 1e9,
                poolFrames: frames, presetFrames: 2, pcidEnabled: script.pcid, realtime: realtime)
        }
    }

    /// KVM offers PCID to guests (CPUID.01H:ECX bit 17): without it CR4.PCIDE cannot be set.
    public static func pcidOffered(_ kvm: KVM? = nil) throws(KVMError) -> Bool {
        let k: KVM
        if let kvm { k = kvm } else { k = try KVM() }
        guard let e = try k.supportedCPUIDEntry(leaf: 1) else { return false }
        return e.ecx & (1 << 17) != 0
    }

    static func describe(_ s: memvirt_ops_state) -> String {
        switch UInt32(s.error) {
        case MEMVIRT_OPS_NO_FRAMES.rawValue: "the frame pool (\(s.error_detail) frames) is exhausted; give a larger pool"
        case MEMVIRT_OPS_SEGV.rawValue: "an access at \(GuestVirtualAddress(rawValue: s.error_detail)) no region allows"
        case MEMVIRT_OPS_BAD_OP.rawValue: "the op names a space or region that is not there (\(s.error_detail))"
        case MEMVIRT_OPS_NO_SPACE.rawValue: "no free space id or PCID"
        default: "error \(s.error)"
        }
    }
}

extension GuestVM {
    /// Points IDT vector `vector` at the image's CPL0 routine at `offset` (an interrupt gate,
    /// DPL 0). Before the first KVM_RUN.
    func setGate(vector: Int, offset: UInt64) throws(KVMError) {
        let target = GuestLayout.image + offset
        let lo = (target & 0xffff) | (0x08 << 16) | (UInt64(0x8e) << 40) | (((target >> 16) & 0xffff) << 48)
        try runtime.write(array: [lo, target >> 32], at: GuestPhysicalAddress(rawValue: GuestLayout.idt + UInt64(vector) * 16))
    }
}

/// The calling thread's CPU time (CLOCK_THREAD_CPUTIME_ID), nanoseconds.
func threadCPUNanoseconds() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts)
    return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
}
