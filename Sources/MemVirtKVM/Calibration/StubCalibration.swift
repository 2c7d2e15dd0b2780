import CKVM
import MemVirtCore
import MemVirtGuest

/// `kvm calibrate`'s benchmarks of the page-table-editing guest's whole CPL0 stubs, entered from
/// CPL3 exactly as guest_ops.c enters them (memvirt_ops.h, stubs.S):
///   #UD (`ud2`):     invlpg (%rdi); mov %rsi,(%rsp); iretq
///   #DE (`div` 0):   mov %rdx,%cr3; mov %rsi,(%rsp); iretq
/// The `invlpg` and `cr3_write` benchmarks time the privileged instruction inside a CPL0 loop,
/// without the exception that enters a stub from CPL3, its delivery at (emulated) CPL0 and the
/// IRET back, which on kvm_pvm fails KVM's emulator (insn_emulation_fail 1 per stub) and is
/// completed with a second exit. These time the whole stub, each paired in one guest loop
/// iteration with the reference exit (a write to a harvested, write-protected page), as
/// pair_pf_minus_wp does for the #PF stub (docs/calibrate.md, "Same-iteration pairs").
extension Session {
    static let invlpgStubPair = "pair_invlpg_stub_minus_wp"
    static let cr3StubPair = "pair_cr3_stub_minus_wp"
    static let cr3SwitchStubPair = "pair_cr3_switch_stub_minus_wp"
    static let stringRootElement = "string_root_per_element"

    func registerStubBenchmarks() {
        bench(Self.invlpgStubPair, path: "invlpg", "per pair, in one guest loop iteration: the INVLPG stub entered from CPL3 (ud2 -> #UD -> invlpg (%rdi); mov %rsi,(%rsp); iretq, as guest_ops.c) minus a write to a harvested, write-protected page (same VM, guest TSC)")
        bench(Self.cr3StubPair, path: "tlb_flush", "per pair, in one guest loop iteration: the CR3 stub entered from CPL3 (div by 0 -> #DE -> mov %rdx,%cr3 (the current CR3: a reload, a full flush); mov %rsi,(%rsp); iretq, as guest_ops.c) minus a write to a harvested, write-protected page (same VM, guest TSC)")
        bench(Self.stringRootElement, path: "mmu_pte_write", "per pair, in one guest loop iteration: (rep movsq of a page-table root onto itself, 512 elements - the same of 1 element) / 511; the root a copy of the current one, made a cached shadow root (KVM cannot unprotect and retry a root in use: the whole string is emulated, each element a tracked write)")
        bench(Self.cr3SwitchStubPair, path: "tlb_flush", "per pair, in one guest loop iteration: the CR3 stub entered from CPL3 loading the other of two roots that map the same memory (a switch between address spaces, as guest_ops.c's switch; both roots shadowed and cached by KVM) minus a write to a harvested, write-protected page (same VM, guest TSC)")
    }

    /// Points vectors 6 (#UD) and 0 (#DE) at the ops guest's stubs, and makes a second root: a
    /// copy of the PML4 in the last page of the runtime's page-table area, when that page is
    /// unused (all zero); its address, or nil. Before the first KVM_RUN.
    static func installStubGates(_ g: GuestVM) throws(KVMError) -> UInt64? {
        try g.setGate(vector: 6, offset: g.image.ops_invlpg_offset)
        try g.setGate(vector: 0, offset: g.image.ops_cr3_offset)
        let root = g.layout.pageTables
        let spare = root + (g.layout.pageTablePages - 1) * 4096
        var copy: [UInt64] = []
        for i in 0..<UInt64(512) {
            guard try g.runtime.load(UInt64.self, at: GuestPhysicalAddress(rawValue: spare + 8 * i)) == 0 else { return nil }
            copy.append(try g.runtime.load(UInt64.self, at: GuestPhysicalAddress(rawValue: root + 8 * i)))
        }
        try g.runtime.write(array: copy, at: GuestPhysicalAddress(rawValue: spare))
        return spare
    }

