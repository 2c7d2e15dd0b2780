import CKVM
import MemVirtCore
import MemVirtGuest
#if canImport(Glibc)
import Glibc
#endif

/// `kvm calibrate`'s dontneed_guest_running: MADV_DONTNEED of a page the guest has mapped
/// while its vCPU runs guest code on another CPU.
///
/// The host unmap's mmu-notifier invalidation zaps the page's shadow/EPT entry
/// (`kvm_mmu_notifier_invalidate_range_start` -> `kvm_unmap_gfn_range`) and flushes
/// (`kvm_flush_remote_tlbs` -> `kvm_make_all_cpus_request(KVM_REQ_TLB_FLUSH)`): a vCPU in guest
/// mode must be kicked out (an IPI) and the request waits for it to leave guest mode. That is
/// what the async-PF pager pays per eviction while the vCPU runs another guest thread, and
/// what `dontneed` (the vCPU out of guest mode: nothing to kick) leaves out; the model's
/// `HostCosts.remoteFlushInitiator` is the difference. On kvm_pvm the kick costs ~100 us (a
/// measurement of 2026-12-04 15:20, then typed into the pvm-shadow profile; now per run).
///
/// Per round a VM of its own: the guest writes `k` pages (their entries present), then runs
/// `count_forever` on a vCPU thread pinned to the first allowed CPU while this thread, pinned
/// to the second once the guest counts, drops the pages one at a time, each after the guest's
/// counter moved (the vCPU back in guest mode after the previous kick). Needs two CPUs.
extension Session {
    struct GuestRunningDontneed {
        var samples: [Double]
        var counters: [String: UInt64]
    }

    /// Why the benchmark cannot run here, or nil.
    static func guestRunningDontneedMissing() -> String? {
        allowedCPUs().count >= 2 ? nil : "needs two CPUs (the vCPU in guest mode on one, the madvise on another); this process may use \(allowedCPUs().count)"
    }

    func dontneedWhileGuestRuns(pages k: Int) throws(KVMError) -> GuestRunningDontneed {
        let callerMask = currentAffinityMask() ?? ~0
        let (vcpuMask, callerPin) = UffdPlacement.cross.masks(callerMask)
        guard let vcpuMask, let callerPin else { throw KVMError.invalid("dontneed_guest_running: " + (Self.guestRunningDontneedMissing() ?? "no two CPUs")) }
        var gc = GuestConfig(dataSize: (UInt64(k) * 4096 + (2 << 20) - 1) / (2 << 20) * (2 << 20))
        gc.listCapacity = max(k, 64)
        let g = try GuestVM(kvm: kvm, config: gc)
        let base = g.layout.dataVirtual.rawValue
        _ = try g.calibrateEvents(op: MEMVIRT_CAL_TOUCH_WRITE, count: k, base: base)
        let stats = try StatProbe(g)
        try g.setMailbox(0, GuestVM.command(MEMVIRT_CMD_COUNT))
        let kicker = VCPUKicker(vm: g)
        let box = ResultBox<CommandOutcome>()
        defer { setAffinityMask(callerMask) }
        let thread = try DedicatedThread.start(name: "memvirt-cal-count") {
            setAffinityMask(vcpuMask)
            do { box.value = .success(try g.execute(vcpu: 0, kicker: kicker)) } catch let e as KVMError { box.value = .failure(e) } catch {}
        }
        var failure: KVMError? = nil
        var samples: [Double] = []
        var counters: [String: UInt64] = [:]
        func counter() throws(KVMError) -> UInt64 { try g.mailbox(0).counter }
        /// Waits until the guest's counter passes `c` (the vCPU running guest code), at most 1 s.
        func advanced(past c: UInt64) throws(KVMError) -> Bool {
            let t0 = monotonicNanoseconds()
            while try counter() <= c {
                if monotonicNanoseconds() - t0 > 1_000_000_000 { return false }
            }
            return true
        }
        do throws(KVMError) {
            // Sleep-polled: this thread may run SCHED_FIFO (--realtime) and must not hold a CPU
            // the vCPU thread needs to get going; pinned to the other CPU only then.
            let t0 = monotonicNanoseconds()
            while try counter() == 0 {
                if monotonicNanoseconds() - t0 > 2_000_000_000 { throw KVMError.invalid("dontneed_guest_running: the guest's counting loop did not start within 2 s") }
                usleepNanos(200_000)
            }
            setAffinityMask(callerPin)
            let before = try stats.read()
            for i in 0..<k {
                guard try advanced(past: try counter()) else { throw KVMError.invalid("dontneed_guest_running: the guest stopped counting after \(i) of \(k) pages") }
                let p = g.data.mapping.base + i * 4096
                let t0 = monotonicNanoseconds()
                if madvise(p, 4096, MADV_DONTNEED) != 0 { throw KVMError.call("madvise(MADV_DONTNEED, page \(i) under a running guest)", lastErrno()) }
                samples.append(Double(monotonicNanoseconds() - t0))
            }
            counters = try stats.delta(since: before)
        } catch {
            failure = error
        }
        kicker.stop()
        thread.join()
        if case .failure(let e)? = box.value { throw KVMError.invalid("dontneed_guest_running: the guest's counting loop failed: \(e)") }
        if let f = failure { throw f }
        return GuestRunningDontneed(samples: samples, counters: counters)
    }
}
