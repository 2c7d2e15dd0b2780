import MemVirtCore

/// The CPL0 code a guest runs per kernel event besides the privileged instruction itself, where
/// its CPL0 code is emulated (kvm_pvm). The KVM engine's page-table-editing guest runs three
/// 3-instruction stubs (Sources/MemVirtGuest/include/memvirt_ops.h, stubs.S):
///   #PF:              add $8,%rsp; mov %rsi,(%rsp); iretq
///   #UD (`ud2`):      invlpg (%rdi); mov %rsi,(%rsp); iretq
///   #DE (`div` by 0): mov %rdx,%cr3; mov %rsi,(%rsp); iretq
/// Each is priced as measured whole by `kvm calibrate`, from CPL3 as the guest enters it:
///   #PF: the mode's exit + `CostModel.faultInjection` (pair_pf_minus_wp: injection, delivery,
///        IRET) + the two other instructions x `instructionEmulation`;
///   #UD: the mode's INVLPG (exit + `invlpgHandler`) + `CostModel.invlpgStub`
///        (pair_invlpg_stub_minus_wp less the CPL0-loop INVLPG);
///   #DE: the mode's CR3 load (exit + `cr3SwitchHandler`) + `CostModel.cr3Stub`
///        (pair_cr3_stub_minus_wp less the CPL0-loop CR3 write).
/// On kvm_pvm each stub's IRET fails KVM's emulator (insn_emulation_fail 1 per stub) and is
/// completed by one more exit (`iretExits`): its time is inside those measured figures, the
/// exit is counted.
public struct GuestCPL0Stubs: Sendable, Hashable {
    /// Instructions of the #PF stub besides its IRET.
    public var pageFaultOtherInstructions: Int
    /// Instructions of the INVLPG stub besides the INVLPG and the IRET.
    public var invlpgOtherInstructions: Int
    /// Instructions of the CR3 stub besides the CR3 write and the IRET.
    public var cr3OtherInstructions: Int
    /// Memory stores per stub (each stub's `mov %rsi,(%rsp)`). Emulated, each is a write KVM
    /// tracks: kvm_mmu_track_write counts `mmu_pte_write` for every emulated guest write while
    /// the VM has indirect shadow pages, whether or not the gfn is a shadowed table.
    public var storesPerStub: Int
    /// Exits per stub besides the event's own (the #PF, INVLPG or CR3 exit the paging mode
    /// counts): kvm_pvm's emulator fails the IRET and KVM completes it through one more exit.
    /// `kvm calibrate` shows it: guest_pf 2.02 exits per #PF stub, the stub pairs 3 per pair
    /// (one of them the paired write-protect fault).
    public var iretExits: Int

    public init(pageFaultOtherInstructions: Int, invlpgOtherInstructions: Int, cr3OtherInstructions: Int, storesPerStub: Int, iretExits: Int = 1) {
        self.pageFaultOtherInstructions = pageFaultOtherInstructions
        self.invlpgOtherInstructions = invlpgOtherInstructions
        self.cr3OtherInstructions = cr3OtherInstructions
        self.storesPerStub = storesPerStub
        self.iretExits = iretExits
    }

    /// The KVM engine's guest runtime (the stubs above).
    public static let kvmGuestRuntime = GuestCPL0Stubs(pageFaultOtherInstructions: 2, invlpgOtherInstructions: 1, cr3OtherInstructions: 1, storesPerStub: 1, iretExits: 1)
}

/// What the guest kernel did while realizing a `GuestOpScript`: guest-side counts, the same in
/// every paging mode (they depend on the script alone), named as the KVM engine's guest
/// reports them (memvirt_ops.h, struct memvirt_ops_state).
public struct GuestOpCounts: Sendable, Hashable {
    public var touches: UInt64 = 0
    public var reads: UInt64 = 0
    public var writes: UInt64 = 0
    /// #PFs the guest's handler took, and of those: demand-zero, copy-on-write (and copies).
    public var guestPageFaults: UInt64 = 0
    public var demandZero: UInt64 = 0
    public var copyOnWriteFaults: UInt64 = 0
    public var copyOnWriteCopies: UInt64 = 0
    /// Leaf (PTE) writes, and writes of entries linking a new table (PDPTE, PDE; PML4E).
    public var leafWrites: UInt64 = 0
    public var tableWrites: UInt64 = 0
    public var invlpg: UInt64 = 0
    /// Every CR3 write (switches and full flushes), and of those the full flushes.
    public var cr3Loads: UInt64 = 0
    public var fullFlushes: UInt64 = 0
    /// Page-table pages allocated (roots included).
    public var tablePages: UInt64 = 0
    public var forks: UInt64 = 0
    public var exits: UInt64 = 0
    /// Leaves cleared by unmap and exit.
    public var pagesUnmapped: UInt64 = 0
    /// Guest frames in use after the script (data and page tables).
    public var framesInUse: UInt64 = 0
    /// Operations executed (a loop and each op of each iteration count once).
    public var opsExecuted: UInt64 = 0