    /// One round of the stub pairs, `k` each: the write-protect fault on page `wpBase` + i x
    /// 4 KiB (write-protected again by a harvest of `bitmap` before each batch), then the stub
    /// (INVLPG of `invlpgTarget`; CR3 := the vCPU's current CR3; CR3 := `secondRoot` and back,
    /// k rounded up to even). Samples: per-pair differences.
    func stubPairRound(_ g: GuestVM, _ st: StatProbe, bitmap: DirtyBitmapLog, wpBase: UInt64, invlpgTarget: UInt64, secondRoot: UInt64?,
                       perNano: Double, k: Int, record: Bool) throws(KVMError) {
        let cr3 = try g.vcpus[0].getSregs().cr3
        var batches = [(Self.invlpgStubPair, MEMVIRT_CAL_PAIR_INVLPG_STUB, UInt64(0), invlpgTarget, k),
                       (Self.cr3StubPair, MEMVIRT_CAL_PAIR_CR3_STUB, cr3, UInt64(0), k)]
        if let b = secondRoot { batches.append((Self.cr3SwitchStubPair, MEMVIRT_CAL_PAIR_CR3_SWITCH_STUB, cr3, b, (k + 1) & ~1)) }
        for (name, op, salt, other, n) in batches {
            _ = try bitmap.harvest()
            let before = try st.read()
            let t = try g.calibrateEvents(op: op, count: n, base: wpBase, salt: salt, other: other)
            let dl = try st.delta(since: before)
            guard record else { continue }
            var diffs: [Double] = []
            for i in 0..<n { diffs.append((Double(t[2 * i + 1]) - Double(t[2 * i])) / perNano) }
            acc[name]!.add(diffs, counters: dl)
        }
        if let b = secondRoot {
            // Emulated string stores into a root in use: per element.
            let before = try st.read()
            let t = try g.calibrateEvents(op: MEMVIRT_CAL_PAIR_STRING_ROOT, count: k, base: 0, salt: cr3, other: b)
            let dl = try st.delta(since: before)
            if record {
                let n = k
                var per: [Double] = []
                for i in 0..<n { per.append((Double(t[2 * i + 1]) - Double(t[2 * i])) / perNano / 511) }
                acc[Self.stringRootElement]!.add(per, events: n * 511, counters: dl)
            }
        }
        let after = try g.vcpus[0].getSregs().cr3
        guard after == cr3 else {
            throw KVMError.invalid("stub calibration: CR3 is \(String(after, radix: 16)) after the stub pairs, expected \(String(cr3, radix: 16)) (the switches come back to the first root)")
        }
    }
}

/// The stubs' parameters: what a whole stub costs beyond the charges the model already makes
/// for it. The model charges an INVLPG stub vmExitRoundTrip + invlpgHandler (the paging mode's
/// INVLPG) + invlpgStub, and a CR3 stub vmExitRoundTrip + cr3SwitchHandler + cr3Stub; the pair
/// already subtracts the exit, the CPL0-loop figure of the instruction is subtracted here.
/// Only where CPL0 code is emulated (kvm_pvm): elsewhere the model runs no stubs.
func deriveStubCosts(pvm: Bool, add: (String, String, [(String, Double)], String) -> Void) {
    guard pvm else { return }
    add("CostModel.invlpgStub", Session.invlpgStubPair, [("invlpg", 1)],
        "The INVLPG stub's entry from CPL3 (#UD delivered to emulated CPL0), its mov and its IRET (which fails KVM's emulator and is completed by a second exit), beyond the INVLPG's exit and invlpgHandler (model: exit + invlpgHandler + invlpgStub): the exit is the write-protect fault paired with each stub in the same guest loop iteration; the INVLPG's CPL0-loop figure subtracted.")
    add("CostModel.cr3Stub", Session.cr3StubPair, [("cr3_write", 1)],
        "A CR3 reload (the same root: a full flush) by the CR3 stub: its entry from CPL3 (#DE delivered to emulated CPL0), its mov and its IRET (which fails KVM's emulator and is completed by a second exit), and the flush KVM makes on the next entry (tlb_flush 1 per stub; the CPL0 loop's CR3 writes share one), beyond the CR3 write's exit and cr3SwitchHandler (model: exit + cr3SwitchHandler + cr3Stub): the exit is the write-protect fault paired with each stub in the same guest loop iteration; the CR3 write's CPL0-loop figure subtracted.")
    add("CostModel.stringStoreElement", Session.stringRootElement, [],
        "One element of a guest string store (rep stosq/movsq) KVM emulates whole, because its frame is a root in use that kvm_mmu_unprotect_gfn_and_retry cannot free: one exit and one insn_emulation for the string, then per element an emulator iteration and kvm_mmu_track_write (mmu_pte_write). Model: ShadowPaging.stringWrite charges it per element.")
    add("CostModel.cr3SwitchStub", Session.cr3SwitchStubPair, [("cr3_write", 1)],
        "A switch to another address space by the CR3 stub (a root KVM has shadowed and cached: fast_pgd_switch), as cr3Stub but between two roots: model: exit + cr3SwitchHandler + cr3SwitchStub; the exit is the write-protect fault paired with each stub in the same guest loop iteration; the CR3 write's CPL0-loop figure subtracted.")
}
