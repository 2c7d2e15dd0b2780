import CKVM
import MemVirtCore
import MemVirtGuest
#if canImport(Glibc)
import Glibc
#endif

/// The VM configuration both sides build from (sent in HELLO; the destination must arrive at
/// the same runtime layout, or the stream is refused as mismatched).
struct MigrationHello {
    var dataSize: UInt64
    var vcpus: UInt32
    var tableBytesPerVCPU: UInt64
    var runtimeSize: UInt64
    var mode: UInt8
    var pageSize: UInt64
    /// A multiboot guest (Multiboot.swift): 1, and its announced mailbox (0: none). Older
    /// streams end before these fields: a runtime guest.
    var multiboot: UInt8 = 0
    var multibootMailbox: UInt64 = 0
    /// KernelMigration.enabledBit | asyncPFBit (0: commands on the vCPUs, no guest kernel).
    var kernel: UInt8 = 0

    func encoded() -> [UInt8] {
        var w = ByteWriter()
        w.put(dataSize); w.put(vcpus); w.put(tableBytesPerVCPU); w.put(runtimeSize); w.put(mode); w.put(pageSize)
        w.put(multiboot); w.put(multibootMailbox)
        w.put(kernel)
        return w.bytes
    }
    static func decode(_ b: UnsafeRawBufferPointer) throws(KVMError) -> MigrationHello {
        var r = ByteReader(b, what: "HELLO")
        var h = MigrationHello(dataSize: try r.get(), vcpus: try r.get(), tableBytesPerVCPU: try r.get(), runtimeSize: try r.get(),
                               mode: try r.get(), pageSize: try r.get())
        if r.remaining >= 9 { h.multiboot = try r.get(); h.multibootMailbox = try r.get() }
        if r.remaining >= 1 { h.kernel = try r.get() }
        return h
    }
}

/// Page records in a PAGES message: u32 count, then (u64 index, u8 kind) each, then the
/// 4 KiB pages of kind 1 in order. Index < data pages: the data slot; above: the runtime.
struct PageBatch {
    static let maxPages = 256
    /// count (u32), table (u64 index + u8 kind each), pages: laid out at flush.
    let message: UnsafeMutableRawPointer = .allocate(byteCount: 4 + 9 * maxPages + maxPages * 4096, alignment: 4096)
    let data: UnsafeMutableRawPointer = .allocate(byteCount: maxPages * 4096, alignment: 4096)
    var count = 0
    var dataPages = 0

    mutating func reset() { count = 0; dataPages = 0 }
    /// A page known to be zero (never touched: not resident), without reading it.
    mutating func addZero(index: UInt64) {
        (message + 4 + 9 * count).storeBytes(of: index, as: UInt64.self)
        (message + 4 + 9 * count + 8).storeBytes(of: UInt8(0), as: UInt8.self)
        count += 1
    }
    mutating func add(index: UInt64, page: UnsafeRawPointer) -> Bool {
        let zero = ckvm_page_is_zero(page) != 0
        (message + 4 + 9 * count).storeBytes(of: index, as: UInt64.self)
        (message + 4 + 9 * count + 8).storeBytes(of: UInt8(zero ? 0 : 1), as: UInt8.self)
        if !zero {
            memcpy(data + dataPages * 4096, page, 4096)
            dataPages += 1
        }
        count += 1
        return zero
    }
    /// The payload: count, table, pages (valid until the next add).
    func payload() -> UnsafeRawBufferPointer {
        message.storeBytes(of: UInt32(count), as: UInt32.self)
        memcpy(message + 4 + 9 * count, data, dataPages * 4096)
        return UnsafeRawBufferPointer(start: message, count: 4 + 9 * count + dataPages * 4096)
    }
}
