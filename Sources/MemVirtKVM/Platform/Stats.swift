import CKVM
#if canImport(Glibc)
import Glibc
#endif

/// One KVM statistic's descriptor (`struct kvm_stats_desc`).
public struct StatDescriptor: Sendable, Hashable {
    public enum Kind: String, Sendable { case cumulative, instant, peak, linearHistogram, logHistogram, unknown }
    public enum Unit: String, Sendable { case none, bytes, seconds, cycles, boolean, unknown }
    public var name: String
    public var kind: Kind
    public var unit: Unit
    /// The value is `raw * base^exponent` (base 10 or 2).
    public var exponent: Int16
    public var base: Int
    /// Elements (1 for a counter, buckets for a histogram).
    public var size: Int
    var offset: Int
}

/// A reader over a binary stats fd (`KVM_GET_STATS_FD`, api.rst): header, descriptors, data,
/// all read with pread(2). Descriptors are read once; `read()` reads the data block.
public final class StatsReader: @unchecked Sendable {
    let fd: FileDescriptor
    public let descriptors: [StatDescriptor]
    let dataOffset: Int
    let dataSize: Int

    init(fd: FileDescriptor) throws(KVMError) {
        self.fd = fd
        var h = kvm_stats_header()
        guard pread(fd.raw, &h, MemoryLayout<kvm_stats_header>.size, 0) == MemoryLayout<kvm_stats_header>.size else {
            throw KVMError.call("pread(stats header)", lastErrno())
        }
        let descSize = 16 + Int(h.name_size)
        var raw = [UInt8](repeating: 0, count: descSize * Int(h.num_desc))
        let got = raw.withUnsafeMutableBytes { pread(fd.raw, $0.baseAddress, $0.count, off_t(h.desc_offset)) }
        guard got == raw.count else { throw KVMError.call("pread(stats descriptors)", lastErrno()) }
        var ds: [StatDescriptor] = []
        var end = 0
        raw.withUnsafeBytes { b in
            for i in 0..<Int(h.num_desc) {
                let p = b.baseAddress! + i * descSize
                let flags = p.loadUnaligned(as: UInt32.self)
                let exponent = p.loadUnaligned(fromByteOffset: 4, as: Int16.self)
                let size = Int(p.loadUnaligned(fromByteOffset: 6, as: UInt16.self))
                let offset = Int(p.loadUnaligned(fromByteOffset: 8, as: UInt32.self))
                let nameBytes = UnsafeRawBufferPointer(start: p + 16, count: Int(h.name_size))
                let name = String(decoding: nameBytes.prefix { $0 != 0 }, as: UTF8.self)
                let kind: StatDescriptor.Kind = switch flags & 0xf {
                case 0: .cumulative
                case 1: .instant
                case 2: .peak
                case 3: .linearHistogram
                case 4: .logHistogram
                default: .unknown
                }
                let unit: StatDescriptor.Unit = switch (flags >> 4) & 0xf {
                case 0: .none
                case 1: .bytes
                case 2: .seconds
                case 3: .cycles
                case 4: .boolean
                default: .unknown
                }
                let base = (flags >> 8) & 0xf == 1 ? 2 : 10
                ds.append(StatDescriptor(name: name, kind: kind, unit: unit, exponent: exponent, base: base, size: size, offset: offset))
                end = max(end, offset + 8 * size)
            }
        }
        descriptors = ds
        dataOffset = Int(h.data_offset)
        dataSize = end
    }

    /// Every stat's value now (histograms: the sum of their buckets), by name.
    public func read() throws(KVMError) -> StatValues {
        var data = [UInt64](repeating: 0, count: dataSize / 8)
        let got = data.withUnsafeMutableBytes { pread(fd.raw, $0.baseAddress, $0.count, off_t(dataOffset)) }
        guard got == dataSize else { throw KVMError.call("pread(stats data)", lastErrno()) }
        var v: [String: UInt64] = [:]
        for d in descriptors {
            var sum: UInt64 = 0
            for i in 0..<d.size { sum &+= data[d.offset / 8 + i] }
            v[d.name] = sum
        }
        return StatValues(values: v)
    }
}

/// Stat values by name.
public struct StatValues: Sendable {
    public var values: [String: UInt64]
    public init(values: [String: UInt64]) { self.values = values }
    public subscript(_ name: String) -> UInt64 { values[name] ?? 0 }

    /// `self - earlier` for cumulative stats, `self` for the others (instant, peak).
    public func delta(since earlier: StatValues, descriptors: [StatDescriptor]) -> StatValues {
        var out = values
        for d in descriptors where d.kind == .cumulative || d.kind == .linearHistogram || d.kind == .logHistogram {
            out[d.name] = (values[d.name] ?? 0) &- (earlier.values[d.name] ?? 0)
        }
        return StatValues(values: out)
    }

    /// Adds another set (vCPU stats summed over vCPUs).
    public mutating func add(_ other: StatValues) {
        for (k, v) in other.values { values[k, default: 0] &+= v }
    }
}
