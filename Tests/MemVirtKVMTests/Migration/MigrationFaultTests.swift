import CKVM
import MemVirtCore
import MemVirtGuest
import Testing
#if canImport(Glibc)
import Glibc
#endif
@testable import MemVirtKVM

/// A man in the middle on loopback: accepts the source, connects to the destination, and
/// relays message by message (header, payload, and the MAC on a keyed stream), letting the
/// test alter a message (recomputing its checksum, as a careless or hostile relay would) or
/// cut both connections. It keeps the source's bytes as sent (for a replay).
final class StreamRelay: @unchecked Sendable {
    enum Direction: Sendable { case toDestination, toSource }
    enum Action: Sendable { case forward, cut }
    typealias Hook = @Sendable (Direction, MigrationMessage?, inout [UInt8]) -> Action

    let port: UInt16
    private let listener: FileDescriptor
    private var lock = pthread_mutex_t()
    private var sourceBytes: [UInt8] = []
    private var threads: [DedicatedThread] = []
    private var accepter: DedicatedThread?
    private var fds: [Int32] = []

    init(to destination: UInt16, keyed: Bool = false, hook: @escaping Hook) throws {
        pthread_mutex_init(&lock, nil)
        (listener, port) = try MigrationChannel.listen(address: "127.0.0.1", port: 0)
        let l = listener
        accepter = try DedicatedThread.start(name: "test-relay") { [self] in
            let a = Glibc.accept(l.raw, nil, nil)
            guard a >= 0 else { return }
            guard let b = try? MigrationChannel.connect(host: "127.0.0.1", port: destination) else { close(a); return }
            let bfd = dup(b.fd.raw)
            pthread_mutex_lock(&lock); fds = [a, bfd]; pthread_mutex_unlock(&lock)
            let t1 = try? DedicatedThread.start(name: "test-relay-s2d") { [self] in pump(from: a, to: bfd, .toDestination, keyed: keyed, hook: hook) }
            let t2 = try? DedicatedThread.start(name: "test-relay-d2s") { [self] in pump(from: bfd, to: a, .toSource, keyed: keyed, hook: hook) }
            pthread_mutex_lock(&lock); threads = [t1, t2].compactMap { $0 }; pthread_mutex_unlock(&lock)
        }
    }

    /// Ends both connections; waits for the relay threads.
    func finish() {
        accepter?.join()
        pthread_mutex_lock(&lock)
        let ts = threads, fs = fds
        pthread_mutex_unlock(&lock)
        for f in fs { shutdown(f, Int32(SHUT_RDWR)) }
        for t in ts { t.join() }
        for f in fs { close(f) }
    }

    var recordedSource: [UInt8] { pthread_mutex_lock(&lock); defer { pthread_mutex_unlock(&lock) }; return sourceBytes }

    private func readAll(_ fd: Int32, _ n: Int) -> [UInt8]? {
        var b = [UInt8](repeating: 0, count: n)
        var off = 0
        while off < n {
            let r = b.withUnsafeMutableBytes { recv(fd, $0.baseAddress! + off, n - off, 0) }
            if r <= 0 { if r < 0 && errno == EINTR { continue }; return nil }
            off += r
        }
        return b
    }

    private func writeAll(_ fd: Int32, _ b: [UInt8]) -> Bool {
        var off = 0
        while off < b.count {
            let w = b.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + off, b.count - off, Int32(MSG_NOSIGNAL)) }
            if w <= 0 { if w < 0 && errno == EINTR { continue }; return false }
            off += w
        }
        return true
    }

    private func pump(from: Int32, to: Int32, _ dir: Direction, keyed: Bool, hook: Hook) {
        defer { shutdown(to, Int32(SHUT_RDWR)); shutdown(from, Int32(SHUT_RDWR)) }
        while true {
            guard var header = readAll(from, MigrationStreamFormat.headerSize) else { return }
            let type = MigrationMessage(rawValue: header.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: 6, as: UInt16.self) })
            let n = Int(header.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: 8, as: UInt64.self) })
            guard n <= MigrationStreamFormat.maxPayload, var payload = readAll(from, n) else { return }
            let trailer = keyed && type != .nonce ? (readAll(from, MigrationStreamFormat.macSize) ?? []) : []
            let before = payload
            if hook(dir, type, &payload) == .cut { return }
            if payload != before {
                header.store(payload.withUnsafeBytes { ckvm_checksum($0.baseAddress, $0.count) }, at: 16)
            }
            let out = header + payload + trailer
            if dir == .toDestination { pthread_mutex_lock(&lock); sourceBytes += out; pthread_mutex_unlock(&lock) }
            guard writeAll(to, out) else { return }
        }
    }
}

