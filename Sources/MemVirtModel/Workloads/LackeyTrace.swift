#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import MemVirtCore

/// A streaming reader for the memory trace that valgrind's lackey tool writes with
/// `valgrind --tool=lackey --trace-mem=yes PROG` (see `scripts/make-lackey-trace`).
///
/// The format, one access per line (valgrind `lackey/lk_main.c`, `trace_instr`, `trace_load`,
/// `trace_store`, `trace_modify`):
///
///     I  0400d7d4,8      instruction fetch of 8 bytes  -> .execute
///      L 04010a78,8      load                          -> .read
///      S 7ff0001f0,8     store                         -> .write
///      M 0421ddd8,4      modify (load, then store)     -> .read, then .write at the same address
///
/// Addresses are hexadecimal without `0x` (guest-virtual: the traced program's addresses);
/// sizes are decimal bytes, 1...4096. Lines starting with `==` (valgrind's own messages:
/// banner, summary) and blank lines are skipped. Every other line must be an access; leading
/// and trailing blanks and CRLF line ends are tolerated.
///
/// Replay is whole and exact: every I/L/S/M line yields its access(es) in file order. An access
/// that crosses a 4 KiB page boundary is split in two, so it touches both pages: the first part
/// ends at the boundary and the second starts at it (an `M` that crosses gives read, read,
/// write, write). `Access.size` is the bytes of each part.
///
/// Memory: the file is read with `read(2)` through one fixed 1 MiB buffer and parsed in place,
/// byte by byte; nothing is allocated per line, so a multi-GB trace streams in constant memory.
/// A malformed line throws `InputError` naming the file, the line number (1-based, counting
/// every line) and the text: `trace.txt:1234: bad line ' X 12zz,8': unknown access kind ...`.
///
/// Speed: lines in lackey's exact layout take a fast path with no bounds checks (the buffer
/// always ends at a newline, which stops every scan); anything else (valgrind messages, blank
/// lines, unusual spacing, errors) goes through the general parser. Mutable state lives behind
/// a pointer rather than in stored `var`s, which keeps Swift's dynamic exclusivity checks (a
/// third of the time per line) off the hot path.
public final class LackeyTraceReader {
    /// The path as given; it prefixes every error message.
    public let path: String
    /// The number of the last line consumed (1-based; header, blank and access lines alike).
    public var lineNumber: Int { state.pointee.lineNumber }
    /// Access lines (I, L, S, M) replayed so far.
    public var linesRead: Int { state.pointee.linesRead }

    /// Bytes of the read buffer: the longest access line it accepts (valgrind messages longer
    /// than this are skipped in pieces).
    public static let bufferSize = 1 << 20

    private struct State {
        /// `buf[start..<complete]` holds whole lines (each ending in '\n'), not yet parsed;
        /// `buf[complete..<end]` is the start of a line still being read.
        var start = 0
        var complete = 0
        var end = 0
        var atEOF = false
        var lineNumber = 0
        var linesRead = 0
        /// Accesses of the current line still to hand out (a page-crossing `M` gives 4).
        var pendingCount = 0
        var pendingHead = 0
        var pending0 = LackeyTraceReader.noAccess
        var pending1 = LackeyTraceReader.noAccess
        var pending2 = LackeyTraceReader.noAccess
    }
    private static let noAccess = Access(address: GuestVirtualAddress(rawValue: 0), kind: .read, size: 0)

    private let fd: Int32
    /// `bufferSize + 1` bytes (room for a '\n' after a last line that lacks one).
    private let buf: UnsafeMutablePointer<UInt8>
    /// 256 entries: the value of a hexadecimal digit, 0xFF for any other byte.
    private let hex: UnsafeMutablePointer<UInt8>
    private let state: UnsafeMutablePointer<State>

