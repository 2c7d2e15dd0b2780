import CKVM
import Crypto
import Foundation  // DataProtocol, ContiguousBytes for swift-crypto's HMAC
import MemVirtCore
#if canImport(Glibc)
import Glibc
#endif

/// The migration stream, version 4 (see MigrationStreamFormat.version). Every message is a 32-byte header and a payload:
///
///     u32 magic "MVMG" | u16 version | u16 type | u64 payload length | u64 checksum | u64 sequence
///
/// The checksum is `ckvm_checksum` of the payload; the sequence number counts messages per
/// direction from 0, so a dropped or repeated message is refused like a corrupt one. A
/// truncated stream (EOF inside a message), a bad magic, another version, an unknown type,
/// an oversized payload, a checksum or sequence mismatch: each is refused with a message that
/// says which, and where.
///
/// With a pre-shared key (`MigrationLink.key`, `--key-file`) each side first sends a NONCE
/// (32 random bytes, unauthenticated); every later message is followed by a 32-byte
/// HMAC-SHA256 of (direction, header, payload) under the session key
/// HMAC(key, "memvirt-migration/3" | source nonce | destination nonce). A replayed session
/// (the other side's nonce differs), a wrong key or a changed byte fails the first MAC.
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
    /// Source -> destination (version 3): the source's memory hash, once it is computed after
    /// the switch; the destination refuses a guest whose memory hashes differently.
    case verify = 11
    /// Destination -> source (version 3): the guest still runs here (sent at least once a
    /// second while it does, so an idle timeout means a dead peer, not a long workload).
    case alive = 12
    /// Either way, first, on a keyed stream: 32 random bytes of this side's session nonce.
    case nonce = 13
    /// Source -> destination, last (version 3): RESULT arrived and the hashes agree. A
    /// destination that never hears it reports failure too: both sides agree on the outcome.
    case done = 14
}

/// How a migration connection is guarded: timeouts and the optional pre-shared key.
public struct MigrationLink: Sendable {
    /// A read or write that makes no progress for this long, or a connect that takes longer,
    /// fails the migration (`--timeout`). 30 s: far above loopback's and a LAN's stalls
    /// (a 1 MiB batch at 100 Mbit/s takes 84 ms), far below "forever".
    public var timeoutNanos: UInt64 = 30_000_000_000
    /// Pre-shared key (`--key-file`): every message is authenticated (HMAC-SHA256).
    public var key: [UInt8]? = nil
    public init() {}

    /// The longest timeout accepted: a day.
    public static let maxTimeoutNanos: UInt64 = 86_400_000_000_000
    /// How often the destination says ALIVE while its guest runs: at least once a second and
    /// three times per timeout (a source with a shorter --timeout still hears it).
    static func heartbeat(timeoutNanos: UInt64) -> UInt64 { min(1_000_000_000, max(1_000_000, timeoutNanos / 3)) }

    /// Reads a key file: 16 to 4096 bytes, used as they are (a trailing newline included).
    public static func readKey(path: String) throws(KVMError) -> [UInt8] {
        let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        if fd < 0 { throw KVMError.call("open(--key-file \(path))", lastErrno()) }
        defer { close(fd) }
        var st = stat()
        if fstat(fd, &st) != 0 { throw KVMError.call("fstat(--key-file \(path))", lastErrno()) }
        guard st.st_mode & S_IFMT == S_IFREG else { throw KVMError.invalid("--key-file \(path): not a regular file") }
        var key = [UInt8](repeating: 0, count: 4097)
        var got = 0
        while got < key.count {
            let n = key.withUnsafeMutableBytes { read(fd, $0.baseAddress! + got, $0.count - got) }
            if n < 0 { if errno == EINTR { continue }; throw KVMError.call("read(--key-file \(path))", lastErrno()) }
            if n == 0 { break }
            got += n
        }
        guard got >= 16, got <= 4096 else {
            throw KVMError.invalid("--key-file \(path): \(got) bytes; use 16 to 4096 bytes (e.g. head -c 32 /dev/urandom > \(path))")
        }
        return Array(key[..<got])
    }
}

