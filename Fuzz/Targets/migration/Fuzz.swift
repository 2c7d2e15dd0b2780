// Fuzz target: the migration stream as the destination reads it (MemVirtKVM/Migration), with
// no VM. The input is a list of messages; the harness frames each with a correct header
// (magic, version, length, checksum, sequence: so inputs get past the checksums), pushes it
// through a socket pair into the real `MigrationChannel.receive`, and hands each payload to
// the decoder the destination calls for its type: HELLO -> `MigrationHello.decode` and the
// destination's checks on it (and `Multiboot.config` for a multiboot guest); STATE ->
// the vCPU count, then per vCPU `VCPUState.decode`, then `KernelMigration.decode` under the
// guest kernel. PAGES and DISCARD are parsed inline in `LiveMigration.receive` next to the VM
// (not callable without one): only their framing is fuzzed here.
//
// Input layout, repeated: u16 type | u16 flags | u32 length | length bytes of payload (a
// short last payload takes what is left). flags bit 0: send a wrong checksum; bit 1: a wrong
// sequence number; bit 2: a wrong magic (the refusals must be errors, not traps).
//
// Seeds: `MEMVIRT_FUZZ_SEEDS=DIR fuzz-migration` writes streams made with the real encoders
// (MigrationHello.encoded, VCPUState.encoded, KernelMigration.encode) into DIR and exits.
import CKVM
import MemVirtCore
@testable import MemVirtKVM

#if canImport(Glibc)
import Glibc
#endif

/// Writes to standard error (Swift 6 refuses the C `stderr` global).
func sayError(_ text: String) {
    var t = text
    t.withUTF8 { b in _ = write(2, b.baseAddress, b.count) }
}

@inline(never) func fail(_ what: String) -> Never {
    sayError("fuzz-migration: \(what)\n")
    abort()
}

/// One message of the fuzz input.
struct Message {
    var type: UInt16
    var flags: UInt16
    var payload: [UInt8]
}

func parseInput(_ d: UnsafeRawBufferPointer) -> [Message] {
    var out: [Message] = []
    var at = 0
    while at + 8 <= d.count, out.count < 16 {
        let type = d.loadUnaligned(fromByteOffset: at, as: UInt16.self)
        let flags = d.loadUnaligned(fromByteOffset: at + 2, as: UInt16.self)
        let len = Int(d.loadUnaligned(fromByteOffset: at + 4, as: UInt32.self))
        at += 8
        let n = min(len, d.count - at)
        out.append(Message(type: type, flags: flags, payload: Array(d[at..<(at + n)])))
        at += n
    }
    return out
}

func serialize(_ ms: [Message]) -> [UInt8] {
    var w = ByteWriter()
    for m in ms {
        w.put(m.type); w.put(m.flags); w.put(UInt32(m.payload.count))
        w.bytes.append(contentsOf: m.payload)
    }
    return w.bytes
}

/// What the destination knows after HELLO.
struct Announced {
    var vcpus: Int
    var kernel: Bool
}

func decode(_ type: MigrationMessage, _ payload: UnsafeRawBufferPointer, _ announced: inout Announced?) throws(KVMError) {
    switch type {
    case .hello:
        let hello = try MigrationHello.decode(payload)
        // The destination's own checks, in its order (MigrationDestination.receive).
        guard Int(hello.mode) < MigrationOptions.Mode.allCases.count else { throw KVMError.invalid("mode") }
        guard PageSize.allCases.contains(where: { $0.bytes == hello.pageSize }) else { throw KVMError.invalid("page size") }
        guard hello.vcpus >= 1, hello.vcpus <= UInt32(GuestLayout.maxVCPUs), hello.dataSize <= 1 << 40 else {
            throw KVMError.invalid("vcpus")
        }
        if hello.multiboot != 0 {
            let (memory, overflow) = hello.runtimeSize.addingReportingOverflow(hello.dataSize)
            guard !overflow else { throw KVMError.invalid("multiboot memory overflows") }
            _ = try Multiboot.config(memory: memory)
        }
        announced = Announced(vcpus: Int(hello.vcpus), kernel: hello.kernel & KernelMigration.enabledBit != 0)
    case .state:
        guard let a = announced else { throw KVMError.invalid("STATE before HELLO") }
        var r = ByteReader(payload, what: "STATE")
        _ = try r.get(UInt64.self)
        let n = try r.get(UInt64.self)
        guard n == UInt64(a.vcpus) else { throw KVMError.invalid("vCPU count") }
        for _ in 0..<a.vcpus {
            _ = try r.get(UInt8.self)
            let s = try VCPUState.decode(&r)
            _ = s.encoded()  // what a decoded state re-encodes to must not trap either
        }
        if a.kernel { _ = try KernelMigration.decode(&r, vcpus: a.vcpus) }
    default:
        break
    }
}

