import CKVM
import MemVirtCore
import MemVirtGuest
import Testing
@testable import MemVirtKVM

@Suite("KVM engine: guest threads, timer, async page faults", .serialized, .enabled(if: KVM.isUsable, Comment(rawValue: kvmReason)))
struct KVMGuestKernelTests {
    func counting(vcpus: Int, threadsPerVCPU: Int, slice: UInt64, seconds: Double) throws -> (counts: [UInt64], reports: [VCPUSchedulerReport]) {
        var c = GuestConfig(dataSize: 1 << 20)
        c.vcpus = vcpus
        c.irqchip = true
        c.threads = vcpus * threadsPerVCPU
        let g = try GuestVM(kvm: try KVM(), config: c)
        try g.vm.disableHaltPolling()
        var specs: [GuestThreadSpec] = []
        for v in 0..<vcpus { for _ in 0..<threadsPerVCPU { specs.append(GuestThreadSpec(vcpu: v, mailbox: GuestVM.command(MEMVIRT_CMD_COUNT))) } }
        var o = GuestKernelOptions()
        o.timeSliceNanos = slice
        let k = try GuestKernel(vm: g, threads: specs, options: o)
        let reports = try onDedicatedThread(name: "test") { () throws(KVMError) in try k.run(forNanos: UInt64(seconds * 1e9)) }
        let counts = try (0..<specs.count).map { (t) throws(KVMError) in try k.mailbox(t).counter }
        return (counts, reports)
    }

    @Test("two threads share one vCPU by the guest timer: both progress, ticks match the slice")
    func timeSlices() throws {
        let (counts, reports) = try counting(vcpus: 1, threadsPerVCPU: 2, slice: 2_000_000, seconds: 0.6)
        print("time slices: counts \(counts), \(reports[0].json.rendered())")
        #expect(counts.allSatisfy { $0 > 0 })
        let share = Double(min(counts[0], counts[1])) / Double(max(counts[0], counts[1]))
        #expect(share > 0.3, "round robin with equal slices: \(counts)")
        // 0.6 s / 2 ms = 300 ticks; a loaded host delays some.
        #expect(reports[0].timerTicks >= 100 && reports[0].timerTicks <= 320)
        #expect(reports[0].switches >= reports[0].timerTicks)
    }

    @Test("secondary vCPUs run with the in-kernel irqchip (MP state set runnable)")
    func secondaryVCPUs() throws {
        let (counts, reports) = try counting(vcpus: 2, threadsPerVCPU: 1, slice: 4_000_000, seconds: 0.3)
        #expect(counts.allSatisfy { $0 > 0 }, "\(counts)")
        #expect(reports.count == 2 && reports.allSatisfy { $0.timerTicks > 10 })
    }