/// A destination `LiveMigration.listen` on its own thread.
final class Destination {
    let box = ResultBox<MigrationReport>()
    let thread: DedicatedThread
    let port: UInt16

    init(link: MigrationLink = MigrationLink()) throws {
        let box = self.box
        let bound = Handoff<Result<UInt16, KVMError>>()
        thread = try DedicatedThread.start(name: "test-listen") {
            do { box.value = .success(try LiveMigration.listen(port: 0, link: link) { bound.put(.success($0)) }) } catch let e as KVMError {
                box.value = .failure(e)
                bound.put(.failure(e))
            } catch {}
        }
        port = try bound.take().get()
    }

    /// Joins; the error text, or nil when the destination reported success.
    func error() -> String? {
        thread.join()
        switch box.value {
        case .failure(let e)?: return "\(e)"
        case .success(let r)?: return r.error
        case nil: return "no report"
        }
    }
}

@Suite("KVM engine: migration faults, timeouts and keys", .serialized, .enabled(if: KVM.isUsable, Comment(rawValue: kvmReason)))
struct MigrationFaultTests {
    static let spec = WorkloadSpec(pattern: .uniform, footprint: .mib(16), accesses: 3_000_000, writeRatio: 0.3, seed: 31)

    static func key(_ byte: UInt8) -> [UInt8] { [UInt8](repeating: byte, count: 32) }

    // MARK: defect 5: failures after the switch, hashes that differ

    @Test("post-copy with the destination gone after the switch: the source reports failure, not success")
    func postcopyDestinationGone() throws {
        let d = try Destination()
        // RESUMED reaches the source (the switch); the next message back is never delivered
        // and both connections end: the destination is gone.
        let switched = ResultBox<Bool>()
        let relay = try StreamRelay(to: d.port) { dir, type, _ in
            guard dir == .toSource else { return .forward }
            if switched.value != nil { return .cut }
            if type == .resumed { switched.value = .success(true) }
            return .forward
        }
        var o = MigrationOptions()
        o.mode = .postcopy
        o.afterNanos = 100_000_000
        o.bandwidth = 32 << 20  // the push is still going when the link dies
        let s = try LiveMigration.migrate(Self.spec, to: "127.0.0.1", port: relay.port, options: o)
        relay.finish()
        let de = d.error()
        print("post-copy cut after the switch: \(s.json.rendered()) / destination: \(de ?? "nil")")
        #expect(!s.migrated)
        #expect(s.switchedOver)
        #expect(s.error?.contains("after the switch") == true)
        #expect(de != nil)
    }

    @Test("a relay that alters a page and recomputes its checksum: both sides fail (hashes differ)")
    func alteredPage() throws {
        let d = try Destination()
        let once = ResultBox<Bool>()
        let relay = try StreamRelay(to: d.port) { dir, type, payload in
            // The first batch carrying page data: flip its last byte.
            if dir == .toDestination, type == .pages, once.value == nil, payload.count > 4 + 9 * 256 {
                once.value = .success(true)
                payload[payload.count - 1] ^= 0x5a
            }
            return .forward
        }
        let reads = WorkloadSpec(pattern: .uniform, footprint: .mib(8), accesses: 400_000, writeRatio: 0, seed: 32)
        var o = MigrationOptions()
        o.afterNanos = 100_000_000
        o.prefillData = true  // every page carries data; no write re-sends the altered one
        let s = try LiveMigration.migrate(reads, to: "127.0.0.1", port: relay.port, options: o)
        relay.finish()
        let de = d.error()
        print("altered page: \(s.json.rendered()) / destination: \(de ?? "nil")")
        #expect(once.value != nil)
        #expect(!s.migrated && s.switchedOver && s.error != nil)
        #expect(de?.contains("hashes differ") == true)
    }

    // MARK: defect 6: timeouts

    @Test("a peer that connects and goes silent, or sends half a header, is dropped after the timeout", arguments: [0, 10])
    func silentPeer(bytes: Int) throws {
        var link = MigrationLink()
        link.timeoutNanos = 300_000_000
        let d = try Destination(link: link)
        let t0 = monotonicNanoseconds()
        let ch = try MigrationChannel.connect(host: "127.0.0.1", port: d.port)
        if bytes > 0 {
            let junk = [UInt8](repeating: 0x4d, count: bytes)
            _ = junk.withUnsafeBytes { Glibc.send(ch.fd.raw, $0.baseAddress, bytes, Int32(MSG_NOSIGNAL)) }
        }
        let e = d.error() ?? ""
        let took = monotonicNanoseconds() - t0
        print("silent peer (\(bytes) bytes): \(e) after \(took / 1_000_000) ms")
        #expect(e.contains("timed out") && e.contains("\(bytes) bytes into the header"), "\(e)")
        #expect(took >= 250_000_000 && took < 10_000_000_000)
    }

