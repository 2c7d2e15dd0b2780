import CKVM
import MemVirtCore
import MemVirtGuest
#if canImport(Glibc)
import Glibc
#endif

/// `kvm calibrate`'s pager phase: the userfaultfd pager's own host operations (the store's
/// pwrite and pread, MADV_DONTNEED), timed by the pager thread while it serves a guest in its
/// steady state, as the KVM engine's pager meets them.
///
/// Why not the single-thread store_write / store_read / dontneed benchmarks beside it: those
/// time a rewrite of one of 256 cached store pages from a hot buffer, and a DONTNEED of a page
/// touched a moment before, on the calibrating thread. The pager evicts the oldest of its
/// resident pages (FIFO) and reads back a page evicted long ago: the page's data, its host
/// PTE and struct page, the store's page-cache page are no longer in the CPU's own caches,
/// and the pager thread does it while the vCPU thread sleeps in `handle_userfault` (often on
/// the other CPU). On this host that made the pager's operations 1.5-2.5x the single-thread
/// figures (validate's pager_*_us, session 6: 3.1 vs 1.6 us per pwrite, 4.8 vs 3.2 per
/// DONTNEED, 2.1 vs 0.9 per pread).
///
/// The phase: one VM whose data region (`regionPages`) is under a `Pager` with a resident
/// limit of half of it (`residentPages`: twice this CPU's L2, so every page it evicts or
/// reads back has left L2 by then), both threads unpinned as the engine runs them. The guest
/// writes the region's pages in order, round after round, continuing where the last batch
/// stopped: after one warm-up pass every write faults, and each fault evicts one page (pwrite
/// + DONTNEED) and reads one back (pread). Each round takes `k` faults. The guest's writes and
/// the pager thread run at the normal scheduling class, as the engine's do, not at the
/// calibration's SCHED_FIFO (`withNormalScheduling`).
final class PagerCalibrationPhase {
    let vm: GuestVM
    let pager: Pager
    let regionPages: Int
    let residentPages: Int
    let stats: StatProbe
    let perNano: Double
    private var cursor = 0

    /// The resident set: twice the L2 cache of CPU 0 (sysfs; 1 MiB if unknown), at least
    /// 256 pages, at most 16 MiB.
    static func residentPages() -> Int {
        let l2 = cacheBytes(level: 2) ?? (1 << 20)
        return min(max(2 * l2 / 4096, 256), 4096)
    }

    /// The size of CPU 0's unified or data cache at `level`, from sysfs, bytes.
    static func cacheBytes(level: Int) -> Int? {
        for index in 0..<8 {
            let dir = "/sys/devices/system/cpu/cpu0/cache/index\(index)"
            guard let l = (try? readSmallTextFile(dir + "/level")).flatMap({ Int($0) }), l == level,
                  let type = (try? readSmallTextFile(dir + "/type")), type == "Unified" || type == "Data",
                  let size = (try? readSmallTextFile(dir + "/size")) else { continue }
            let digits = size.prefix { $0.isNumber }
            guard let n = Int(digits) else { continue }
            switch size.dropFirst(digits.count) {
            case "K": return n << 10
            case "M": return n << 20
            case "": return n
            default: continue
            }
        }
        return nil
    }

    init(kvm: KVM, batchCapacity: Int) throws(KVMError) {
        residentPages = Self.residentPages()
        regionPages = 2 * residentPages
        var gc = GuestConfig(dataSize: (UInt64(regionPages) * 4096 + (2 << 20) - 1) / (2 << 20) * (2 << 20))
        gc.listCapacity = max(batchCapacity, 64)
        vm = try GuestVM(kvm: kvm, config: gc)
        var po = PagerOptions()
        po.residentLimitPages = residentPages
        po.recordOperationSamples = true
        let pg = try Pager(region: vm.data, options: po)
        try withNormalScheduling { () throws(KVMError) in try pg.start() }
        pager = pg
        stats = try StatProbe(vm)
        perNano = try vm.tscTicksPerNano()
    }

    /// One pass over the region (fills the resident set, then evicts), unrecorded.
    func warm() throws(KVMError) {
        _ = try withNormalScheduling { () throws(KVMError) in try writes(regionPages) }
        _ = pager.takeOperationSamples()
    }

    /// `k` guest writes, each a fault the pager serves with one eviction and one store read
    /// (after `warm`): the guest-timed faults, the pager's operations and KVM's counters.
    func round(_ k: Int) throws(KVMError) -> (faults: [Double], operations: PagerOperationSamples, counters: [String: UInt64]) {
        _ = pager.takeOperationSamples()
        let before = try stats.read()
        let t = try withNormalScheduling { () throws(KVMError) in try writes(k) }
        let counters = try stats.delta(since: before)
        if let e = pager.error { throw e }
        return (t, pager.takeOperationSamples(), counters)
    }

    /// The guest writes the next `k` pages in order, wrapping at the region's end.
    private func writes(_ k: Int) throws(KVMError) -> [Double] {
        var out: [Double] = []
        var left = k
        while left > 0 {
            let n = min(left, regionPages - cursor, vm.layout.listCapacity)
            let ticks = try vm.calibrateEvents(op: MEMVIRT_CAL_TOUCH_WRITE, count: n,
                                               base: vm.layout.dataVirtual.rawValue + UInt64(cursor) * 4096)
            out += ticks.map { Double($0) / perNano }
            cursor = (cursor + n) % regionPages
            left -= n
        }
        return out
    }

    /// The VM ends before the pager stops (as `AsyncPFBenchmark` does).
    func stop() {
        pager.stop()
    }
}
