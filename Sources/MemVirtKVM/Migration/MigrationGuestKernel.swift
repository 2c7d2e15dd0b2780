import CKVM
import MemVirtCore
import MemVirtGuest

/// Live migration of a guest that runs under the VMM-side guest kernel (`--guest-kernel`):
/// per vCPU two guest threads share the vCPU by the guest timer, the workload thread (the
/// WorkloadSpec's stream for that vCPU, thread 2i) and a counting thread (thread 2i + 1: the
/// progress the vCPU makes besides the workload, as the seed's "working" threads). The
/// schedulers' state travels in STATE after the vCPU states. With async PF (`--async-pf`), a
/// thread that touches a page the destination does not have yet in post-copy is parked on
/// "page not present" while the page comes over the network and the counting thread runs;
/// threads parked when the source stopped are woken on the destination by the "page ready"
/// to all that KVM sends when the restored MSR_KVM_ASYNC_PF_EN enables async PF there.
enum KernelMigration {
    /// HELLO's `kernel` byte.
    static let enabledBit: UInt8 = 1
    static let asyncPFBit: UInt8 = 2

    static func workloadThread(_ vcpu: Int) -> Int { 2 * vcpu }
    static func counterThread(_ vcpu: Int) -> Int { 2 * vcpu + 1 }

    /// The guest kernel's options for `vcpus` vCPUs: the run ends when every workload thread
    /// is done (the counting threads never are).
    static func options(vcpus: Int, asyncPF: Bool) -> GuestKernelOptions {
        var o = GuestKernelOptions()
        o.asyncPF = asyncPF
        o.finishWhenDone = Set((0..<vcpus).map(workloadThread))
        return o
    }

    /// The threads, workload mailboxes given (the destination's are placeholders: on resume
    /// the mailboxes already in guest memory are used).
    static func threads(workload: [memvirt_mailbox]) -> [GuestThreadSpec] {
        workload.enumerated().flatMap { (i, m) in
            [GuestThreadSpec(vcpu: i, mailbox: m), GuestThreadSpec(vcpu: i, mailbox: GuestVM.command(MEMVIRT_CMD_COUNT))]
        }
    }

    static func mailboxAddress(_ g: GuestVM, thread t: Int) -> GuestPhysicalAddress {
        GuestPhysicalAddress(rawValue: g.layout.threadMailbox(t))
    }

    /// The workload threads' counters; the memory checksum computed here over the data slot
    /// with the guest's rule (memvirt_guest.h: sum of w[k] * (2k + 1)), since vCPU 0 is a
    /// thread's context, not the command loop's.
    static func finalGuest(_ g: GuestVM) throws(KVMError) -> [GuestReport] {
        var out: [GuestReport] = []
        for i in 0..<g.vcpus.count {
            let m = try g.runtime.load(memvirt_mailbox.self, at: mailboxAddress(g, thread: workloadThread(i)))
            out.append(GuestReport(mailbox: m))
        }
        let words = g.layout.dataSize / 8
        let w = UnsafeRawPointer(g.data.mapping.base).assumingMemoryBound(to: UInt64.self)
        var h: UInt64 = 0
        for k in 0..<Int(words) { h &+= GuestDataRules.checksumTerm(w[k], index: UInt64(k)) }
        if !out.isEmpty { out[0].memoryChecksum = h }
        return out
    }

    /// The counting threads' increments so far.
    static func counters(_ g: GuestVM) throws(KVMError) -> [UInt64] {
        try (0..<g.vcpus.count).map { (i) throws(KVMError) in
            try g.runtime.load(memvirt_mailbox.self, at: mailboxAddress(g, thread: counterThread(i))).counter
        }
    }

    // MARK: scheduler state in STATE