    @Test("while one connection is in progress, a second is refused at once (not left in the backlog)")
    func secondConnection() throws {
        var link = MigrationLink()
        link.timeoutNanos = 1_000_000_000
        let d = try Destination(link: link)
        let first = try MigrationChannel.connect(host: "127.0.0.1", port: d.port)
        usleepNanos(100_000_000)  // the listener has accepted the first and closed its socket
        let t0 = monotonicNanoseconds()
        var refused = false
        do {
            let second = try MigrationChannel.connect(host: "127.0.0.1", port: d.port, timeoutNanos: 3_000_000_000)
            try second.send(.hello, [UInt8](repeating: 0, count: 8))
            _ = try second.receive()
        } catch {
            refused = true
            print("second connection: \(error)")
        }
        #expect(refused)
        #expect(monotonicNanoseconds() - t0 < 2_000_000_000)
        _ = first
        #expect(d.error()?.contains("timed out") == true)
    }

    @Test("a destination that accepts and never reads: the source's send times out and its guest finishes here")
    func stalledDestination() throws {
        let (listener, port) = try MigrationChannel.listen(address: "127.0.0.1", port: 0)
        var o = MigrationOptions()
        o.afterNanos = 50_000_000
        o.link.timeoutNanos = 400_000_000
        o.prefillData = true  // 16 MiB of page data: more than the socket buffers hold
        let s = try LiveMigration.migrate(Self.spec, to: "127.0.0.1", port: port, options: o)
        _ = listener
        print("stalled destination: \(s.json.rendered())")
        #expect(!s.migrated && !s.switchedOver)
        #expect(s.error?.contains("timed out") == true)
        #expect(s.guest.first?.accesses == Self.spec.accesses)
    }

    @Test("connect to a listener whose backlog is full times out")
    func connectTimeout() throws {
        let (listener, port) = try MigrationChannel.listen(address: "127.0.0.1", port: 0)
        // Fill the backlog (listen(s, 1) queues two) without accepting.
        var held: [MigrationChannel] = []
        var timedOut = false
        let t0 = monotonicNanoseconds()
        for _ in 0..<8 {
            do { held.append(try MigrationChannel.connect(host: "127.0.0.1", port: port, timeoutNanos: 300_000_000)) } catch {
                print("connect: \(error)")
                timedOut = "\(error)".contains("timed out")
                break
            }
        }
        _ = listener
        #expect(timedOut)
        #expect(monotonicNanoseconds() - t0 < 5_000_000_000)
    }

    // MARK: defect 7: keys

    @Test("with the same key on both sides the migration succeeds, authenticated")
    func keyed() throws {
        var o = MigrationOptions()
        o.afterNanos = 100_000_000
        o.link.key = Self.key(7)
        let (s, dst) = try LiveMigration.loopback(Self.spec, options: o)
        #expect(s.migrated && s.error == nil && dst.error == nil)
        #expect(s.sourceHash == s.destinationHash)
        let want = try oracle(Self.spec)
        #expect(s.guest.first?.memoryChecksum == want.checksum)
    }

    @Test("a wrong key, or a key on one side only, is refused; the source's guest finishes here", arguments: ["wrong", "source-only", "destination-only"])
    func wrongKey(kind: String) throws {
        var link = MigrationLink()
        link.timeoutNanos = 5_000_000_000
        if kind != "source-only" { link.key = Self.key(1) }
        let d = try Destination(link: link)
        var o = MigrationOptions()
        o.afterNanos = 50_000_000
        o.link.timeoutNanos = 5_000_000_000
        if kind != "destination-only" { o.link.key = Self.key(2) }
        let s = try LiveMigration.migrate(Self.spec, to: "127.0.0.1", port: d.port, options: o)
        let de = d.error() ?? ""
        print("\(kind): source \(s.error ?? "nil") / destination \(de)")
        #expect(!s.migrated && s.error != nil)
        switch kind {
        case "wrong": #expect(de.contains("fails authentication"), "\(de)")
        case "source-only": #expect(de.contains("no key"), "\(de)")
        default: #expect(de.contains("unauthenticated") || de.contains("instead of its NONCE"), "\(de)")
        }
        let want = try oracle(Self.spec)
        #expect(s.guest.first?.memoryChecksum == want.checksum)
    }

