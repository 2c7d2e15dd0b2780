// Fuzz target: lackey traces (MemVirtModel/Workloads/LackeyTrace.swift), through the real
// streaming reader (the input is written to a memfd and opened by path). Besides "no crash":
// every access the reader hands out has a size of 1...4096 bytes and stays inside one 4 KiB
// page (page-crossing accesses are split), and the reader's line count never exceeds the
// number of line ends in the input plus one.
import MemVirtCore
import MemVirtModel

#if canImport(Glibc)
import Glibc
#endif

@inline(never) func fail(_ what: String) -> Never {
    fputs("fuzz-lackey: property violated: \(what)\n", stderr)
    abort()
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzLackey(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let fd = memfd_create("fuzz-lackey", UInt32(MFD_CLOEXEC))
    guard fd >= 0 else { fail("memfd_create: errno \(errno)") }
    defer { close(fd) }
    var off = 0
    while off < size {
        let w = write(fd, data + off, size - off)
        guard w > 0 else { fail("write to memfd: errno \(errno)") }
        off += w
    }
    var newlines = 0
    for i in 0..<size where data[i] == 0x0A { newlines += 1 }
    do {
        let reader = try LackeyTraceReader(path: "/proc/self/fd/\(fd)")
        var n = 0
        while let a = try reader.next() {
            n += 1
            guard a.size >= 1, a.size <= 4096 else { fail("access of \(a.size) bytes at line \(reader.lineNumber)") }
            let start = a.address.rawValue
            let last = start &+ UInt64(a.size) &- 1
            guard last >= start, start >> 12 == last >> 12 else {
                fail("access at 0x\(String(start, radix: 16)) of \(a.size) bytes crosses a page (line \(reader.lineNumber))")
            }
            guard n <= 4 * (newlines + 1) else { fail("\(n) accesses from \(newlines + 1) lines") }
        }
        guard reader.lineNumber <= newlines + 1 else { fail("line \(reader.lineNumber) of a \(newlines + 1)-line input") }
    } catch {
        // A refusal must say where: the path and a line number.
        guard error.message.hasPrefix("/proc/self/fd/") else { fail("error without the file name: \(error.message)") }
    }
    return 0
}