    public init() {}

    /// The counts by the KVM guest's names (its `memvirt_ops_state` fields).
    public var named: [(String, UInt64)] {
        [("touches", touches), ("reads", reads), ("writes", writes), ("guest_pf", guestPageFaults), ("demand_zero", demandZero),
         ("cow_faults", copyOnWriteFaults), ("cow_copies", copyOnWriteCopies), ("leaf_writes", leafWrites), ("table_writes", tableWrites),
         ("invlpg", invlpg), ("cr3_loads", cr3Loads), ("full_flushes", fullFlushes), ("table_pages", tablePages), ("forks", forks),
         ("exits", exits), ("pages_unmapped", pagesUnmapped), ("frames_in_use", framesInUse), ("ops_executed", opsExecuted)]
    }
}

extension GuestOpScript {
    /// Checks what can be checked without running: sizes and ids in range. Errors name the op
    /// by its path (`ops[2].body[0]`) and the allowed values.
    public func validate() throws(InputError) {
        func check(_ ops: [Op], _ path: String, depth: Int) throws(InputError) {
            if depth > 16 { throw InputError("\(path): loops nested deeper than 16") }
            for (i, op) in ops.enumerated() {
                let here = "\(path)[\(i)]"
                switch op {
                case .map(let r, let pages, _):
                    try checkRegion(r, here)
                    guard pages >= 1 && pages <= 1 << 18 else {
                        throw InputError("\(here) (map): pages \(pages): allowed 1...262144 (a region is one 1 GiB slot of 4 KiB pages)")
                    }
                case .touch(let r, let count, _, _):
                    try checkRegion(r, here)
                    guard count >= 0 else { throw InputError("\(here) (touch): count \(count): allowed 0 or more") }
                case .protect(let r, _), .unmap(let r):
                    try checkRegion(r, here)
                case .fork:
                    break
                case .switchTo(let sp), .exit(let sp):
                    guard sp >= 0 else { throw InputError("\(here): space \(sp): allowed 0 or more (0 is the first space, fork makes 1, 2, ...)") }
                case .loop(let count, let body):
                    guard count >= 0 else { throw InputError("\(here) (loop): count \(count): allowed 0 or more") }
                    try check(body, "\(here).body", depth: depth + 1)
                }
            }
        }
        func checkRegion(_ r: Int, _ here: String) throws(InputError) {
            guard r >= 0 && r < GuestOpScript.maxRegions else {
                throw InputError("\(here): region \(r): allowed 0...\(GuestOpScript.maxRegions - 1)")
            }
        }
        try check(ops, "ops", depth: 0)
    }
}

extension Machine {
    /// Realizes `script` (GuestOpScript's semantics) with this machine's guest kernel, starting
    /// in the current address space (space 0), which must hold no area in the script's region
    /// slots. Regions start unmapped: first touches go through the guest kernel's #PF handler;
    /// mprotect, munmap, fork, exit and the TLB maintenance (INVLPG up to the kernel's
    /// single-page flush ceiling, else a CR3 reload; CR3 loads for switches) go through the
    /// paging mode as the guest's own operations. The TLB's PCID setting must be the script's.
    public func runGuestOps(_ script: GuestOpScript) throws -> GuestOpCounts {
        try script.validate()
        guard cpu.tlb.config.pcid == script.pcid else {
            throw InputError("guest-op script: pcid \(script.pcid) but the machine's TLB has PCIDs \(cpu.tlb.config.pcid ? "on" : "off"): configure the TLB as the script")
        }
        var run = GuestOpRun(machine: self, script: script)
        let k0 = KernelTotals(kernel), m0 = (guestFaults, demandZero, cowFaults, accesses, writes)
        try run.execute(script.ops, path: "ops")
        let k1 = KernelTotals(kernel)
        var c = GuestOpCounts()
        c.touches = accesses - m0.3
        c.writes = writes - m0.4
        c.reads = c.touches - c.writes
        c.guestPageFaults = guestFaults - m0.0
        c.demandZero = demandZero - m0.1
        c.copyOnWriteFaults = cowFaults - m0.2
        c.copyOnWriteCopies = k1.cowCopies - k0.cowCopies
        c.tableWrites = k1.tableWrites - k0.tableWrites
        c.leafWrites = (k1.writes - k0.writes) - c.tableWrites
        c.invlpg = k1.invalidations - k0.invalidations
        c.fullFlushes = k1.fullFlushes - k0.fullFlushes
        c.cr3Loads = run.switches + c.fullFlushes
        c.tablePages = k1.tablePages - k0.tablePages
        c.forks = k1.forks - k0.forks
        c.exits = k1.exits - k0.exits
        c.pagesUnmapped = k1.unmapped - k0.unmapped
        c.framesInUse = kernel.frames.framesInUse
        c.opsExecuted = run.opsExecuted
        return c
    }
}

