// Fuzz target: lackey traces (MemVirtModel/Workloads/LackeyTrace.swift), through the real
// streaming reader (the input is written to a tmpfs file and opened by path). Besides "no crash":
// every access the reader hands out has a size of 1...4096 bytes and stays inside one 4 KiB
// page (page-crossing accesses are split), and the reader's line count never exceeds the
// number of line ends in the input plus one.
import MemVirtCore
import MemVirtModel

#if canImport(Glibc)
import Glibc
#endif

/// Writes to standard error (Swift 6 refuses the C `stderr` global).
func sayError(_ text: String) {
    var t = text
    t.withUTF8 { b in _ = write(2, b.baseAddress, b.count) }
}

@inline(never) func fail(_ what: String) -> Never {
    sayError("fuzz-lackey: property violated: \(what)\n")
    abort()
}

/// A file on tmpfs, unlinked at once (the harness reaches it as /proc/self/fd/N), rewritten
/// for every input: Glibc's Swift module does not expose memfd_create.
nonisolated(unsafe) var scratchFD: Int32 = -1
func scratchFile(_ bytes: UnsafeRawBufferPointer, extendTo size: UInt64 = 0) -> Int32 {
    if scratchFD < 0 {
        let path = "/dev/shm/memvirt-fuzz-\(getpid())"
        scratchFD = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard scratchFD >= 0 else { fail("cannot create \(path): errno \(errno)") }
        unlink(path)
    }
    guard ftruncate(scratchFD, 0) == 0 else { fail("ftruncate: errno \(errno)") }
    var off = 0
    while off < bytes.count {
        let w = pwrite(scratchFD, bytes.baseAddress! + off, bytes.count - off, off_t(off))
        guard w > 0 else { fail("write to the scratch file: errno \(errno)") }
        off += w
    }
    if size > UInt64(bytes.count) { guard ftruncate(scratchFD, off_t(size)) == 0 else { fail("ftruncate: errno \(errno)") } }
    return scratchFD
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzLackey(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let fd = scratchFile(UnsafeRawBufferPointer(start: data, count: size))
    var newlines = 0
    for i in 0..<size where data[i] == 0x0A { newlines += 1 }
    do throws(InputError) {
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