    /// Opens the trace at `path`; the error says why when it cannot be opened.
    public init(path: String) throws(InputError) {
        self.path = path
        var fd: Int32
        repeat { fd = open(path, O_RDONLY | O_CLOEXEC) } while fd < 0 && errno == EINTR
        if fd < 0 {
            let e = errno
            throw InputError("\(path): cannot open lackey trace: \(String(cString: strerror(e)))")
        }
        self.fd = fd
        buf = .allocate(capacity: Self.bufferSize + 1)
        hex = .allocate(capacity: 256)
        hex.initialize(repeating: 0xFF, count: 256)
        for i in 0..<10 { hex[0x30 + i] = UInt8(i) }
        for i in 0..<6 {
            hex[0x61 + i] = UInt8(10 + i)
            hex[0x41 + i] = UInt8(10 + i)
        }
        state = .allocate(capacity: 1)
        state.initialize(to: State())
    }

    deinit {
        close(fd)
        buf.deallocate()
        hex.deallocate()
        state.deinitialize(count: 1)
        state.deallocate()
    }

    /// The next access, or nil at the end of the file.
    public func next() throws(InputError) -> Access? {
        let st = state
        if st.pointee.pendingHead < st.pointee.pendingCount {
            let a: Access
            switch st.pointee.pendingHead {
            case 0: a = st.pointee.pending0
            case 1: a = st.pointee.pending1
            default: a = st.pointee.pending2
            }
            st.pointee.pendingHead += 1
            return a
        }
        // SAFETY: every index below is < st.complete <= bufferSize + 1, and buf[complete - 1]
        // is '\n'. Each scan stops at a byte that cannot continue its field, and '\n' continues
        // none, so no scan passes the newline that ends the current line.
        let b = buf
        let hex = hex
        while true {
            var p = st.pointee.start
            if p >= st.pointee.complete {
                if try !refill() { return nil }
                continue
            }
            let lineStart = p
            st.pointee.lineNumber += 1

            // Fast path: lackey's exact layout, "I  ADDR,SIZE\n" or " K ADDR,SIZE\n".
            fast: do {
                if b[p] == 0x20 { p += 1 }
                let kind: AccessKind
                var modify = false
                switch b[p] {
                case UInt8(ascii: "I"): kind = .execute
                case UInt8(ascii: "L"): kind = .read
                case UInt8(ascii: "S"): kind = .write
                case UInt8(ascii: "M"): kind = .read; modify = true
                default: break fast
                }
                p += 1
                guard b[p] == 0x20 else { break fast }
                p += 1
                if b[p] == 0x20 { p += 1 }
                let hexStart = p
                var address: UInt64 = 0
                var d = hex[Int(b[p])]
                while d < 16 {
                    address = address &<< 4 | UInt64(d)
                    p += 1
                    d = hex[Int(b[p])]
                }
                let digits = p - hexStart
                guard digits > 0, digits <= 16, b[p] == UInt8(ascii: ",") else { break fast }
                p += 1
                let sizeStart = p
                var size = 0
                var c = b[p] &- 0x30
                while c < 10 {
                    size = size &* 10 &+ Int(c)
                    p += 1
                    c = b[p] &- 0x30
                }
                guard p - sizeStart <= 4, size >= 1, size <= 4096, b[p] == 0x0A,
                    address <= UInt64.max - UInt64(size - 1)
                else { break fast }
                st.pointee.start = p + 1
                st.pointee.linesRead += 1
                return emit(address, size, kind, modify)
            }

            // General path: find the line's end and parse it carefully (skips, errors).
            // SAFETY: a '\n' exists in buf[lineStart..<complete] (see above).
            let nl = memchr(b + lineStart, 0x0A, st.pointee.complete - lineStart)!
            let lineEnd = b.distance(to: nl.assumingMemoryBound(to: UInt8.self))
            st.pointee.start = lineEnd + 1
            if let a = try parseLine(lineStart, lineEnd) { return a }
        }
    }

