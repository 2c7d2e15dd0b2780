import CKVM
import MemVirtCore
#if canImport(Glibc)
import Glibc
#endif

/// The migration stream, version 2 (see MigrationStreamFormat.version). Every message is a 32-byte header and a payload:
///
///     u32 magic "MVMG" | u16 version | u16 type | u64 payload length | u64 checksum | u64 sequence
///
/// The checksum is `ckvm_checksum` of the payload; the sequence number counts messages per
/// direction from 0, so a dropped or repeated message is refused like a corrupt one. A
/// truncated stream (EOF inside a message), a bad magic, another version, an unknown type,
/// an oversized payload, a checksum or sequence mismatch: each is refused with a message that
/// says which, and where.
public enum MigrationMessage: UInt16, Sendable {
    /// Source -> destination: the VM's configuration (both sides must build the same layout).
    case hello = 1
    /// Source -> destination: pages (count, then index + kind per page, then the data).
    case pages = 2
    /// Source -> destination: data pages whose copy at the destination is stale (hybrid).
    case discard = 3
    /// Source -> destination: vCPU states and the switch-over facts; the guest may run.
    case state = 4
    /// Destination -> source (post-copy): pages the guest faulted on.
    case request = 5
    /// Source -> destination: every page has been sent.
    case end = 6
    /// Destination -> source: the guest runs at the destination now.
    case resumed = 7
    /// Destination -> source: the destination's summary after the guest finished.
    case result = 8
    /// Source -> destination (version 2): answer SYNCED once everything before this is
    /// applied (and the VM is built). The source stops the guest only then, so the switch
    /// does not wait behind the destination's set-up or pages it has not placed yet.
    case sync = 9
    /// Destination -> source: everything before SYNC is applied.
    case synced = 10
}

public enum MigrationStreamFormat {
    public static let magic: UInt32 = 0x474d_564d  // "MVMG" little-endian
    /// 2: SYNC / SYNCED before the stop (1 had none).
    public static let version: UInt16 = 2
    public static let headerSize = 32
    /// The largest payload either side accepts (a batch of pages with its table).
    public static let maxPayload = 64 << 20
}

/// A connected TCP socket carrying the stream. Sends are serialized (post-copy sends from two
/// threads); one thread receives.
public final class MigrationChannel: @unchecked Sendable {
    let fd: FileDescriptor
    var sendLock = pthread_mutex_t()
    var sendSequence: UInt64 = 0
    var receiveSequence: UInt64 = 0
    public private(set) var bytesSent: UInt64 = 0
    public private(set) var bytesReceived: UInt64 = 0
    /// Bytes per second the sender keeps to (nil: as fast as the socket goes).
    public var bandwidth: UInt64?
    var sendStart: UInt64 = 0
    var receiveBuffer: UnsafeMutableRawPointer
    var receiveCapacity: Int

    init(fd: FileDescriptor) {
        self.fd = fd
        pthread_mutex_init(&sendLock, nil)
        receiveCapacity = 1 << 20
        receiveBuffer = .allocate(byteCount: receiveCapacity, alignment: 4096)
        var one: Int32 = 1
        setsockopt(fd.raw, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(4))
    }
    deinit {
        receiveBuffer.deallocate()
        pthread_mutex_destroy(&sendLock)
    }

    /// Connects to `host:port` (a name or address; IPv4 or IPv6).
    public static func connect(host: String, port: UInt16) throws(KVMError) -> MigrationChannel {
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var res: UnsafeMutablePointer<addrinfo>? = nil
        let rc = getaddrinfo(host, String(port), &hints, &res)
        guard rc == 0, let first = res else {
            throw KVMError.invalid("cannot resolve migration target '\(host)': \(String(cString: gai_strerror(rc)))")
        }
        defer { freeaddrinfo(res) }
        var p: UnsafeMutablePointer<addrinfo>? = first
        var last = Errno(rawValue: ECONNREFUSED)
        while let a = p {
            let s = socket(a.pointee.ai_family, a.pointee.ai_socktype | Int32(SOCK_CLOEXEC.rawValue), a.pointee.ai_protocol)
            if s >= 0 {
                if Glibc.connect(s, a.pointee.ai_addr, a.pointee.ai_addrlen) == 0 { return MigrationChannel(fd: FileDescriptor(s)) }
                last = lastErrno()
                close(s)
            }
            p = a.pointee.ai_next
        }
        throw KVMError.call("connect(\(host):\(port))", last)
    }

