import CKVM
import MemVirtCore
import MemVirtGuest
import Testing
#if canImport(Glibc)
import Glibc
#endif
@testable import MemVirtKVM

/// Migrations here run both sides in this process: LiveMigration.loopback.
@Suite("KVM engine: live migration", .serialized, .enabled(if: KVM.isUsable, Comment(rawValue: kvmReason)))
struct KVMMigrationTests {
    static let spec = WorkloadSpec(pattern: .uniform, footprint: .mib(16), accesses: 12_000_000, writeRatio: 0.3, seed: 21)

    @Test("migration reaches the oracle's result with equal switch-over hashes",
          arguments: [("precopy", 1), ("precopy", 8), ("postcopy", 1), ("hybrid", 1), ("hybrid", 16)])
    func migrate(mode: String, group: Int) throws {
        var o = MigrationOptions()
        o.mode = MigrationOptions.Mode(rawValue: mode)!
        o.groupPages = group
        o.afterNanos = 150_000_000
        let (s, dst) = try LiveMigration.loopback(Self.spec, options: o)
        print("\(mode)/\(group): \(s.json.rendered())")
        #expect(s.migrated && s.error == nil)
        #expect(s.sourceHash != nil && s.sourceHash == s.destinationHash)
        #expect(dst.destinationHash == s.sourceHash)
        let want = try oracle(Self.spec)
        #expect(s.guest.first?.readSum == want.readSum)
        #expect(s.guest.first?.memoryChecksum == want.checksum)
        #expect(s.bytesSent > 0)
    }

    /// A paced writer that keeps running through the migration: pre-copy must iterate (rounds
    /// with dirty pages), post-copy must serve guest faults on the destination (requests).
    static let running = WorkloadSpec(pattern: .uniform, footprint: .mib(32), accesses: 36_000, writeRatio: 0.6, seed: 5)

    @Test("under a running guest: pre-copy iterates over dirty pages, post-copy serves page requests",
          arguments: ["precopy", "postcopy", "hybrid"])
    func runningGuest(mode: String) throws {
        var o = MigrationOptions()
        o.mode = MigrationOptions.Mode(rawValue: mode)!
        o.afterNanos = 300_000_000
        o.accessesPerSecond = 20_000
        o.downtimeTargetNanos = 200_000  // iterate: the first rounds' dirt never fits in 0.2 ms
        o.maxRounds = 4
        // Post-copy over a 32 MiB/s link: the push takes long enough for the guest to fault
        // on pages not pushed yet (unlimited loopback outruns it).
        if o.mode == .postcopy { o.bandwidth = 32 << 20 }
        let (s, dst) = try LiveMigration.loopback(Self.running, options: o)
        print("running \(mode): \(s.json.rendered())")
        #expect(s.migrated && s.error == nil)
        #expect(s.sourceHash != nil && s.sourceHash == s.destinationHash)
        let want = try oracle(Self.running)
        #expect(s.guest.first?.readSum == want.readSum)
        #expect(s.guest.first?.memoryChecksum == want.checksum)
        switch o.mode {
        case .precopy:
            #expect(s.rounds > 1)
            #expect(s.dirtyPerRound.count > 2 && s.dirtyPerRound[1] > 0)
        case .postcopy:
            // Whether the guest faults on a page before the push reaches it depends on the
            // host's scheduling (flaky under load as `> 0`): the mechanism is asserted in
            // PreparedPostcopyTests.faultBecomesRequest; here the accounting. A page the
            // source sent as asked was asked by the destination; every page went once.
            #expect(s.pagesRequested <= dst.pagesRequested)
            #expect(s.pagesRequested + s.pagesPushed == UInt64(Self.running.footprint.rawValue / 4096))
        case .hybrid:
            // One pre-copy round after the full copy; the pages the guest dirties while it runs
            // must show up in some later harvest (the final one, taken a fraction of a
            // millisecond after the stop, may well be empty).
            #expect(s.rounds == 2)
            #expect(s.dirtyPerRound.dropFirst().reduce(0, +) > 0)
        }
        // The guest was still running at the switch, and saw it as a gap of its own.
        #expect(s.guest.first?.accesses == Self.running.accesses)
        #expect(s.downtimeNanos != nil)
    }

    /// Under the guest kernel: the workload thread and a counting thread per vCPU.
    static let threaded = WorkloadSpec(pattern: .uniform, footprint: .mib(16), accesses: 400_000, writeRatio: 0.4, seed: 11)

    @Test("under the guest kernel, the schedulers migrate: the workload reaches the oracle's result on the destination; with async PF, post-copy faults there park the workload thread while the counting thread runs",
          arguments: [("precopy", false), ("postcopy", false), ("postcopy", true)])
    func guestKernel(mode: String, asyncPF: Bool) throws {
        var o = MigrationOptions()
        o.mode = MigrationOptions.Mode(rawValue: mode)!
        o.afterNanos = 150_000_000
        o.accessesPerSecond = 1_000_000
        o.guestKernel = true
        o.asyncPF = asyncPF
        // Post-copy over a 16 MiB/s link: the destination touches pages that are not there yet.
        if o.mode == .postcopy { o.bandwidth = 16 << 20 }
        let (s, dst) = try LiveMigration.loopback(Self.threaded, options: o)
        print("guest kernel \(mode) apf=\(asyncPF): \(s.json.rendered())")
        #expect(s.migrated && s.error == nil)
        #expect(s.sourceHash != nil && s.sourceHash == s.destinationHash)
        let want = try oracle(Self.threaded)
        #expect(s.guest.first?.readSum == want.readSum)
        #expect(s.guest.first?.memoryChecksum == want.checksum)
        #expect(s.guest.first?.accesses == Self.threaded.accesses)
        let src = try #require(s.guestKernel), k = try #require(dst.guestKernel)
        #expect(s.destinationGuestKernel?.counterIncrements == k.counterIncrements)
        // The counting thread ran on both sides.
        #expect(src.counterIncrements > 0 && k.counterIncrements > 0)
        if asyncPF {
            // Enabling async PF there sends "page ready" to all; post-copy faults went async.
            #expect(k.apfWakeAll >= 1)
            #expect(k.apfNotPresent > 0 && k.apfReady >= k.apfNotPresent)
        } else {
            #expect(k.apfNotPresent == 0)
        }
    }