    /// The first access of a line, queueing the rest (the write of an `M`; the second page).
    @inline(__always)
    private func emit(_ address: UInt64, _ size: Int, _ kind: AccessKind, _ modify: Bool) -> Access {
        let st = state
        let gva = GuestVirtualAddress(rawValue: address)
        // Split at a 4 KiB boundary: size <= 4096, so at most two pieces.
        let inPage = 4096 - Int(address & 0xFFF)
        if size <= inPage {
            if modify {
                st.pointee.pending0 = Access(address: gva, kind: .write, size: UInt16(size))
                st.pointee.pendingCount = 1
                st.pointee.pendingHead = 0
            }
            return Access(address: gva, kind: kind, size: UInt16(size))
        }
        let second = GuestVirtualAddress(rawValue: address + UInt64(inPage))
        let firstSize = UInt16(inPage)
        let secondSize = UInt16(size - inPage)
        st.pointee.pending0 = Access(address: second, kind: kind, size: secondSize)
        if modify {
            st.pointee.pending1 = Access(address: gva, kind: .write, size: firstSize)
            st.pointee.pending2 = Access(address: second, kind: .write, size: secondSize)
            st.pointee.pendingCount = 3
        } else {
            st.pointee.pendingCount = 1
        }
        st.pointee.pendingHead = 0
        return Access(address: gva, kind: kind, size: firstSize)
    }

    /// Makes `buf[start..<complete]` hold at least one whole line. False at the end of the file.
    private func refill() throws(InputError) -> Bool {
        let st = state
        // Move the partial line to the front.
        let keep = st.pointee.end - st.pointee.start
        if keep > 0, st.pointee.start > 0 {
            // SAFETY: both ranges lie inside the buffer; memmove allows overlap.
            memmove(buf, buf + st.pointee.start, keep)
        }
        st.pointee.start = 0
        st.pointee.end = keep
        st.pointee.complete = 0
        while true {
            if st.pointee.atEOF {
                let end = st.pointee.end
                if end == 0 { return false }
                // A last line without '\n': give it one (the buffer has a spare byte).
                buf[end] = 0x0A
                st.pointee.end = end + 1
                st.pointee.complete = end + 1
                return true
            }
            if st.pointee.end == Self.bufferSize {
                // A whole buffer without a newline. Valgrind's messages may be that long (skip
                // them); an access line never is.
                if buf[0] == UInt8(ascii: "="), buf[1] == UInt8(ascii: "=") {
                    try skipRestOfLine()
                    if st.pointee.complete > 0 { return true }
                    continue
                }
                throw error(line: st.pointee.lineNumber + 1, text: Self.text(buf, 0, 80) + "...",
                            "longer than \(Self.bufferSize) bytes with no newline")
            }
            let old = st.pointee.end
            let n = try readSome(into: old)
            if n == 0 {
                st.pointee.atEOF = true
                continue
            }
            let end = old + n
            st.pointee.end = end
            // The last newline read so far ends the complete lines.
            var i = end
            while i > old, buf[i - 1] != 0x0A { i -= 1 }
            if i > old {
                st.pointee.complete = i
                return true
            }
        }
    }

    /// Drops bytes up to and including the next newline (the tail of an over-long `==` line),
    /// counting it as one line.
    private func skipRestOfLine() throws(InputError) {
        let st = state
        st.pointee.start = 0
        st.pointee.end = 0
        st.pointee.complete = 0
        st.pointee.lineNumber += 1
        while true {
            let n = try readSome(into: 0)
            if n == 0 {
                st.pointee.atEOF = true
                return
            }
            if let nl = memchr(buf, 0x0A, n) {
                st.pointee.start = buf.distance(to: nl.assumingMemoryBound(to: UInt8.self)) + 1
                st.pointee.end = n
                var i = n
                while i > st.pointee.start, buf[i - 1] != 0x0A { i -= 1 }
                st.pointee.complete = i > st.pointee.start ? i : st.pointee.start
                return
            }
        }
    }

    /// `read(2)` into `buf[offset...]`, retrying EINTR; the byte count (0 at end of file).
    private func readSome(into offset: Int) throws(InputError) -> Int {
        while true {
            // SAFETY: offset < bufferSize and the count keeps the write inside the buffer.
            let n = read(fd, buf + offset, Self.bufferSize - offset)
            if n >= 0 { return n }
            let e = errno
            if e == EINTR { continue }
            throw InputError("\(path): read error after line \(lineNumber): \(String(cString: strerror(e)))")
        }
    }