    /// A listening socket on `address:port` (port 0: any free one).
    static func listen(address: String, port: UInt16) throws(KVMError) -> (FileDescriptor, UInt16) {
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_flags = AI_PASSIVE | AI_NUMERICHOST
        var res: UnsafeMutablePointer<addrinfo>? = nil
        let rc = getaddrinfo(address, String(port), &hints, &res)
        guard rc == 0, let a = res else { throw KVMError.invalid("bad listen address '\(address)': \(String(cString: gai_strerror(rc)))") }
        defer { freeaddrinfo(res) }
        let s = socket(a.pointee.ai_family, a.pointee.ai_socktype | Int32(SOCK_CLOEXEC.rawValue), a.pointee.ai_protocol)
        if s < 0 { throw KVMError.call("socket", lastErrno()) }
        let fd = FileDescriptor(s)
        var one: Int32 = 1
        setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(4))
        if bind(s, a.pointee.ai_addr, a.pointee.ai_addrlen) != 0 { throw KVMError.call("bind(\(address):\(port))", lastErrno()) }
        if Glibc.listen(s, 1) != 0 { throw KVMError.call("listen", lastErrno()) }
        var ss = sockaddr_storage()
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let bound: UInt16 = withUnsafeMutablePointer(to: &ss) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { sp in
                getsockname(s, sp, &len)
                if sp.pointee.sa_family == sa_family_t(AF_INET6) {
                    return UInt16(bigEndian: UnsafeRawPointer(sp).load(fromByteOffset: 2, as: UInt16.self))
                }
                return UInt16(bigEndian: UnsafeRawPointer(sp).load(fromByteOffset: 2, as: UInt16.self))
            }
        }
        return (fd, bound)
    }

    /// Accepts one connection on a listening socket.
    static func accept(_ listener: FileDescriptor) throws(KVMError) -> MigrationChannel {
        while true {
            let s = Glibc.accept(listener.raw, nil, nil)
            if s >= 0 { return MigrationChannel(fd: FileDescriptor(s)) }
            if errno == EINTR { continue }
            throw KVMError.call("accept", lastErrno())
        }
    }

    /// Shuts the connection down (both directions); a blocked receive returns EOF.
    public func shutdownBoth() { shutdown(fd.raw, Int32(SHUT_RDWR)) }

    private func writeAll(_ p: UnsafeRawPointer, _ n: Int) throws(KVMError) {
        var off = 0
        while off < n {
            let w = Glibc.send(fd.raw, p + off, n - off, Int32(MSG_NOSIGNAL))
            if w < 0 {
                if errno == EINTR { continue }
                throw KVMError.call("migration stream send", lastErrno())
            }
            off += w
        }
    }

    /// Sends one message (header + payload).
    public func send(_ type: MigrationMessage, _ payload: UnsafeRawBufferPointer) throws(KVMError) {
        pthread_mutex_lock(&sendLock)
        defer { pthread_mutex_unlock(&sendLock) }
        var h = (UInt32(0), UInt16(0), UInt16(0), UInt64(0), UInt64(0), UInt64(0))
        h.0 = MigrationStreamFormat.magic
        h.1 = MigrationStreamFormat.version
        h.2 = type.rawValue
        h.3 = UInt64(payload.count)
        h.4 = payload.count == 0 ? ckvm_checksum(nil, 0) : ckvm_checksum(payload.baseAddress, payload.count)
        h.5 = sendSequence
        sendSequence += 1
        try withUnsafeBytes(of: &h) { (b) throws(KVMError) in try writeAll(b.baseAddress!, MigrationStreamFormat.headerSize) }
        if payload.count > 0 { try writeAll(payload.baseAddress!, payload.count) }
        bytesSent += UInt64(MigrationStreamFormat.headerSize + payload.count)
        if let bw = bandwidth, bw > 0 {
            if sendStart == 0 { sendStart = monotonicNanoseconds() }
            let due = sendStart + UInt64(Double(bytesSent) / Double(bw) * 1e9)
            let now = monotonicNanoseconds()
            if due > now { usleepNanos(due - now) }
        }
    }

    public func send(_ type: MigrationMessage, _ payload: [UInt8] = []) throws(KVMError) {
        let r: Result<Void, KVMError> = payload.withUnsafeBytes { b in Result { () throws(KVMError) in try send(type, b) } }
        try r.get()
    }

    private func readAll(_ p: UnsafeMutableRawPointer, _ n: Int, what: String) throws(KVMError) {
        var off = 0
        while off < n {
            let r = recv(fd.raw, p + off, n - off, 0)
            if r == 0 {
                throw KVMError.invalid("migration stream truncated: connection closed \(off) bytes into \(what) (\(n) bytes expected)")
            }
            if r < 0 {
                if errno == EINTR { continue }
                throw KVMError.call("migration stream receive (\(what))", lastErrno())
            }
            off += r
        }
    }

    /// Receives one message; the payload stays valid until the next receive.
    public func receive() throws(KVMError) -> (MigrationMessage, UnsafeRawBufferPointer) {
        var h = (UInt32(0), UInt16(0), UInt16(0), UInt64(0), UInt64(0), UInt64(0))
        let seq = receiveSequence
        try withUnsafeMutableBytes(of: &h) { (b) throws(KVMError) in try readAll(b.baseAddress!, MigrationStreamFormat.headerSize, what: "the header of message \(seq)") }
        guard h.0 == MigrationStreamFormat.magic else {
            throw KVMError.invalid("migration stream corrupt: message \(seq) has magic 0x\(String(h.0, radix: 16)), expected 0x\(String(MigrationStreamFormat.magic, radix: 16)) (\"MVMG\")")
        }
        guard h.1 == MigrationStreamFormat.version else {
            throw KVMError.invalid("migration stream version \(h.1), this memvirt reads version \(MigrationStreamFormat.version): refused")
        }
        guard let type = MigrationMessage(rawValue: h.2) else { throw KVMError.invalid("migration stream corrupt: message \(seq) has unknown type \(h.2)") }
        guard h.3 <= UInt64(MigrationStreamFormat.maxPayload) else {
            throw KVMError.invalid("migration stream corrupt: message \(seq) (\(type)) claims \(h.3) bytes (at most \(MigrationStreamFormat.maxPayload))")
        }
        guard h.5 == seq else { throw KVMError.invalid("migration stream corrupt: message sequence \(h.5), expected \(seq)") }
        let n = Int(h.3)
        if n > receiveCapacity {
            receiveBuffer.deallocate()
            receiveCapacity = n
            receiveBuffer = .allocate(byteCount: n, alignment: 4096)
        }
        try readAll(receiveBuffer, n, what: "message \(seq) (\(type))")
        let sum = ckvm_checksum(n == 0 ? nil : UnsafeRawPointer(receiveBuffer), n)
        guard sum == h.4 else {
            throw KVMError.invalid("migration stream corrupt: checksum mismatch in message \(seq) (\(type), \(n) bytes): got 0x\(String(sum, radix: 16)), header says 0x\(String(h.4, radix: 16))")
        }
        receiveSequence += 1
        bytesReceived += UInt64(MigrationStreamFormat.headerSize + n)
        return (type, UnsafeRawBufferPointer(start: receiveBuffer, count: n))
    }
}