    @Test("a keyed session recorded and replayed to a new listener is refused")
    func replay() throws {
        var link = MigrationLink()
        link.key = Self.key(9)
        let d1 = try Destination(link: link)
        let relay = try StreamRelay(to: d1.port, keyed: true) { _, _, _ in .forward }
        let small = WorkloadSpec(pattern: .uniform, footprint: .mib(4), accesses: 200_000, writeRatio: 0.3, seed: 33)
        var o = MigrationOptions()
        o.afterNanos = 50_000_000
        o.link = link
        let s = try LiveMigration.migrate(small, to: "127.0.0.1", port: relay.port, options: o)
        // The destination first (error() joins it): the source may return before the relay has
        // forwarded its last message, and finishing the relay then would cut it off.
        let e1 = d1.error()
        relay.finish()
        #expect(s.migrated && s.error == nil)
        #expect(e1 == nil)
        let recorded = relay.recordedSource
        #expect(recorded.count > 4096)
        // The same bytes to a fresh listener with the same key.
        link.timeoutNanos = 3_000_000_000
        let d2 = try Destination(link: link)
        let ch = try MigrationChannel.connect(host: "127.0.0.1", port: d2.port)
        var off = 0
        while off < recorded.count {
            let w = recorded.withUnsafeBytes { Glibc.send(ch.fd.raw, $0.baseAddress! + off, recorded.count - off, Int32(MSG_NOSIGNAL)) }
            if w <= 0 { break }
            off += w
        }
        let e = d2.error() ?? ""
        print("replay: \(e)")
        #expect(e.contains("message 1 (hello") && e.contains("fails authentication"), "\(e)")
    }

    @Test("a keyed message changed in flight (checksum recomputed) is refused")
    func tampered() throws {
        var link = MigrationLink()
        link.key = Self.key(5)
        link.timeoutNanos = 5_000_000_000
        let d = try Destination(link: link)
        let relay = try StreamRelay(to: d.port, keyed: true) { dir, type, payload in
            if dir == .toDestination && type == .hello { payload[4] ^= 1 }  // a bit of the data size
            return .forward
        }
        var o = MigrationOptions()
        o.afterNanos = 50_000_000
        o.link = link
        let s = try LiveMigration.migrate(Self.spec, to: "127.0.0.1", port: relay.port, options: o)
        relay.finish()
        let e = d.error() ?? ""
        #expect(!s.migrated)
        #expect(e.contains("hello") && e.contains("fails authentication"), "\(e)")
    }

    @Test("listening on a non-loopback address needs a key or --insecure")
    func bindPolicy() throws {
        #expect(LiveMigration.isLoopback("127.0.0.1") && LiveMigration.isLoopback("::1") && !LiveMigration.isLoopback("0.0.0.0"))
        do {
            _ = try LiveMigration.listen(address: "0.0.0.0", port: 0) { _ in Issue.record("bound without a key") }
            Issue.record("accepted")
        } catch {
            #expect("\(error)".contains("--key-file") && "\(error)".contains("--insecure"))
        }
        // With --insecure it binds (a connection closed at once ends it: a truncated stream).
        var link = MigrationLink()
        link.timeoutNanos = 2_000_000_000
        let box = ResultBox<MigrationReport>()
        let bound = Handoff<UInt16>()
        let l = link
        let t = try DedicatedThread.start(name: "test-insecure") {
            do { box.value = .success(try LiveMigration.listen(address: "0.0.0.0", port: 0, link: l, insecure: true) { bound.put($0) }) } catch let e as KVMError {
                box.value = .failure(e)
            } catch {}
        }
        let p = bound.take()
        try MigrationChannel.connect(host: "127.0.0.1", port: p).shutdownBoth()
        t.join()
        guard case .failure(let e)? = box.value else { Issue.record("no failure"); return }
        #expect("\(e)".contains("truncated"))
    }

    @Test("a key file must hold 16 to 4096 bytes")
    func keyFile() throws {
        let path = "/tmp/memvirt-test-key-\(getpid())"
        defer { unlink(path) }
        for (n, ok) in [(8, false), (32, true), (5000, false)] {
            let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
            let b = [UInt8](repeating: 0x41, count: n)
            _ = b.withUnsafeBytes { write(fd, $0.baseAddress, n) }
            close(fd)
            do {
                let k = try MigrationLink.readKey(path: path)
                #expect(ok && k.count == n)
            } catch {
                #expect(!ok && "\(error)".contains("16 to 4096"))
            }
        }
    }
}
