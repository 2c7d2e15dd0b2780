import CKVM
import MemVirtCore
import MemVirtGuest
#if canImport(Glibc)
import Glibc
#endif

/// The guest runtime's access loop (guest.c `workload`, the very function the VM runs at CPL3)
/// called natively in this process, outside any VM: the same mailbox, SplitMix64 stream and
/// lookup table as `KVMRunner` gives the guest, over an anonymous buffer of the footprint with
/// 4 KiB pages (MADV_NOHUGEPAGE, as guest RAM is backed) touched before the timed loop, so the
/// loop takes no fault. What it measures is the workload's own cost on this CPU (its sampler,
/// its data and TLB misses over the footprint) with no virtualization: the native baseline
/// beside which a model predicts a VM's overhead. On kvm_pvm the guest's CPL3 code runs
/// natively on 4-level shadow tables walked by the hardware, as this process's are.
public enum NativeGuestLoop {
    public struct Measurement: Sendable {
        /// Wall time of each timed loop, in the order run.
        public var seconds: [Double]
        /// The first loop's read_sum: the guest's, when the stream is the same.
        public var readSum: UInt64
        public var reads: UInt64
        public var writes: UInt64
        /// The median of `seconds`.
        public var medianSeconds: Double {
            let s = seconds.sorted()
            return s.isEmpty ? 0 : s.count % 2 == 1 ? s[s.count / 2] : (s[s.count / 2 - 1] + s[s.count / 2]) / 2
        }
    }

    /// Runs `spec`'s thread-0 stream `runs` times over one buffer (the first run's read_sum is
    /// the guest's: the buffer starts zero like fresh guest RAM; later runs read what earlier
    /// ones wrote, which changes the sum, not the time).
    public static func measure(_ spec: WorkloadSpec, runs: Int = 3) throws(KVMError) -> Measurement {
        guard runs >= 1 else { throw KVMError.invalid("the native loop needs at least 1 run (got \(runs))") }
        guard case let bytes = Int(spec.footprint.rawValue), bytes > 0, bytes % 4096 == 0 else {
            throw KVMError.invalid("the native loop's footprint must be a positive multiple of 4 KiB (got \(spec.footprint.rawValue))")
        }
        guard let data = mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), data != MAP_FAILED else {
            throw KVMError.invalid("the native loop could not map \(bytes) bytes: errno \(errno)")
        }
        defer { munmap(data, bytes) }
        _ = madvise(data, bytes, MADV_NOHUGEPAGE)
        // Touch every page first (zero, as fresh guest RAM reads): the timed loop takes no fault.
        memset(data, 0, bytes)
        let base = UInt64(UInt(bitPattern: data))
        // The lookup table (zipf's cdf, chase's cycle), sized first with a placeholder address.
        let (_, tableBytes) = try KVMRunner.prepare(spec, thread: 0, base: base, table: 0)
        let tableLength = max(4096, (tableBytes.count + 4095) / 4096 * 4096)
        guard let table = mmap(nil, tableLength, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), table != MAP_FAILED else {
            throw KVMError.invalid("the native loop could not map its \(tableLength)-byte table: errno \(errno)")
        }
        defer { munmap(table, tableLength) }
        _ = madvise(table, tableLength, MADV_NOHUGEPAGE)
        tableBytes.withUnsafeBytes { src in
            if let s = src.baseAddress { memcpy(table, s, src.count) }
        }
        let (mailbox, _) = try KVMRunner.prepare(spec, thread: 0, base: base, table: UInt64(UInt(bitPattern: table)))
        var result = Measurement(seconds: [], readSum: 0, reads: 0, writes: 0)
        for run in 0..<runs {
            var m = mailbox
            let t0 = monotonicNanoseconds()
            withUnsafeMutablePointer(to: &m) { memvirt_guest_workload($0) }
            let t1 = monotonicNanoseconds()
            result.seconds.append(Double(t1 &- t0) / 1e9)
            if run == 0 {
                result.readSum = m.read_sum
                result.reads = m.reads
                result.writes = m.writes
            }
        }
        return result
    }
}