/// Appends little-endian values to a byte array.
public struct ByteWriter {
    public var bytes: [UInt8] = []
    public init() {}
    public mutating func put<T: BitwiseCopyable>(_ v: T) { withUnsafeBytes(of: v) { bytes.append(contentsOf: $0) } }
    public mutating func put(bytes b: [UInt8]) { put(UInt64(b.count)); bytes.append(contentsOf: b) }
}

/// Reads what `ByteWriter` wrote; running past the end is a clear error.
public struct ByteReader {
    let buffer: UnsafeRawBufferPointer
    public var offset = 0
    let what: String
    public init(_ b: UnsafeRawBufferPointer, what: String) { buffer = b; self.what = what }
    public mutating func get<T: BitwiseCopyable>(_ t: T.Type = T.self) throws(KVMError) -> T {
        let n = MemoryLayout<T>.size
        guard offset + n <= buffer.count else { throw KVMError.invalid("migration stream corrupt: \(what) ends at byte \(buffer.count), \(n) more expected at \(offset)") }
        let v = buffer.loadUnaligned(fromByteOffset: offset, as: T.self)
        offset += n
        return v
    }
    public mutating func getBytes() throws(KVMError) -> [UInt8] {
        let n = Int(try get(UInt64.self))
        guard n >= 0, offset + n <= buffer.count else { throw KVMError.invalid("migration stream corrupt: \(what): \(n) bytes claimed at \(offset) of \(buffer.count)") }
        let a = Array(buffer[offset..<(offset + n)])
        offset += n
        return a
    }
    public var remaining: Int { buffer.count - offset }
}

extension VCPUState {
    /// The state as bytes (raw kernel structs; both sides run the same KVM ABI).
    public func encoded() -> [UInt8] {
        var w = ByteWriter()
        w.put(regs); w.put(sregs); w.put(fpu)
        w.put(bytes: xsave)
        w.put(UInt8(xcrs == nil ? 0 : 1)); w.put(xcrs ?? kvm_xcrs())
        w.put(UInt64(msrs.count))
        for (i, v) in msrs { w.put(i); w.put(v) }
        w.put(UInt8(lapic == nil ? 0 : 1)); w.put(bytes: lapic ?? [])
        w.put(events); w.put(mpState); w.put(debugRegs)
        w.put(tscKHz ?? 0)
        return w.bytes
    }

    public static func decode(_ r: inout ByteReader) throws(KVMError) -> VCPUState {
        var s = VCPUState()
        s.regs = try r.get(); s.sregs = try r.get(); s.fpu = try r.get()
        s.xsave = try r.getBytes()
        let hasX: UInt8 = try r.get()
        let x: kvm_xcrs = try r.get()
        s.xcrs = hasX != 0 ? x : nil
        let n = Int(try r.get(UInt64.self))
        guard n <= 4096 else { throw KVMError.invalid("migration stream corrupt: \(n) MSRs") }
        for _ in 0..<n { s.msrs.append((try r.get(UInt32.self), try r.get(UInt64.self))) }
        let hasL: UInt8 = try r.get()
        let l = try r.getBytes()
        s.lapic = hasL != 0 ? l : nil
        s.events = try r.get(); s.mpState = try r.get(); s.debugRegs = try r.get()
        let k: UInt32 = try r.get()
        s.tscKHz = k == 0 ? nil : k
        return s
    }
}
