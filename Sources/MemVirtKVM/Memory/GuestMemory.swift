import MemVirtCore
#if canImport(Glibc)
import Glibc
#endif

/// One region of guest RAM: private anonymous memory mmap'd in the VMM and given to KVM as
/// a memory slot at `guestPhysical`. 4K-backed (MADV_NOHUGEPAGE) unless `transparentHugePages`.
public final class GuestMemoryRegion: @unchecked Sendable {
    let mapping: Mapping
    /// The first guest-physical address of the region.
    public let guestPhysical: GuestPhysicalAddress
    /// Bytes, a multiple of 4 KiB.
    public let size: UInt64
    public let transparentHugePages: Bool
    /// Pages the VMM wrote through `store`/`write` while `vmmWrites` is armed: KVM's dirty log
    /// sees only the guest's writes, so a live migration unions these with it (as Firecracker
    /// does with its own bitmap).
    public let vmmWrites = VMMWriteLog()

    public init(guestPhysical: GuestPhysicalAddress, size: UInt64, transparentHugePages: Bool = false) throws(KVMError) {
        guard size > 0, size % 4096 == 0, guestPhysical.isAligned(to: .size4K) else {
            throw KVMError.invalid("guest memory region \(guestPhysical) + \(size) bytes: must be 4KiB-aligned and non-empty")
        }
        mapping = try Mapping(size: Int(size), alignment: transparentHugePages ? 2 << 20 : 4096, what: "guest RAM")
        self.guestPhysical = guestPhysical
        self.size = size
        self.transparentHugePages = transparentHugePages
        if madvise(mapping.base, Int(size), transparentHugePages ? MADV_HUGEPAGE : MADV_NOHUGEPAGE) != 0 {
            throw KVMError.call(transparentHugePages ? "madvise(MADV_HUGEPAGE)" : "madvise(MADV_NOHUGEPAGE)", lastErrno())
        }
    }

    /// madvise(MADV_MERGEABLE): KSM may merge identical pages of this region (copy-on-write).
    public func markMergeable() throws(KVMError) {
        if madvise(mapping.base, Int(size), MADV_MERGEABLE) != 0 { throw KVMError.call("madvise(MADV_MERGEABLE)", lastErrno()) }
    }

    /// mincore(2) of the region: bit 0 of byte p set when page p is resident. A page that is not
    /// was never touched (or was dropped) and reads as zero: private anonymous memory without
    /// swap or a userfaultfd pager. Lets migration and snapshots skip such pages without
    /// faulting them in (a host page fault costs microseconds here).
    public func residency() throws(KVMError) -> [UInt8] {
        var v = [UInt8](repeating: 0, count: Int(size / 4096))
        let rc = v.withUnsafeMutableBufferPointer { mincore(mapping.base, Int(size), $0.baseAddress) }
        if rc != 0 { throw KVMError.call("mincore(guest RAM)", lastErrno()) }
        return v
    }

    /// Where the region starts in the VMM.
    public var hostAddress: HostVirtualAddress { HostVirtualAddress(rawValue: UInt64(UInt(bitPattern: mapping.base))) }

    /// True when `[gpa, gpa + length)` lies inside the region.
    public func contains(_ gpa: GuestPhysicalAddress, length: UInt64 = 1) -> Bool {
        guard let off = gpa.offset(from: guestPhysical) else { return false }
        return off <= size && length <= size - off
    }

    /// The host pointer for `[gpa, gpa + length)`, or nil when outside.
    func pointer(_ gpa: GuestPhysicalAddress, length: UInt64) -> UnsafeMutableRawPointer? {
        guard contains(gpa, length: length) else { return nil }
        return mapping.base + Int(gpa.rawValue - guestPhysical.rawValue)
    }

    /// Reads a trivial value at `gpa` (bounds-checked; unaligned is fine).
    public func load<T: BitwiseCopyable>(_ type: T.Type = T.self, at gpa: GuestPhysicalAddress) throws(KVMError) -> T {
        guard let p = pointer(gpa, length: UInt64(MemoryLayout<T>.size)) else {
            throw KVMError.invalid("read of \(MemoryLayout<T>.size) bytes at \(gpa): outside guest memory")
        }
        return p.loadUnaligned(as: T.self)
    }

    /// Writes a trivial value at `gpa` (bounds-checked).
    public func store<T: BitwiseCopyable>(_ value: T, at gpa: GuestPhysicalAddress) throws(KVMError) {
        guard let p = pointer(gpa, length: UInt64(MemoryLayout<T>.size)) else {
            throw KVMError.invalid("write of \(MemoryLayout<T>.size) bytes at \(gpa): outside guest memory")
        }
        p.storeBytes(of: value, as: T.self)
        vmmWrites.note(offset: gpa.rawValue - guestPhysical.rawValue, length: UInt64(MemoryLayout<T>.size))
    }

    /// Copies `bytes` to `gpa` (bounds-checked).
    public func write(_ bytes: UnsafeRawBufferPointer, at gpa: GuestPhysicalAddress) throws(KVMError) {
        guard let p = pointer(gpa, length: UInt64(bytes.count)) else {
            throw KVMError.invalid("write of \(bytes.count) bytes at \(gpa): outside guest memory")
        }
        if let b = bytes.baseAddress { p.copyMemory(from: b, byteCount: bytes.count) }
        vmmWrites.note(offset: gpa.rawValue - guestPhysical.rawValue, length: UInt64(bytes.count))
    }

    /// Copies an array of trivial values to `gpa` (bounds-checked).
    public func write<T: BitwiseCopyable>(array: [T], at gpa: GuestPhysicalAddress) throws(KVMError) {
        let r: Result<Void, KVMError> = array.withUnsafeBytes { b in Result { () throws(KVMError) in try write(b, at: gpa) } }
        try r.get()
    }
}

/// The pages of one region the VMM itself wrote (through `GuestMemoryRegion.store`/`write`)
/// since `arm()` (nothing is recorded until then; an uncontended lock per VMM write).
public final class VMMWriteLog: @unchecked Sendable {
    private var lock = pthread_mutex_t()
    private var armed = false
    private var pages = Set<Int>()
    init() { pthread_mutex_init(&lock, nil) }
    deinit { pthread_mutex_destroy(&lock) }

    /// Starts (or restarts) tracking with an empty set.
    public func arm() { pthread_mutex_lock(&lock); armed = true; pages = []; pthread_mutex_unlock(&lock) }
    /// Stops tracking.
    public func disarm() { pthread_mutex_lock(&lock); armed = false; pages = []; pthread_mutex_unlock(&lock) }
    /// The pages written since `arm()` or the last `take()`, sorted; the set starts empty again.
    public func take() -> [Int] {
        pthread_mutex_lock(&lock)
        defer { pthread_mutex_unlock(&lock) }
        let p = pages.sorted()
        pages = []
        return p
    }
    func note(offset: UInt64, length: UInt64) {
        guard length > 0 else { return }
        pthread_mutex_lock(&lock)
        defer { pthread_mutex_unlock(&lock) }
        guard armed else { return }
        for p in Int(offset / 4096)...Int((offset + length - 1) / 4096) { pages.insert(p) }
    }
}
