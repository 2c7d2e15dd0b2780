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

    @Test("async PF: 'page not present' parks the faulting thread, 'page ready' wakes it; every word read is the store's",
          arguments: [true, false])
    func asyncPF(on: Bool) throws {
        var c = AsyncPFCase()
        c.vcpus = 1
        c.seconds = 1.2
        c.residentLimit = 1 << 20
        c.storeDelayNanos = 2_000_000
        c.asyncPF = on
        let r = try AsyncPFBenchmark.run(c)
        print("async PF \(on ? "on" : "off"): \(r.json.rendered())")
        #expect(r.mismatches == 0)
        #expect(r.faultingReads[0] > 20)
        #expect(r.work[0] > 0)
        // The run starts with the limit's 256 pages resident (prefilled, not counted as store
        // reads), so every store read evicts exactly one page (FIFO).
        #expect(r.pager.storeReads > 20)
        #expect(r.pager.evictions == r.pager.storeReads)
        #expect(r.pager.peakResidentPages == 256)
        if on {
            // How many faults overlap in 1.2 s depends on the host's speed (82 seen under load, ~500 quiet).
            #expect(r.notPresent > 20)
            // Each parked thread is woken once; the wake-all after enabling comes on top.
            #expect(r.ready >= r.notPresent && r.ready <= r.notPresent + 2)
            #expect(r.schedulers[0].apfUnmatched == 0)
        } else {
            #expect(r.notPresent == 0 && r.ready == 0)
        }
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
}
