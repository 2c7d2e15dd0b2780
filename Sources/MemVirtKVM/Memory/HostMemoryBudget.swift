import MemVirtCore
#if canImport(Glibc)
import Glibc
#endif

/// What a KVM run will take from the host's memory, checked before anything is allocated: a
/// guest whose footprint the host cannot hold is refused with the numbers, instead of running
/// into the OOM killer (or swapping for hours) halfway.
///
/// The host side is `MemAvailable` of /proc/meminfo (the kernel's estimate of memory a new
/// workload can take without swapping, page cache and reclaimable slab included), and the
/// user's `--memory-limit` when given.
public struct HostMemoryBudget: Sendable {
    /// The bytes the run will need at most, and what they are, for the message.
    public var needBytes: UInt64
    public var parts: [(String, UInt64)]

    public init(parts: [(String, UInt64)]) {
        self.parts = parts
        needBytes = parts.reduce(UInt64(0)) { a, p in let (s, o) = a.addingReportingOverflow(p.1); return o ? .max : s }
    }

    /// `MemAvailable` from /proc/meminfo, in bytes (nil where there is none).
    public static func availableBytes(meminfo path: String = "/proc/meminfo") -> UInt64? {
        guard let f = fopen(path, "r") else { return nil }
        defer { fclose(f) }
        var line = [CChar](repeating: 0, count: 256)
        while fgets(&line, Int32(line.count), f) != nil {
            let s = String(decoding: line.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            guard s.hasPrefix("MemAvailable:") else { continue }
            let fields = s.split(separator: " ", omittingEmptySubsequences: true)
            guard fields.count >= 2, let kib = UInt64(fields[1]) else { return nil }
            let unit = fields.count >= 3 && fields[2].hasPrefix("kB") ? UInt64(1024) : 1
            return kib.multipliedReportingOverflow(by: unit).overflow ? .max : kib * unit
        }
        return nil
    }

    /// Refuses the run (naming `what`, the parts, the limit or what the host has) when it needs
    /// more than `limit` (the user's `--memory-limit`) or more than `available`.
    public func check(_ what: String, limit: UInt64?, available: UInt64? = HostMemoryBudget.availableBytes()) throws(KVMError) {
        let detail = parts.map { "\($0.0) \(ByteCount($0.1))" }.joined(separator: " + ")
        if let l = limit, needBytes > l {
            throw KVMError.invalid("\(what) needs \(ByteCount(needBytes)) of host memory (\(detail)), more than --memory-limit \(ByteCount(l)): refused")
        }
        if let a = available, needBytes > a {
            throw KVMError.invalid("\(what) needs \(ByteCount(needBytes)) of host memory (\(detail)), more than the \(ByteCount(a)) this host has available (MemAvailable in /proc/meminfo): refused; use a smaller footprint\(limit == nil ? "" : " or limit")")
        }
    }
}