    @Test("under the guest kernel, a workload that finished before the switch migrates; the destination ends at once", arguments: ["precopy", "postcopy"])
    func guestKernelFinished(mode: String) throws {
        // 500 accesses take ~20 ms here (about 40 us per shadow fault): done well before the
        // switch at 300 ms even on a loaded host. (2,000 accesses did not always finish by
        // 100 ms under load: the destination then fixed ~250 faults finishing them.)
        let small = WorkloadSpec(pattern: .uniform, footprint: .mib(4), accesses: 500, writeRatio: 0.5, seed: 12)
        var o = MigrationOptions()
        o.mode = MigrationOptions.Mode(rawValue: mode)!
        o.afterNanos = 300_000_000
        o.guestKernel = true
        let t0 = monotonicNanoseconds()
        let (s, dst) = try LiveMigration.loopback(small, options: o)
        #expect(monotonicNanoseconds() - t0 < 30_000_000_000)
        #expect(s.migrated && s.sourceHash == s.destinationHash)
        let want = try oracle(small)
        #expect(s.guest.first?.readSum == want.readSum)
        #expect(s.guest.first?.memoryChecksum == want.checksum)
        // The destination ends at once: it runs no guest access at all. Counted, not timed:
        // any access it ran (the workload's, or its runtime's own code and stack in a fresh
        // VM whose shadow tables are empty) would fix a shadow fault.
        let pfFixed = try #require(dst.destinationPfFixed)
        #expect(pfFixed == 0, "destination pf_fixed \(pfFixed): the destination ran guest accesses")
    }

    @Test("a connection cut during pre-copy: the source keeps running and reaches the oracle's result")
    func cutConnection() throws {
        let (listener, port) = try MigrationChannel.listen(address: "127.0.0.1", port: 0)
        let t = try DedicatedThread.start(name: "test-cutter") {
            guard let ch = try? MigrationChannel.accept(listener) else { return }
            _ = try? ch.receive()  // HELLO
            _ = try? ch.receive()  // a first batch of pages
            ch.shutdownBoth()
        }
        var o = MigrationOptions()
        o.afterNanos = 100_000_000
        let r = try LiveMigration.migrate(Self.spec, to: "127.0.0.1", port: port, options: o)
        t.join()
        print("cut: \(r.json.rendered())")
        #expect(!r.migrated)
        #expect(r.error != nil)
        let want = try oracle(Self.spec)
        #expect(r.guest.first?.readSum == want.readSum)
        #expect(r.guest.first?.memoryChecksum == want.checksum)
    }

    @Test("a corrupt, truncated or mismatched stream is refused with a clear error", arguments: ["checksum", "version", "truncated"])
    func corrupt(kind: String) throws {
        let (listener, port) = try MigrationChannel.listen(address: "127.0.0.1", port: 0)
        let box = ResultBox<MigrationReport>()
        let t = try DedicatedThread.start(name: "test-destination") {
            do { box.value = .success(try LiveMigration.receive(try MigrationChannel.accept(listener))) } catch let e as KVMError { box.value = .failure(e) } catch {}
        }
        let ch = try MigrationChannel.connect(host: "127.0.0.1", port: port)
        // A valid header, then damage.
        var w = ByteWriter()
        w.put(MigrationStreamFormat.magic)
        w.put(kind == "version" ? UInt16(9) : MigrationStreamFormat.version)
        w.put(MigrationMessage.hello.rawValue)
        let payload = MigrationHello(dataSize: 1 << 20, vcpus: 1, tableBytesPerVCPU: 0, runtimeSize: 2 << 20, mode: 0, pageSize: 4096).encoded()
        w.put(UInt64(payload.count))
        w.put(payload.withUnsafeBytes { ckvm_checksum($0.baseAddress, $0.count) } ^ (kind == "checksum" ? 1 : 0))
        w.put(UInt64(0))
        w.bytes += kind == "truncated" ? Array(payload.prefix(5)) : payload
        let fd = ch.fd.raw
        let sent = w.bytes.withUnsafeBytes { b in Glibc.send(fd, b.baseAddress, b.count, Int32(MSG_NOSIGNAL)) }
        #expect(sent == w.bytes.count)
        if kind == "truncated" { ch.shutdownBoth() }
        t.join()
        guard case .failure(let e)? = box.value else { Issue.record("the stream was accepted"); return }
        print("\(kind): \(e)")
        switch kind {
        case "checksum": #expect("\(e)".contains("checksum mismatch"))
        case "version": #expect("\(e)".contains("version 9"))
        default: #expect("\(e)".contains("truncated"))
        }
    }
}
