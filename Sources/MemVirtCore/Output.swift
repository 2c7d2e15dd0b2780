#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Output that must arrive: standard output and files written whole, every write checked
/// (issue 17 defect 9: `run --json > /dev/full` and `kvm image --out /dev/full` exited 0).
public enum Output {
    /// Writes `text` to standard output (after anything `print` buffered), all of it, or throws
    /// naming the error ("standard output: No space left on device").
    public static func standardOutput(_ text: String) throws(InputError) {
        guard fflush(nil) == 0 else { throw InputError("standard output: cannot write: \(errnoText())") }
        try writeAll(1, Array(text.utf8), what: "standard output")
    }

    /// Writes `bytes` to the file at `path` (created or truncated, mode 0644) and closes it; any
    /// failure (open, a short or failed write, close) throws naming the path.
    public static func writeFile(_ path: String, _ bytes: [UInt8]) throws(InputError) {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw InputError("\(path): cannot open for writing: \(errnoText())") }
        do throws(InputError) {
            try writeAll(fd, bytes, what: path)
        } catch {
            close(fd)
            throw error
        }
        guard close(fd) == 0 else { throw InputError("\(path): cannot write: \(errnoText())") }
    }

    /// Flushes every stdio stream; false when a write failed (a full disk, a closed pipe).
    /// The CLI calls it at exit, so output printed with `print` cannot fail silently.
    public static func flushAll() -> Bool { fflush(nil) == 0 }

    static func writeAll(_ fd: Int32, _ bytes: [UInt8], what: String) throws(InputError) {
        var off = 0
        while off < bytes.count {
            let n = bytes.withUnsafeBytes { write(fd, $0.baseAddress! + off, $0.count - off) }
            if n < 0 {
                if errno == EINTR { continue }
                throw InputError("\(what): cannot write: \(errnoText())")
            }
            if n == 0 { throw InputError("\(what): cannot write: no progress after \(off) of \(bytes.count) bytes") }
            off += n
        }
    }

    static func errnoText() -> String { String(cString: strerror(errno)) }
}