/// The kernel's running totals, for differences over a script.
struct KernelTotals {
    var writes, tableWrites, invalidations, fullFlushes, tablePages, forks, exits, unmapped, cowCopies: UInt64
    init(_ k: SimulatedGuestKernel) {
        writes = k.pageTableWrites
        tableWrites = k.tableEntryWrites
        invalidations = k.invalidations
        fullFlushes = k.fullFlushes
        tablePages = k.tablePagesAllocated
        forks = k.forks
        exits = k.exits
        unmapped = k.pagesUnmapped
        cowCopies = k.copyOnWriteCopies
    }
}

/// One script's execution state: the spaces by id, their regions, the touch generator.
struct GuestOpRun<Mode: PagingMode> {
    let machine: Machine<Mode>
    let script: GuestOpScript
    /// Space id -> its address space (nil once it exited, until a fork reuses the id).
    var spaces: [AddressSpace?]
    /// Space id -> region -> (pages, writable) of its mapped regions.
    var regions: [[Int: (pages: Int, writable: Bool)]]
    var current = 0
    var rng: SplitMix64
    var switches: UInt64 = 0
    var opsExecuted: UInt64 = 0

    init(machine: Machine<Mode>, script: GuestOpScript) {
        self.machine = machine
        self.script = script
        spaces = [machine.space]
        regions = [[:]]
        rng = SplitMix64(seed: script.seed)
    }

    func space(_ id: Int, _ here: String) throws(InputError) -> AddressSpace {
        guard id < spaces.count, let s = spaces[id] else {
            throw InputError("\(here): space \(id) does not exist (live: \(spaces.indices.filter { spaces[$0] != nil }.map(String.init).joined(separator: ", ")))")
        }
        return s
    }

    func region(_ r: Int, _ here: String) throws(InputError) -> (pages: Int, writable: Bool) {
        guard let g = regions[current][r] else { throw InputError("\(here): region \(r) is not mapped in space \(current)") }
        return g
    }

    static func range(_ r: Int, pages: Int) -> Range<UInt64> {
        let base = GuestOpScript.regionBase(r)
        return base..<(base + UInt64(pages) * 4096)
    }

    mutating func execute(_ ops: [GuestOpScript.Op], path: String) throws {
        let k = machine.kernel
        for (i, op) in ops.enumerated() {
            let here = "\(path)[\(i)]"
            opsExecuted &+= 1
            let s = try space(current, here)
            switch op {
            case .map(let r, let pages, let writable):
                if regions[current][r] != nil { throw InputError("\(here) (map): region \(r) is already mapped in space \(current)") }
                let range = Self.range(r, pages: pages)
                try k.map(VirtualMemoryArea(start: range.lowerBound, end: range.upperBound, pageSize: .size4K, writable: writable), in: s)
                regions[current][r] = (pages, writable)
            case .touch(let r, let count, let order, let write):
                let g = try region(r, here)
                if write && !g.writable { throw InputError("\(here) (touch): a write to read-only region \(r) of space \(current)") }
                let base = GuestOpScript.regionBase(r)
                let pages = UInt64(g.pages)
                for n in 0..<UInt64(count) {
                    let page = order == .sequential ? n % pages : rng.bounded(pages)
                    do {
                        try machine.step(Access(address: GuestVirtualAddress(base + page * 4096), kind: write ? .write : .read))
                    } catch let e as GuestError {
                        throw InputError("\(here) (touch region \(r), space \(current)): \(e.message)")
                    }
                }
            case .protect(let r, let writable):
                let g = try region(r, here)
                k.protect(Self.range(r, pages: g.pages), writable: writable, in: s)
                regions[current][r] = (g.pages, writable)
            case .unmap(let r):
                let g = try region(r, here)
                k.unmap(Self.range(r, pages: g.pages), in: s)
                regions[current][r] = nil
            case .fork:
                // The smallest id no live space has (an exited space's id is reused).
                let child = try k.fork(s)
                if let free = spaces.firstIndex(where: { $0 == nil }) {
                    spaces[free] = child
                    regions[free] = regions[current]
                } else {
                    spaces.append(child)
                    regions.append(regions[current])
                }
            case .switchTo(let id):
                let t = try space(id, here)
                machine.switchAddressSpace(to: t)
                current = id
                switches &+= 1
            case .exit(let id):
                let t = try space(id, here)
                if id == current { throw InputError("\(here) (exit): space \(id) is the current space (switch away first)") }
                k.exit(t)
                spaces[id] = nil
                regions[id] = [:]
            case .loop(let count, let body):
                for _ in 0..<count { try execute(body, path: "\(here).body") }
            }
        }
    }
}