nonisolated(unsafe) var sockets: (Int32, Int32) = (-1, -1)

func setUp() {
    var sv: [Int32] = [0, 0]
    guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &sv) == 0 else { fail("socketpair: errno \(errno)") }
    var big: Int32 = 96 << 20
    setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &big, 4)
    setsockopt(sv[1], SOL_SOCKET, SO_RCVBUF, &big, 4)
    sockets = (sv[0], sv[1])
}

func writeAll(_ fd: Int32, _ b: [UInt8]) {
    b.withUnsafeBytes { p in
        var off = 0
        while off < p.count {
            let w = write(fd, p.baseAddress! + off, p.count - off)
            guard w > 0 else { fail("write to the socket pair: errno \(errno)") }
            off += w
        }
    }
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzMigration(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    guard size <= 1 << 20 else { return -1 }
    let messages = parseInput(UnsafeRawBufferPointer(start: data, count: size))
    setUp()
    defer { close(sockets.0) }
    let ch = MigrationChannel(fd: FileDescriptor(sockets.1))  // closes sockets.1
    var announced: Announced? = nil
    for (seq, m) in messages.enumerated() {
        var h = (UInt32(0), UInt16(0), UInt16(0), UInt64(0), UInt64(0), UInt64(0))
        h.0 = m.flags & 4 != 0 ? 0x1234_5678 : MigrationStreamFormat.magic
        h.1 = MigrationStreamFormat.version
        h.2 = m.type
        h.3 = UInt64(m.payload.count)
        h.4 = m.payload.withUnsafeBytes { ckvm_checksum($0.count == 0 ? nil : $0.baseAddress, $0.count) } ^ (m.flags & 1 != 0 ? 1 : 0)
        h.5 = UInt64(seq) &+ (m.flags & 2 != 0 ? 1 : 0)
        writeAll(sockets.0, withUnsafeBytes(of: &h) { Array($0) } + m.payload)
        do throws(KVMError) {
            let (type, payload) = try ch.receive()
            guard seq > 0 || type == .hello else { return 0 }  // the destination refuses anything but HELLO first
            try decode(type, payload, &announced)
        } catch {
            guard !error.description.isEmpty else { fail("an empty error") }
            return 0
        }
    }
    return 0
}

// MARK: seeds

func seeds() -> [(String, [Message])] {
    var state = VCPUState()
    state.regs.rip = 0x40_0000; state.regs.rsp = 0x7f_f000; state.regs.rflags = 2
    state.xsave = [UInt8](repeating: 0, count: 4096)
    state.xcrs = kvm_xcrs()
    state.msrs = [(0x10, 123_456_789), (0xC000_0080, 0x500)]
    state.tscKHz = 2_400_000
    func hello(vcpus: UInt32, mode: UInt8, multiboot: UInt8 = 0, kernel: UInt8 = 0) -> [UInt8] {
        MigrationHello(dataSize: 64 << 20, vcpus: vcpus, tableBytesPerVCPU: 8192, runtimeSize: 2 << 20, mode: mode,
                       pageSize: 4096, multiboot: multiboot, multibootMailbox: multiboot != 0 ? 0x9000 : 0, kernel: kernel).encoded()
    }
    func stateMessage(vcpus: Int, kernel: Bool) -> [UInt8] {
        var w = ByteWriter()
        w.put(UInt64(1_700_000_000_000_000_000)); w.put(UInt64(vcpus))
        for i in 0..<vcpus { w.put(UInt8(i == 1 ? 1 : 0)); w.bytes += state.encoded() }
        if kernel {
            var regs = kvm_regs(); regs.rip = 0x1000
            let st = VCPUSchedulerState(ids: [0, 1], regs: [regs, regs], threads: [.runnable, .parked(token: 7)], runQueue: [0], current: 1)
            KernelMigration.encode([VCPUSchedulerState](repeating: st, count: vcpus), into: &w)
        }
        return w.bytes
    }
    func pages() -> [UInt8] {
        var w = ByteWriter()
        w.put(UInt32(3))
        w.put(UInt64(0)); w.put(UInt8(1))
        w.put(UInt64(5)); w.put(UInt8(0))
        w.put(UInt64(16384)); w.put(UInt8(1))
        w.bytes += [UInt8](repeating: 0xA5, count: 4096) + [UInt8](repeating: 0x3C, count: 4096)
        return w.bytes
    }
    func discard() -> [UInt8] { var w = ByteWriter(); w.put(UInt64(2)); w.put(UInt64(0)); w.put(UInt64(7)); return w.bytes }
    let t = { (m: MigrationMessage) in m.rawValue }
    return [
        ("precopy", [Message(type: t(.hello), flags: 0, payload: hello(vcpus: 2, mode: 0)),
                     Message(type: t(.pages), flags: 0, payload: pages()),
                     Message(type: t(.sync), flags: 0, payload: []),
                     Message(type: t(.state), flags: 0, payload: stateMessage(vcpus: 2, kernel: false)),
                     Message(type: t(.end), flags: 0, payload: [])]),
        ("postcopy-kernel", [Message(type: t(.hello), flags: 0, payload: hello(vcpus: 1, mode: 1, kernel: 3)),
                             Message(type: t(.state), flags: 0, payload: stateMessage(vcpus: 1, kernel: true)),
                             Message(type: t(.pages), flags: 0, payload: pages()),
                             Message(type: t(.end), flags: 0, payload: [])]),
        ("hybrid-discard", [Message(type: t(.hello), flags: 0, payload: hello(vcpus: 1, mode: 2)),
                            Message(type: t(.pages), flags: 0, payload: pages()),
                            Message(type: t(.discard), flags: 0, payload: discard()),
                            Message(type: t(.state), flags: 0, payload: stateMessage(vcpus: 1, kernel: false))]),
        ("multiboot", [Message(type: t(.hello), flags: 0, payload: hello(vcpus: 1, mode: 0, multiboot: 1)),
                       Message(type: t(.state), flags: 0, payload: stateMessage(vcpus: 1, kernel: false))]),
        ("bad-checksum", [Message(type: t(.hello), flags: 1, payload: hello(vcpus: 1, mode: 0))]),
    ]
}

@_cdecl("LLVMFuzzerInitialize")
public func fuzzInitialize(_ argc: UnsafeMutablePointer<Int32>, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>) -> CInt {
    guard let dir = getenv("MEMVIRT_FUZZ_SEEDS").map({ String(cString: $0) }) else { return 0 }
    for (name, ms) in seeds() {
        let bytes = serialize(ms)
        guard let f = fopen("\(dir)/\(name)", "wb") else { fail("cannot write \(dir)/\(name)") }
        _ = bytes.withUnsafeBytes { fwrite($0.baseAddress, 1, $0.count, f) }
        fclose(f)
    }
    print("fuzz-migration: wrote \(seeds().count) seeds to \(dir)")
    exit(0)
}
