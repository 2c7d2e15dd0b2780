#if canImport(Glibc)
import Glibc
#endif

// Host-side views of guest memory a KSM measurement reads: which frame backs a guest page,
// whether it is a KSM page, and what ksmd's thread has used.

/// /proc/self/pagemap (64 bits per virtual page: bit 63 present, bits 0-54 the frame number,
/// shown to root only) and /proc/kpageflags (64 bits per frame: bit 21 KPF_KSM);
/// Documentation/admin-guide/mm/pagemap.rst.
public enum PageMap {
    public static let kpfKSM: UInt64 = 1 << 21

    /// Frame numbers of `pages` of `region` (0 when not present), or nil when unreadable.
    public static func frames(_ region: GuestMemoryRegion, pages: [Int]) -> [UInt64]? {
        let fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        let base = Int(bitPattern: region.mapping.base) / 4096
        var out: [UInt64] = []
        out.reserveCapacity(pages.count)
        for p in pages {
            var e: UInt64 = 0
            guard pread(fd, &e, 8, off_t((base + p) * 8)) == 8 else { return nil }
            out.append(e >> 63 == 1 ? e & ((1 << 55) - 1) : 0)
        }
        // Without CAP_SYS_ADMIN the frame numbers read as 0.
        return out.contains { $0 != 0 } ? out : nil
    }

    /// How many of `pages` are mapped to a KSM page now, or nil when the kernel does not say.
    public static func ksmCount(_ region: GuestMemoryRegion, pages: [Int]) -> Int? {
        guard let f = frames(region, pages: pages) else { return nil }
        let fd = open("/proc/kpageflags", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var n = 0
        for pfn in f where pfn != 0 {
            var flags: UInt64 = 0
            guard pread(fd, &flags, 8, off_t(pfn * 8)) == 8 else { return nil }
            if flags & kpfKSM != 0 { n += 1 }
        }
        return n
    }
}

/// The ksmd kernel thread: its CPU time from /proc/<pid>/schedstat (first field: ns on a CPU).
public struct KSMDaemon: Sendable {
    public let pid: Int32

    public static func find() -> KSMDaemon? {
        guard let d = opendir("/proc") else { return nil }
        defer { closedir(d) }
        while let e = readdir(d) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            guard let pid = Int32(name) else { continue }
            if let comm = try? KSM.readString("/proc/\(pid)/comm"), comm == "ksmd" { return KSMDaemon(pid: pid) }
        }
        return nil
    }

    public func cpuNanoseconds() -> UInt64? {
        guard let s = try? KSM.readString("/proc/\(pid)/schedstat"), let f = s.split(separator: " ").first else { return nil }
        return UInt64(f)
    }
}