public enum MigrationStreamFormat {
    public static let magic: UInt32 = 0x474d_564d  // "MVMG" little-endian
    /// 2: SYNC / SYNCED before the stop (1 had none). 3: VERIFY, ALIVE, NONCE and, with a
    /// key, a MAC after each message; a stream must carry every page before it resumes.
    /// 4: prepared post-copy: the runtime goes before the stop, STATE ends with the runtime
    /// pages written since (u64 count, u64 indices; no page data), REQUEST may name runtime
    /// pages, RESULT ends with the destination's switch times.
    public static let version: UInt16 = 4
    /// The MAC after each message of a keyed stream (HMAC-SHA256).
    public static let macSize = 32
    public static let nonceSize = 32
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
    /// Idle timeout of reads and writes (SO_RCVTIMEO / SO_SNDTIMEO).
    public let timeoutNanos: UInt64
    /// Keyed streams: the session key, and which side this is ("S" source, "D" destination).
    var sessionKey: SymmetricKey?
    var sendLabel: UInt8 = 0
    var receiveLabel: UInt8 = 0
    /// In the key handshake: the peer's NONCE is expected (and unauthenticated).
    var handshaking = false

    init(fd: FileDescriptor, timeoutNanos: UInt64 = MigrationLink().timeoutNanos) {
        self.fd = fd
        self.timeoutNanos = timeoutNanos
        pthread_mutex_init(&sendLock, nil)
        receiveCapacity = 1 << 20
        receiveBuffer = .allocate(byteCount: receiveCapacity, alignment: 4096)
        var one: Int32 = 1
        setsockopt(fd.raw, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(4))
        var tv = timeval(tv_sec: Int(timeoutNanos / 1_000_000_000), tv_usec: Int(timeoutNanos % 1_000_000_000 / 1000))
        setsockopt(fd.raw, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd.raw, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    static func seconds(_ n: UInt64) -> String {
        n % 1_000_000_000 == 0 ? "\(n / 1_000_000_000) s" : "\(Double(n / 1_000_000) / 1000) s"
    }

    /// Keyed streams: exchanges nonces and derives the session key. `source`: this side
    /// connected (its nonce goes first in the derivation). Unkeyed streams: nothing.
    public func authenticate(key: [UInt8]?, source: Bool) throws(KVMError) {
        guard let key else { return }
        var mine = [UInt8](repeating: 0, count: MigrationStreamFormat.nonceSize)
        var rng = SystemRandomNumberGenerator()
        for i in mine.indices { mine[i] = rng.next() }
        try send(.nonce, mine)
        let theirs: [UInt8]
        handshaking = true
        defer { handshaking = false }
        do throws(KVMError) {
            let (type, payload) = try receive()
            guard type == .nonce, payload.count == MigrationStreamFormat.nonceSize else {
                throw KVMError.invalid("migration stream refused: this side has a --key-file, the peer sent \(type) instead of its NONCE (an unauthenticated stream: give both sides the same --key-file)")
            }
            theirs = Array(payload)
        } catch {
            if case .invalid(let m) = error, m.hasPrefix("migration stream truncated") {
                throw KVMError.invalid("\(m) (during the key handshake: does the peer have the same --key-file?)")
            }
            throw error
        }
        var h = HMAC<SHA256>(key: SymmetricKey(data: key))
        h.update(data: Array("memvirt-migration/3".utf8))
        h.update(data: source ? mine : theirs)
        h.update(data: source ? theirs : mine)
        sessionKey = SymmetricKey(data: Array(h.finalize()))
        sendLabel = source ? 0x53 : 0x44
        receiveLabel = source ? 0x44 : 0x53
    }

    func mac(label: UInt8, header: UnsafeRawBufferPointer, payload: UnsafeRawBufferPointer, key: SymmetricKey) -> [UInt8] {
        var h = HMAC<SHA256>(key: key)
        h.update(data: [label])
        h.update(data: header)
        if payload.count > 0 { h.update(data: payload) }
        return Array(h.finalize())
    }
    deinit {
        receiveBuffer.deallocate()
        pthread_mutex_destroy(&sendLock)
    }

    /// Connects to `host:port` (a name or address; IPv4 or IPv6).
    public static func connect(host: String, port: UInt16, timeoutNanos: UInt64 = MigrationLink().timeoutNanos) throws(KVMError) -> MigrationChannel {
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
                // Non-blocking connect, waited for at most the timeout (a blackholed address
                // would otherwise hold the source for the kernel's ~2 minutes of SYN retries).
                let flags = fcntl(s, F_GETFL)
                _ = fcntl(s, F_SETFL, flags | O_NONBLOCK)
                var ok = Glibc.connect(s, a.pointee.ai_addr, a.pointee.ai_addrlen) == 0
                if !ok && errno == EINPROGRESS {
                    var pfd = pollfd(fd: s, events: Int16(POLLOUT), revents: 0)
                    let deadline = monotonicNanoseconds() + timeoutNanos
                    var n: Int32 = 0
                    repeat {
                        let now = monotonicNanoseconds()
                        let left = deadline > now ? deadline - now : 0
                        n = poll(&pfd, 1, Int32(min(left / 1_000_000 + 1, UInt64(Int32.max))))
                    } while n < 0 && errno == EINTR
                    if n == 0 {
                        last = Errno(rawValue: ETIMEDOUT)
                    } else if n > 0 {
                        var err: Int32 = 0
                        var len = socklen_t(4)
                        getsockopt(s, SOL_SOCKET, SO_ERROR, &err, &len)
                        if err == 0 { ok = true } else { last = Errno(rawValue: err) }
                    } else {
                        last = lastErrno()
                    }
                } else if !ok {
                    last = lastErrno()
                }
                if ok {
                    _ = fcntl(s, F_SETFL, flags)
                    return MigrationChannel(fd: FileDescriptor(s), timeoutNanos: timeoutNanos)
                }
                close(s)
            }
            p = a.pointee.ai_next
        }
        if last.rawValue == ETIMEDOUT {
            throw KVMError.invalid("connect(\(host):\(port)) timed out after \(seconds(timeoutNanos)) (--timeout)")
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
    static func accept(_ listener: FileDescriptor, timeoutNanos: UInt64 = MigrationLink().timeoutNanos) throws(KVMError) -> MigrationChannel {
        while true {
            let s = Glibc.accept(listener.raw, nil, nil)
            if s >= 0 {
                _ = fcntl(s, F_SETFD, FD_CLOEXEC); return MigrationChannel(fd: FileDescriptor(s), timeoutNanos: timeoutNanos) }
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
                if errno == EAGAIN || errno == EWOULDBLOCK {
                    throw KVMError.invalid("migration stream send timed out: the peer took nothing for \(Self.seconds(timeoutNanos)) (--timeout), \(off) of \(n) bytes written")
                }
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
        var trailer = 0
        if let key = sessionKey {
            let tag = withUnsafeBytes(of: &h) { mac(label: sendLabel, header: $0, payload: payload, key: key) }
            let t = UnsafeMutableRawPointer.allocate(byteCount: tag.count, alignment: 8)
            defer { t.deallocate() }
            for (i, x) in tag.enumerated() { t.storeBytes(of: x, toByteOffset: i, as: UInt8.self) }
            try writeAll(t, tag.count)
            trailer = tag.count
        }
        bytesSent += UInt64(MigrationStreamFormat.headerSize + payload.count + trailer)
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
                if errno == EAGAIN || errno == EWOULDBLOCK {
                    throw KVMError.invalid("migration stream timed out: the peer sent nothing for \(Self.seconds(timeoutNanos)) (--timeout), \(off) bytes into \(what) (\(n) bytes expected)")
                }
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
            throw KVMError.invalid("migration stream version \(h.1), this memvirt reads version \(MigrationStreamFormat.version) only: refused (run the same memvirt on both sides; version 4 changed STATE and RESULT for the prepared post-copy)")
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
        var trailer = 0
        if let key = sessionKey {
            let tagBuffer = UnsafeMutableRawPointer.allocate(byteCount: MigrationStreamFormat.macSize, alignment: 8)
            defer { tagBuffer.deallocate() }
            try readAll(tagBuffer, MigrationStreamFormat.macSize, what: "the MAC of message \(seq) (\(type))")
            let tag = (0..<MigrationStreamFormat.macSize).map { tagBuffer.load(fromByteOffset: $0, as: UInt8.self) }
            let want = withUnsafeBytes(of: &h) { mac(label: receiveLabel, header: $0, payload: UnsafeRawBufferPointer(start: receiveBuffer, count: n), key: key) }
            var diff: UInt8 = 0
            for i in 0..<MigrationStreamFormat.macSize { diff |= tag[i] ^ want[i] }
            guard diff == 0 else {
                throw KVMError.invalid("migration stream refused: message \(seq) (\(type), \(n) bytes) fails authentication (a wrong --key-file, a replayed session or a changed message)")
            }
            trailer = MigrationStreamFormat.macSize
        } else if type == .nonce && !handshaking {
            throw KVMError.invalid("migration stream refused: the peer authenticates its messages (NONCE) and this side has no key: give both sides the same --key-file")
        }
        receiveSequence += 1
        bytesReceived += UInt64(MigrationStreamFormat.headerSize + n + trailer)
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
    public let what: String
    public init(_ b: UnsafeRawBufferPointer, what: String) { buffer = b; self.what = what }
    public mutating func get<T: BitwiseCopyable>(_ t: T.Type = T.self) throws(KVMError) -> T {
        let n = MemoryLayout<T>.size
        guard n <= buffer.count - offset else { throw KVMError.invalid("migration stream corrupt: \(what) ends at byte \(buffer.count), \(n) more expected at \(offset)") }
        let v = buffer.loadUnaligned(fromByteOffset: offset, as: T.self)
        offset += n
        return v
    }
    /// A length-prefixed byte field (u64 length, then the bytes); at most `limit` bytes and
    /// never more than the message holds (the length is checked before it is converted).
    public mutating func getBytes(limit: Int = Int.max, field: String = "byte field") throws(KVMError) -> [UInt8] {
        let at = offset
        let claimed = try get(UInt64.self)
        guard claimed <= UInt64(remaining) else {
            throw KVMError.invalid("migration stream corrupt: \(what): \(field) of \(claimed) bytes claimed at byte \(at), \(remaining) left in the message")
        }
        guard claimed <= UInt64(limit) else {
            throw KVMError.invalid("migration stream corrupt: \(what): \(field) of \(claimed) bytes at byte \(at), at most \(limit) allowed")
        }
        let n = Int(claimed)
        let a = Array(buffer[offset..<(offset + n)])
        offset += n
        return a
    }

    /// A u64 count, checked against `limit` before it is converted (a count from outside
    /// must never trap `Int(_:)` or overflow a sum).
    public mutating func getCount(limit: Int, _ field: String) throws(KVMError) -> Int {
        let at = offset
        let v = try get(UInt64.self)
        guard v <= UInt64(max(0, limit)) else {
            throw KVMError.invalid("migration stream corrupt: \(what): \(field) \(v) at byte \(at), at most \(limit) allowed")
        }
        return Int(v)
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

    /// KVM_SET_XSAVE's struct kvm_xsave: 4,096 bytes (KVM_GET_XSAVE2 may return more).
    public static let minXSAVEBytes = 4096
    /// The largest XSAVE area taken (KVM_CAP_XSAVE2 reports ~11 KiB with AMX; 64 KiB leaves room).
    public static let maxXSAVEBytes = 64 << 10
    /// Saved MSRs: `VirtualCPU.savedMSRCandidates` has 21; 4096 is the stream's bound.
    public static let maxMSRs = 4096

    public static func decode(_ r: inout ByteReader) throws(KVMError) -> VCPUState {
        var s = VCPUState()
        s.regs = try r.get(); s.sregs = try r.get(); s.fpu = try r.get()
        s.xsave = try r.getBytes(limit: maxXSAVEBytes, field: "XSAVE area")
        // KVM_SET_XSAVE reads 4,096 bytes (KVM_SET_XSAVE2 as many as KVM_CAP_XSAVE2 says):
        // a shorter area would be read past its end. Empty: no XSAVE (KVM_SET_FPU instead).
        guard s.xsave.isEmpty || s.xsave.count >= minXSAVEBytes else {
            throw KVMError.invalid("migration stream corrupt: \(r.what): an XSAVE area of \(s.xsave.count) bytes (KVM_SET_XSAVE reads \(minXSAVEBytes))")
        }
        let hasX: UInt8 = try r.get()
        let x: kvm_xcrs = try r.get()
        s.xcrs = hasX != 0 ? x : nil
        let n = try r.getCount(limit: maxMSRs, "MSR count")
        for _ in 0..<n { s.msrs.append((try r.get(UInt32.self), try r.get(UInt64.self))) }
        let hasL: UInt8 = try r.get()
        let l = try r.getBytes(limit: MemoryLayout<kvm_lapic_state>.size, field: "LAPIC state")
        guard hasL == 0 || l.count == MemoryLayout<kvm_lapic_state>.size else {
            throw KVMError.invalid("migration stream corrupt: \(r.what): a LAPIC state of \(l.count) bytes (KVM_SET_LAPIC reads \(MemoryLayout<kvm_lapic_state>.size))")
        }
        s.lapic = hasL != 0 ? l : nil
        s.events = try r.get(); s.mpState = try r.get(); s.debugRegs = try r.get()
        let k: UInt32 = try r.get()
        s.tscKHz = k == 0 ? nil : k
        return s
    }
}