    static func encode(_ states: [VCPUSchedulerState], into w: inout ByteWriter) {
        w.put(UInt32(states.count))
        for st in states {
            w.put(UInt32(st.ids.count))
            for (k, id) in st.ids.enumerated() {
                w.put(UInt64(id))
                w.put(st.regs[k])
                switch st.threads[k] {
                case .runnable: w.put(UInt8(0)); w.put(UInt32(0))
                case .parked(let token): w.put(UInt8(1)); w.put(token)
                case .done: w.put(UInt8(2)); w.put(UInt32(0))
                }
            }
            w.put(UInt32(st.runQueue.count))
            for q in st.runQueue { w.put(UInt32(q)) }
            w.put(Int32(st.current ?? -1))
        }
    }

    static func decode(_ r: inout ByteReader, vcpus: Int) throws(KVMError) -> [VCPUSchedulerState] {
        let n = Int(try r.get(UInt32.self))
        guard n == vcpus else { throw KVMError.invalid("migration stream mismatched: \(n) scheduler states for \(vcpus) vCPUs") }
        var out: [VCPUSchedulerState] = []
        for _ in 0..<n {
            let k = Int(try r.get(UInt32.self))
            guard k <= 64 else { throw KVMError.invalid("migration stream corrupt: \(k) guest threads on one vCPU") }
            var st = VCPUSchedulerState(ids: [], regs: [], threads: [], runQueue: [], current: nil)
            for _ in 0..<k {
                let id = try r.get(UInt64.self)
                guard id < 64 else { throw KVMError.invalid("migration stream corrupt: guest thread id \(id) (at most 64 threads)") }
                st.ids.append(Int(id))
                st.regs.append(try r.get(kvm_regs.self))
                let kind = try r.get(UInt8.self), token = try r.get(UInt32.self)
                switch kind {
                case 0: st.threads.append(.runnable)
                case 1: st.threads.append(.parked(token: token))
                case 2: st.threads.append(.done)
                default: throw KVMError.invalid("migration stream corrupt: guest thread state \(kind)")
                }
            }
            let q = Int(try r.get(UInt32.self))
            guard q <= 4 * k + 4 else { throw KVMError.invalid("migration stream corrupt: run queue of \(q)") }
            for _ in 0..<q { st.runQueue.append(Int(try r.get(UInt32.self))) }
            let c = try r.get(Int32.self)
            st.current = c < 0 ? nil : Int(c)
            out.append(st)
        }
        return out
    }
}

/// What the guest kernel did on one side of a migration (JSON `guest_kernel`).
public struct KernelMigrationReport: Sendable {
    public var asyncPF: Bool
    /// Threads parked on async PF when the state was saved (source) or restored (destination).
    public var parkedAtSwitch: Int = 0
    public var apfNotPresent: UInt64 = 0
    public var apfReady: UInt64 = 0
    public var apfWakeAll: UInt64 = 0
    /// The counting threads' increments on this side (from where they were when this side
    /// took the guest), and per second of this side's run.
    public var counterIncrements: UInt64 = 0
    public var counterPerSecond: Double = 0
    /// The counting threads' share of vCPU time on this side (measured here; nil when learnt
    /// from the other side's RESULT, which does not carry it).
    public var counterShare: Double? = nil

    public init(asyncPF: Bool) { self.asyncPF = asyncPF }

    public var json: JSONValue {
        .object([
            ("async_pf", .bool(asyncPF)), ("parked_at_switch", .int(Int64(parkedAtSwitch))),
            ("apf_not_present", .uint(apfNotPresent)), ("apf_ready", .uint(apfReady)), ("apf_wake_all", .uint(apfWakeAll)),
            ("counter_increments", .uint(counterIncrements)), ("counter_per_s", .double(counterPerSecond.rounded())),
            ("counter_share", counterShare.map { .double(($0 * 1000).rounded() / 1000) } ?? .null),
        ])
    }

    mutating func add(_ reports: [VCPUSchedulerReport]) {
        for r in reports {
            apfNotPresent += r.apfNotPresent
            apfReady += r.apfReady
            apfWakeAll += r.apfWakeAll
        }
    }
}
