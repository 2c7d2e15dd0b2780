#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import MemVirtCore

/// Simulated physical memory: one flat, lazily backed reservation (mmap with MAP_NORESERVE),
/// so an address is an offset and a read is one load: no hash look-up, no radix walk on the
/// per-access path. The host kernel zero-fills pages on first touch, so untouched simulated
/// memory costs nothing. Guest-physical and host-physical memory are separate instances.
public final class PhysicalMemory: @unchecked Sendable {
    /// Bytes reserved; every valid address is below this.
    public let capacity: UInt64
    @usableFromInline let base: UnsafeMutableRawPointer
    public let name: String

    /// Reserves `capacity` bytes (rounded up to 4 KiB). Throws when the reservation fails.
    public init(capacity: UInt64, name: String) throws(InputError) {
        let size = (capacity + 4095) & ~4095
        #if canImport(Glibc)
        let flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE
        #else
        let flags = MAP_PRIVATE | MAP_ANON
        #endif
        guard let p = mmap(nil, Int(size), PROT_READ | PROT_WRITE, flags, -1, 0), p != MAP_FAILED else {
            throw InputError("cannot reserve \(ByteCount(size)) of simulated \(name) memory (errno \(errno))")
        }
        base = p
        self.capacity = size
        self.name = name
    }

    deinit { munmap(base, Int(capacity)) }

    public func read64(_ address: UInt64) -> UInt64 {
        precondition(address &+ 8 <= capacity, "simulated physical read beyond capacity")
        return base.load(fromByteOffset: Int(address), as: UInt64.self)
    }

    public func write64(_ address: UInt64, _ value: UInt64) {
        precondition(address &+ 8 <= capacity, "simulated physical write beyond capacity")
        base.storeBytes(of: value, toByteOffset: Int(address), as: UInt64.self)
    }

    /// Bytes from which `zero` gives whole pages back to the host kernel instead of writing
    /// zeros: a fresh 2 MiB or 1 GiB frame then costs only the parts the run touches (issue 17
    /// defect 8: `--page-size 1G` made every touched page 1 GiB resident). Below it, memset is
    /// cheaper than the system call and the page is about to be touched anyway.
    public static let discardThreshold: UInt64 = 64 << 10

    /// Fills `bytes` bytes at `address` with zeros (a fresh frame). Page-aligned ranges of at
    /// least `discardThreshold` are discarded (MADV_DONTNEED: they read as zero and hold no
    /// host memory until touched).
    public func zero(_ address: UInt64, bytes: UInt64) {
        precondition(address + bytes <= capacity)
        #if canImport(Glibc)
        if bytes >= Self.discardThreshold, address & 4095 == 0, bytes & 4095 == 0,
           madvise(base + Int(address), Int(bytes), MADV_DONTNEED) == 0 {
            return
        }
        #endif
        memset(base + Int(address), 0, Int(bytes))
    }

    /// Bytes of this memory resident in the host (mincore), in `[address, address + bytes)`.
    public func residentBytes(_ address: UInt64 = 0, bytes: UInt64? = nil) -> UInt64 {
        let n = bytes ?? capacity - address
        precondition(address & 4095 == 0 && address + n <= capacity)
        let pages = Int((n + 4095) / 4096)
        guard pages > 0 else { return 0 }
        var vec = [UInt8](repeating: 0, count: pages)
        let rc = vec.withUnsafeMutableBufferPointer { mincore(base + Int(address), Int(n), $0.baseAddress) }
        guard rc == 0 else { return 0 }
        return UInt64(vec.reduce(0) { $0 + Int($1 & 1) }) * 4096
    }

    /// Copies `bytes` from `source` to `destination` (copy-on-write, migration).
    public func copy(from source: UInt64, to destination: UInt64, bytes: UInt64) {
        precondition(source + bytes <= capacity && destination + bytes <= capacity)
        memcpy(base + Int(destination), base + Int(source), Int(bytes))
    }

    /// Copies a page between two memories (e.g. migration source to destination).
    public func copy(from other: PhysicalMemory, at source: UInt64, to destination: UInt64, bytes: UInt64) {
        precondition(source + bytes <= other.capacity && destination + bytes <= capacity)
        memcpy(base + Int(destination), other.base + Int(source), Int(bytes))
    }

    /// A 64-bit FNV-1a-style hash of `bytes` at `address`, word by word.
    public func hash(_ address: UInt64, bytes: UInt64, into h: inout UInt64) {
        var a = address
        let end = address + bytes
        while a < end {
            h = FNV1a.step(h, read64(a))
            a += 8
        }
    }

    /// Gives the pages back to the host kernel (they read as zero again).
    public func discard(_ address: UInt64, bytes: UInt64) {
        precondition(address & 4095 == 0 && bytes & 4095 == 0 && address + bytes <= capacity)
        _ = madvise(base + Int(address), Int(bytes), MADV_DONTNEED)
    }
}

/// Hands out physical frames of every page size from one physical space: 4 KiB frames from
/// the bottom up, 2 MiB and 1 GiB frames (naturally aligned) from the top down, each size with
/// its own free list. Frame 0 is never handed out (a zero entry must not look valid).
public struct FrameAllocator: Sendable {
    public let capacity: UInt64
    @usableFromInline var low: UInt64 = 4096
    @usableFromInline var high: UInt64
    @usableFromInline var free4K: [UInt64] = []
    @usableFromInline var free2M: [UInt64] = []
    @usableFromInline var free1G: [UInt64] = []
    /// Frames currently allocated, in 4 KiB units.
    public private(set) var framesInUse: UInt64 = 0
    public private(set) var peakFramesInUse: UInt64 = 0

    public init(capacity: UInt64) {
        self.capacity = capacity & ~PageSize.size1G.offsetMask
        high = self.capacity
    }

    /// The base address of a free frame of `size`, or nil when the space is exhausted.
    public mutating func allocate(_ size: PageSize) -> UInt64? {
        var result: UInt64?
        switch size {
        case .size4K:
            if let f = free4K.popLast() { result = f } else if low + 4096 <= high { result = low; low += 4096 }
        case .size2M:
            if let f = free2M.popLast() { result = f } else {
                let a = (high - size.bytes) & ~size.offsetMask
                if high >= size.bytes, a >= low { result = a; high = a }
            }
        case .size1G:
            if let f = free1G.popLast() { result = f } else {
                let a = (high - size.bytes) & ~size.offsetMask
                if high >= size.bytes, a >= low { result = a; high = a }
            }
        }
        if result != nil {
            framesInUse += size.frames
            peakFramesInUse = max(peakFramesInUse, framesInUse)
        }
        return result
    }

    public mutating func free(_ address: UInt64, _ size: PageSize) {
        precondition(address & size.offsetMask == 0 && address != 0)
        switch size {
        case .size4K: free4K.append(address)
        case .size2M: free2M.append(address)
        case .size1G: free1G.append(address)
        }
        framesInUse -= size.frames
    }
}
