#if canImport(Glibc)
import Glibc
#endif

/// A POSIX error number, as returned by a CKVM shim call (`-errno`).
public struct Errno: Error, Hashable, Sendable, CustomStringConvertible {
    public var rawValue: Int32
    public init(rawValue: Int32) { self.rawValue = rawValue }

    public static let interrupted = Errno(rawValue: EINTR)
    public static let again = Errno(rawValue: EAGAIN)
    public static let exists = Errno(rawValue: EEXIST)
    public static let noDevice = Errno(rawValue: ENXIO)

    /// "EINVAL (Invalid argument)".
    public var description: String {
        let names: [Int32: String] = [
            EPERM: "EPERM", ENOENT: "ENOENT", EINTR: "EINTR", EIO: "EIO", ENXIO: "ENXIO", E2BIG: "E2BIG",
            EBADF: "EBADF", EAGAIN: "EAGAIN", ENOMEM: "ENOMEM", EACCES: "EACCES", EFAULT: "EFAULT",
            EBUSY: "EBUSY", EEXIST: "EEXIST", ENODEV: "ENODEV", EINVAL: "EINVAL", ENOTTY: "ENOTTY",
            ENOSPC: "ENOSPC", ENOSYS: "ENOSYS", EOPNOTSUPP: "EOPNOTSUPP", ESRCH: "ESRCH",
        ]
        let text = strerror(rawValue).map { String(cString: $0) } ?? "unknown error"
        return "\(names[rawValue] ?? "errno \(rawValue)") (\(text))"
    }
}

/// Why a misbehaving guest was stopped. The VM is over; the process goes on.
import MemVirtCore

public enum GuestFailure: Error, Sendable, Equatable, CustomStringConvertible {
    /// The guest used a port no device of ours answers.
    case unknownPort(port: UInt16, isWrite: Bool, size: Int, data: UInt64)
    /// The guest touched guest-physical memory that no slot backs (KVM exits as MMIO).
    case outsideMemory(address: GuestPhysicalAddress, isWrite: Bool, length: Int)
    /// The guest triple-faulted (KVM_EXIT_SHUTDOWN).
    case tripleFault(rip: UInt64)
    /// An exception reached one of the runtime's CPL0 trap stubs.
    case exception(vector: UInt8, errorCode: UInt64?, rip: UInt64, cr2: UInt64)
    /// The guest halted where nothing should halt.
    case unexpectedHalt(rip: UInt64)
    /// KVM_EXIT_FAIL_ENTRY: the hardware refused the guest state.
    case failEntry(reason: UInt64)
    /// KVM_EXIT_INTERNAL_ERROR (e.g. an instruction KVM could not emulate).
    case internalError(suberror: UInt32)
    /// An exit we do not handle.
    case unexpectedExit(reason: UInt32)
    /// The guest reported a bad command status.
    case badStatus(UInt64)

    static let exceptionNames = ["#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "#MF(9)", "#TS", "#NP",
                                 "#SS", "#GP", "#PF", "(15)", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP"]

    public var description: String {
        func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }
        switch self {
        case .unknownPort(let p, let w, let s, let d):
            return "guest used unknown port \(hex(UInt64(p))) (\(w ? "out" : "in"), \(s) bytes\(w ? ", data \(hex(d))" : ""))"
        case .outsideMemory(let a, let w, let l):
            return "guest \(w ? "wrote" : "read") \(l) bytes at guest-physical \(a), outside its memory (MMIO exit, no device)"
        case .tripleFault(let rip): return "guest triple-faulted (KVM_EXIT_SHUTDOWN) near rip \(hex(rip))"
        case .exception(let v, let e, let rip, let cr2):
            let name = Int(v) < Self.exceptionNames.count ? Self.exceptionNames[Int(v)] : "vector \(v)"
            var s = "guest exception \(name) at rip \(hex(rip))"
            if let e { s += ", error code \(hex(e))" }
            if v == 14 { s += ", cr2 \(hex(cr2))" }
            return s
        case .unexpectedHalt(let rip): return "guest halted unexpectedly at rip \(hex(rip))"
        case .failEntry(let r): return "KVM_EXIT_FAIL_ENTRY, hardware entry failure reason \(hex(r))"
        case .internalError(let s): return "KVM_EXIT_INTERNAL_ERROR, suberror \(s)"
        case .unexpectedExit(let r): return "unhandled KVM exit reason \(r)"
        case .badStatus(let s): return "guest runtime reported status \(s) (bad command)"
        }
    }
}

/// Errors of the KVM engine. Each names the call and the errno, or the guest's misdeed.
public enum KVMError: Error, Sendable, CustomStringConvertible {
    /// A system call or ioctl failed.
    case call(String, Errno)
    /// /dev/kvm or a needed capability is missing.
    case unavailable(String)
    /// Bad configuration (flags, sizes).
    case invalid(String)
    /// The guest misbehaved; its VM is stopped.
    case guest(GuestFailure)

    public var description: String {
        switch self {
        case .call(let what, let e): return "\(what) failed: \(e)"
        case .unavailable(let s): return "KVM unavailable: \(s)"
        case .invalid(let s): return s
        case .guest(let g): return "guest stopped: \(g)"
        }
    }
}

/// Turns a shim result (>= 0, or -errno) into a value or a named error.
@inline(__always) func checked(_ result: Int32, _ what: @autoclosure () -> String) throws(KVMError) -> Int32 {
    if result < 0 { throw KVMError.call(what(), Errno(rawValue: -result)) }
    return result
}

/// `errno` of the last libc call, read at once.
@inline(__always) func lastErrno() -> Errno { Errno(rawValue: errno) }