    /// The general parser for `buf[s..<e]` (one line, no '\n'): the first access of the line,
    /// nil for a skipped line, or the error that names what is wrong.
    private func parseLine(_ s: Int, _ e: Int) throws(InputError) -> Access? {
        let b = buf
        var e = e
        // Trailing blanks and a '\r' from a CRLF file.
        while e > s, b[e - 1] == 0x20 || b[e - 1] == 0x0D || b[e - 1] == 0x09 { e -= 1 }
        var p = s
        while p < e, b[p] == 0x20 || b[p] == 0x09 { p += 1 }
        if p == e { return nil }  // Blank.
        let kind: AccessKind
        var modify = false
        switch b[p] {
        case UInt8(ascii: "I"): kind = .execute
        case UInt8(ascii: "L"): kind = .read
        case UInt8(ascii: "S"): kind = .write
        case UInt8(ascii: "M"): kind = .read; modify = true
        case UInt8(ascii: "="):
            if p + 1 < e, b[p + 1] == UInt8(ascii: "=") { return nil }  // Valgrind's message.
            throw bad(s, e, "expected an access kind I, L, S or M")
        default:
            throw bad(s, e, "unknown access kind '\(Self.text(b, p, p + 1))' (expected I, L, S or M)")
        }
        p += 1
        let afterKind = p
        while p < e, b[p] == 0x20 || b[p] == 0x09 { p += 1 }
        if p == afterKind { throw bad(s, e, "expected a space after the access kind") }

        // Hexadecimal address, at most 16 digits.
        var address: UInt64 = 0
        let hexStart = p
        while p < e, hex[Int(b[p])] < 16 {
            address = address &<< 4 | UInt64(hex[Int(b[p])])
            p += 1
        }
        let digits = p - hexStart
        if digits == 0 { throw bad(s, e, "expected a hexadecimal address") }
        if digits > 16 { throw bad(s, e, "the address has more than 16 hexadecimal digits") }
        if p == e || b[p] != UInt8(ascii: ",") {
            throw bad(s, e, p == e ? "expected ',SIZE' after the address" : "the address is not hexadecimal")
        }
        p += 1

        // Decimal size, 1...4096.
        var size = 0
        let decStart = p
        while p < e, b[p] &- 0x30 < 10, p - decStart < 8 {
            size = size * 10 + Int(b[p] &- 0x30)
            p += 1
        }
        if p == decStart { throw bad(s, e, "expected a decimal size after ','") }
        if p != e {
            throw bad(s, e, b[p] &- 0x30 < 10 ? "the size is too large (at most 4096 bytes)" : "unexpected text after the size")
        }
        if size == 0 || size > 4096 { throw bad(s, e, "size \(size) is outside 1...4096 bytes") }
        if address > UInt64.max - UInt64(size - 1) {
            throw bad(s, e, "the access runs past the end of the 64-bit address space")
        }
        state.pointee.linesRead += 1
        return emit(address, size, kind, modify)
    }

    private func bad(_ s: Int, _ e: Int, _ why: String) -> InputError {
        error(line: lineNumber, text: Self.text(buf, s, min(e, s + 200)) + (e > s + 200 ? "..." : ""), why)
    }

    private func error(line: Int, text: String, _ why: String) -> InputError {
        InputError("\(path):\(line): bad line '\(text)': \(why)")
    }

    /// `buf[s..<e]` as text (invalid UTF-8 replaced), for messages only.
    private static func text(_ b: UnsafeMutablePointer<UInt8>, _ s: Int, _ e: Int) -> String {
        // SAFETY: callers pass a range inside the buffer's read bytes.
        String(decoding: UnsafeBufferPointer(start: b + s, count: max(0, e - s)), as: UTF8.self)
    }
}