    @Test("a thread's real page fault stops the guest with a report naming #PF and the address")
    func realFault() throws {
        var c = GuestConfig(dataSize: 1 << 20)
        c.irqchip = true
        c.threads = 1
        let g = try GuestVM(kvm: try KVM(), config: c)
        var m = GuestVM.command(MEMVIRT_CMD_TOUCH_ADDRESS)
        m.list = 0x20_0000_0000  // mapped by nothing
        let k = try GuestKernel(vm: g, threads: [GuestThreadSpec(vcpu: 0, mailbox: m)], options: GuestKernelOptions())
        #expect {
            _ = try onDedicatedThread(name: "test") { () throws(KVMError) in try k.run(forNanos: 2_000_000_000) }
        } throws: { e in
            guard case KVMError.guest(.exception(let v, _, _, let cr2)) = e else { return false }
            return v == 14 && cr2 == 0x20_0000_0000
        }
    }

    @Test("the guest kernel refuses a VM without the in-kernel irqchip, with a clear error")
    func needsIRQChip() throws {
        var c = GuestConfig(dataSize: 1 << 20)
        c.threads = 1
        let g = try GuestVM(kvm: try KVM(), config: c)
        #expect { try GuestKernel(vm: g, threads: [GuestThreadSpec(vcpu: 0, mailbox: GuestVM.command(MEMVIRT_CMD_COUNT))], options: GuestKernelOptions()) }
            throws: { "\($0)".contains("irqchip") }
    }

    @Test("a guest kernel saved with a thread parked on async PF resumes in a fresh VM: KVM's wake-all there wakes it, and every thread goes on")
    func resumeParked() throws {
        let salt: UInt64 = 0x5EED_0F_A5F
        let kvm = try KVM()
        var pagers: [Pager] = []
        // A VM whose data pages come from a pager with a 20 ms store: a faulting thread is
        // parked on "page not present" almost all the time; a counting thread shares its vCPU.
        func vm() throws -> GuestVM {
            var gc = GuestConfig(dataSize: 4 << 20)
            gc.irqchip = true
            gc.threads = 2
            let g = try GuestVM(kvm: kvm, config: gc)
            try g.vm.disableHaltPolling()
            var po = PagerOptions()
            po.storeDelayNanos = 20_000_000
            po.storeContent = .pattern(salt: salt)
            let p = try Pager(region: g.data, options: po)
            try p.start()
            pagers.append(p)
            return g
        }
        // VMs (and KVM's async-PF workers) go away inside this scope, while the pagers still serve.
        try {
            let a = try vm()
            var f = GuestVM.command(MEMVIRT_CMD_RANDOM_READ)
            f.base = a.layout.dataVirtual.rawValue
            f.footprint = a.layout.dataSize
            f.rng_state = 99
            f.salt = salt
            let specs = [GuestThreadSpec(vcpu: 0, mailbox: GuestVM.command(MEMVIRT_CMD_COUNT)), GuestThreadSpec(vcpu: 0, mailbox: f)]
            var o = GuestKernelOptions()
            o.asyncPF = true
            let ka = try GuestKernel(vm: a, threads: specs, options: o)
            // Short runs, each going on from the last (the reads go on across them), until one
            // stops with the thread parked after a few reads.
            var saved: VCPUSchedulerState? = nil
            for _ in 0..<60 {
                _ = try onDedicatedThread(name: "test") { () throws(KVMError) in try ka.run(forNanos: 30_000_000) }
                if let st = ka.schedulerStates[0], st.parked == 1, try ka.mailbox(1).done_accesses >= 3 { saved = st; break }
            }
            let st = try #require(saved, "the faulting thread was never parked at a stop")
            let vs = try a.vcpus[0].saveState()
            let count0 = try ka.mailbox(0).counter, reads0 = try ka.mailbox(1).done_accesses
            // The fresh VM: the runtime slot copied (mailboxes, stacks, page tables), the data
            // pages from a pager with the same content, then the schedulers and the vCPU.
            let b = try vm()
            try b.runtime.write(UnsafeRawBufferPointer(start: a.runtime.mapping.base, count: Int(a.runtime.size)), at: GuestPhysicalAddress(rawValue: 0))
            let kb = try GuestKernel(vm: b, threads: specs, options: o, resume: [st])
            try b.vcpus[0].restoreState(vs)
            let r = try onDedicatedThread(name: "test") { () throws(KVMError) in try kb.run(forNanos: 400_000_000) }
            print("resumed: parked at the switch \(st.parked), \(r[0].json.rendered())")
            #expect(r[0].apfWakeAll >= 1)
            #expect(r[0].apfUnmatched == 0)
            let count1 = try kb.mailbox(0).counter, m1 = try kb.mailbox(1)
            #expect(count1 > count0)
            #expect(m1.done_accesses > reads0 + 3)
            #expect(m1.mismatches == 0)
            // A scheduler state that does not fit the threads is refused.
            var bad = st
            bad.ids = [0]
            #expect { try GuestKernel(vm: b, threads: specs, options: o, resume: [bad]) } throws: { "\($0)".contains("does not match") }
        }()
        for p in pagers { p.stop() }
    }
}
