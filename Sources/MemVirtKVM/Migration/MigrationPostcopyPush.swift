import CKVM
import MemVirtCore
import MemVirtGuest
#if canImport(Glibc)
import Glibc
#endif

extension SourceSide {
    /// Post-copy: serve the destination's requests first, push the rest in the order of
    /// `missing` between them (prepared post-copy: the stale runtime pages, then the data).
    /// Indices: data pages, then the runtime's at `dataPages + p`.
    mutating func postcopyPush(_ ch: MigrationChannel, missing: [Int]) throws(KVMError) {
        let requests = RequestQueue()
        let rtt = options.requestRoundTripNanos
        let all = dataPages + runtimePages
        let reader = try DedicatedThread.start(name: "memvirt-migrate-requests") {
            while true {
                do {
                    let (type, payload) = try ch.receive()
                    switch type {
                    case .request:
                        var r = ByteReader(payload, what: "REQUEST")
                        var pages: [Int] = []
                        // Indices beyond the guest are dropped before conversion (never a trap).
                        while r.remaining >= 8 {
                            let p = try r.get(UInt64.self)
                            if p < UInt64(all) { pages.append(Int(p)) }
                        }
                        requests.push(pages, due: monotonicNanoseconds() + rtt)
                    case .resumed: requests.markResumed()
                    case .alive: continue
                    case .result:
                        requests.finish(result: Array(payload))
                        return
                    default:
                        requests.fail(KVMError.invalid("migration stream: unexpected \(type) from the destination"))
                        return
                    }
                } catch let e as KVMError {
                    requests.fail(e)
                    return
                } catch {
                    requests.fail(.invalid("\(error)"))
                    return
                }
            }
        }
        // Any failure here ends the connection so the reader thread returns, and is joined.
        do throws(KVMError) {
            var toSend = [Bool](repeating: false, count: all)
            for p in missing { toSend[p] = true }
            func count(_ p: Int, requested: Bool) {
                if p >= dataPages { report.runtimePagesAfterStop += 1 } else if requested { report.pagesRequested += 1 } else { report.pagesPushed += 1 }
            }
            var cursor = 0
            var left = missing.count
            while left > 0 {
                if let e = requests.failure { throw e }
                if requests.resumed { destinationOwnsGuest = true }
                var asked = requests.drain(dueBy: monotonicNanoseconds())
                if !asked.isEmpty {
                    asked.removeAll { $0 < 0 || $0 >= all || !toSend[$0] }
                    for p in asked { toSend[p] = false; left -= 1; count(p, requested: true); try sendPage(ch, p) }
                    try flush(ch)
                    continue
                }
                if cursor >= missing.count {
                    // Defensive: the push covers every page still to send, so `left` is 0 by the
                    // time the cursor is at the end; never spin without sleeping.
                    usleepNanos(20_000)
                    continue
                }
                var k = 0
                while cursor < missing.count && k < 64 {
                    let p = missing[cursor]
                    if toSend[p] { toSend[p] = false; left -= 1; count(p, requested: false); try sendPage(ch, p); k += 1 }
                    cursor += 1
                }
                try flush(ch)
            }
            try ch.send(.end)
            completedAt = monotonicNanoseconds()
            try sendVerify(ch)
        } catch {
            ch.shutdownBoth()
            reader.join()
            if requests.resumed { destinationOwnsGuest = true }
            throw error
        }
        reader.join()
        if let e = requests.failure { throw e }
        destinationOwnsGuest = true
        if let r = requests.result {
            let p = UnsafeMutableRawPointer.allocate(byteCount: max(1, r.count), alignment: 8)
            defer { p.deallocate() }
            r.withUnsafeBytes { if let b = $0.baseAddress { p.copyMemory(from: b, byteCount: $0.count) } }
            try readResult(UnsafeRawBufferPointer(start: p, count: r.count))
        } else {
            throw KVMError.invalid("migration stream: the destination closed without its RESULT")
        }
        report.bytesSent = ch.bytesSent
        report.bytesReceived = ch.bytesReceived
    }
}

/// Requests from the destination, handed from the reader thread to the pusher.
final class RequestQueue: @unchecked Sendable {
    var lock = pthread_mutex_t()
    var pages: [(page: Int, due: UInt64)] = []
    var _failure: KVMError?
    var _result: [UInt8]?
    var _resumed = false
    init() { pthread_mutex_init(&lock, nil) }
    var failure: KVMError? { pthread_mutex_lock(&lock); defer { pthread_mutex_unlock(&lock) }; return _failure }
    var result: [UInt8]? { pthread_mutex_lock(&lock); defer { pthread_mutex_unlock(&lock) }; return _result }
    var resumed: Bool { pthread_mutex_lock(&lock); defer { pthread_mutex_unlock(&lock) }; return _resumed }
    deinit { pthread_mutex_destroy(&lock) }
    func push(_ p: [Int], due: UInt64) { pthread_mutex_lock(&lock); pages += p.map { ($0, due) }; pthread_mutex_unlock(&lock) }
    /// The requests due by `now` (arrival order; later ones stay queued).
    func drain(dueBy now: UInt64) -> [Int] {
        pthread_mutex_lock(&lock)
        defer { pthread_mutex_unlock(&lock) }
        let n = pages.firstIndex { $0.due > now } ?? pages.count
        let p = pages[..<n].map(\.page)
        pages.removeFirst(n)
        return p
    }
    func fail(_ e: KVMError) { pthread_mutex_lock(&lock); _failure = _failure ?? e; pthread_mutex_unlock(&lock) }
    func finish(result r: [UInt8]) { pthread_mutex_lock(&lock); _result = r; pthread_mutex_unlock(&lock) }
    func markResumed() { pthread_mutex_lock(&lock); _resumed = true; pthread_mutex_unlock(&lock) }
}
