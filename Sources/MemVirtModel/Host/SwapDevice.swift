#if canImport(Glibc)
import Glibc
#endif
import MemVirtCore

extension PhysicalMemory {
    /// Asks for transparent huge pages behind this reservation (MADV_HUGEPAGE): simulated
    /// memories of gigabytes are first touched in 2 MiB steps instead of 4 KiB page faults.
    func preferHugePages() {
        #if canImport(Glibc)
        _ = madvise(base, Int(capacity), MADV_HUGEPAGE)
        #endif
    }
}

/// A swap device in simulated time: requests are served first come, first served by
/// `queueDepth` servers; a request's completion is computed when it is submitted (the device
/// keeps no clock of its own: the caller passes the time in).
public struct SwapDevice: Sendable {
    public let model: SwapDeviceModel
    var serverFree: [Double]
    /// Requests served, and the time they spent queued before service (ns).
    public private(set) var reads: UInt64 = 0
    public private(set) var writes: UInt64 = 0
    public private(set) var queuedTime: Double = 0
    public private(set) var busyTime: Double = 0

    public init(model: SwapDeviceModel) {
        precondition(model.queueDepth >= 1 && model.bandwidth > 0)
        self.model = model
        serverFree = Array(repeating: 0, count: model.queueDepth)
    }

    /// Service time of one 4 KiB request.
    public func serviceTime(write: Bool) -> Double {
        (write ? model.writeLatency : model.readLatency) + 4096 / model.bandwidth
    }

    /// Submits a 4 KiB request at time `t` (ns); returns when it completes.
    public mutating func submit(at t: Double, write: Bool) -> Double {
        var best = 0
        for i in 1..<serverFree.count where serverFree[i] < serverFree[best] { best = i }
        let start = max(t, serverFree[best])
        let s = serviceTime(write: write)
        serverFree[best] = start + s
        queuedTime += start - t
        busyTime += s
        if write { writes += 1 } else { reads += 1 }
        return start + s
    }

    /// Forgets queued work and statistics (after an untimed set-up phase).
    public mutating func reset() {
        serverFree = Array(repeating: 0, count: model.queueDepth)
        reads = 0; writes = 0; queuedTime = 0; busyTime = 0
    }
}

/// The swap area's contents: one 4 KiB slot per swapped page, in a lazily backed flat memory.
/// Slots are handed out in increasing order and reused from a free list, as scan_swap_map
/// does within a cluster.
public final class SwapStore: @unchecked Sendable {
    public let memory: PhysicalMemory
    public let slots: Int
    var next: Int32 = 0
    var free: [Int32] = []
    public private(set) var used = 0

    public init(slots: Int) throws(InputError) {
        self.slots = slots
        memory = try PhysicalMemory(capacity: UInt64(slots) * 4096, name: "swap")
        memory.preferHugePages()
    }

    func allocate() -> Int32? {
        if let s = free.popLast() { used += 1; return s }
        if Int(next) < slots { next += 1; used += 1; return next - 1 }
        return nil
    }

    func release(_ slot: Int32) {
        precondition(slot >= 0)
        free.append(slot)
        used -= 1
    }

    func address(_ slot: Int32) -> UInt64 { UInt64(slot) * 4096 }
}
