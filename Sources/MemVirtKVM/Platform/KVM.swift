import CKVM
#if canImport(Glibc)
import Glibc
#endif

/// The platform under /dev/kvm.
public enum KVMPlatform: String, Sendable {
    /// Intel VT-x (kvm_intel), EPT when `nestedPaging`.
    case vmx
    /// AMD-V (kvm_amd), NPT when `nestedPaging`.
    case svm
    /// kvm_pvm: shadow paging without hardware virtualization; CPL0 guest code is emulated.
    case pvm
    case unknown

    /// Detected from the loaded modules (/sys/module/kvm_{pvm,intel,amd}).
    public static func detect() -> KVMPlatform {
        func exists(_ p: String) -> Bool { access(p, F_OK) == 0 }
        if exists("/sys/module/kvm_pvm") { return .pvm }
        if exists("/sys/module/kvm_intel") { return .vmx }
        if exists("/sys/module/kvm_amd") { return .svm }
        return .unknown
    }

    /// True when the MMU uses EPT/NPT (two-dimensional), false for shadow paging.
    public var nestedPaging: Bool {
        func yes(_ p: String) -> Bool {
            guard let f = fopen(p, "r") else { return false }
            defer { fclose(f) }
            let c = fgetc(f)
            return c == Int32(UInt8(ascii: "Y")) || c == Int32(UInt8(ascii: "1"))
        }
        switch self {
        case .vmx: return yes("/sys/module/kvm_intel/parameters/ept")
        case .svm: return yes("/sys/module/kvm_amd/parameters/npt")
        default: return false
        }
    }

    /// "shadow" or "nested": the paging mode name the model uses.
    public var pagingMode: String { nestedPaging ? "nested" : "shadow" }
}

/// A KVM capability (KVM_CHECK_EXTENSION). The C names are `KVM_CAP_*`.
public struct KVMCapability: Hashable, Sendable {
    public var rawValue: Int32
    public var name: String
    public static let userMemory = KVMCapability(rawValue: 3, name: "USER_MEMORY")
    public static let setTSSAddress = KVMCapability(rawValue: 4, name: "SET_TSS_ADDR")
    public static let irqchip = KVMCapability(rawValue: 0, name: "IRQCHIP")
    public static let asyncPF = KVMCapability(rawValue: 59, name: "ASYNC_PF")
    public static let readonlyMemory = KVMCapability(rawValue: 81, name: "READONLY_MEM")
    public static let manualDirtyLogProtect2 = KVMCapability(rawValue: 168, name: "MANUAL_DIRTY_LOG_PROTECT2")
    public static let dirtyLogRing = KVMCapability(rawValue: 192, name: "DIRTY_LOG_RING")
    public static let binaryStatsFD = KVMCapability(rawValue: 203, name: "BINARY_STATS_FD")
    public static let asyncPFInt = KVMCapability(rawValue: 183, name: "ASYNC_PF_INT")
    public static let exitHypercall = KVMCapability(rawValue: 201, name: "EXIT_HYPERCALL")
    public static let userSpaceMSR = KVMCapability(rawValue: 188, name: "X86_USER_SPACE_MSR")
    public static let nestedState = KVMCapability(rawValue: 157, name: "NESTED_STATE")
    public static let xsave = KVMCapability(rawValue: 55, name: "XSAVE")
    public static let xcrs = KVMCapability(rawValue: 56, name: "XCRS")
    public static let vcpuEvents = KVMCapability(rawValue: 41, name: "VCPU_EVENTS")
    public static let debugRegs = KVMCapability(rawValue: 50, name: "DEBUGREGS")
    public static let tscControl = KVMCapability(rawValue: 60, name: "TSC_CONTROL")
    public static let getTSCKHz = KVMCapability(rawValue: 61, name: "GET_TSC_KHZ")
    public static let maxVCPUs = KVMCapability(rawValue: 66, name: "MAX_VCPUS")
    public static let nrMemslots = KVMCapability(rawValue: 10, name: "NR_MEMSLOTS")
    public static let xsave2 = KVMCapability(rawValue: 208, name: "XSAVE2")
    public static let haltPoll = KVMCapability(rawValue: 182, name: "HALT_POLL")

    /// The capabilities `kvm probe` reports.
    public static let reported: [KVMCapability] = [
        .userMemory, .setTSSAddress, .irqchip, .asyncPF, .asyncPFInt, .readonlyMemory, .manualDirtyLogProtect2,
        .dirtyLogRing, .binaryStatsFD, .exitHypercall, .userSpaceMSR, .nestedState, .xsave, .xsave2, .xcrs,
        .vcpuEvents, .debugRegs, .tscControl, .getTSCKHz, .maxVCPUs, .nrMemslots,
    ]
}

/// The KVM system handle: an open /dev/kvm (`KVM_GET_API_VERSION`, `KVM_CHECK_EXTENSION`).
public final class KVM: @unchecked Sendable {
    let fd: FileDescriptor
    public let apiVersion: Int
    /// Bytes of each vCPU's shared `struct kvm_run` mapping (`KVM_GET_VCPU_MMAP_SIZE`).
    public let vcpuMmapSize: Int
    public let platform: KVMPlatform

    public init(path: String = "/dev/kvm") throws(KVMError) {
        if access(path, F_OK) != 0 { throw KVMError.unavailable("\(path) does not exist") }
        let fd: FileDescriptor
        do { fd = try FileDescriptor.open(path, O_RDWR) } catch {
            throw KVMError.unavailable("cannot open \(path) read-write (\(error)); it is usually 0600 root or group kvm")
        }
        self.fd = fd
        apiVersion = Int(try checked(ckvm_get_api_version(fd.raw), "KVM_GET_API_VERSION"))
        if apiVersion != 12 { throw KVMError.unavailable("KVM API version \(apiVersion), expected 12") }
        vcpuMmapSize = Int(try checked(ckvm_get_vcpu_mmap_size(fd.raw), "KVM_GET_VCPU_MMAP_SIZE"))
        platform = .detect()
    }

    /// Why KVM cannot run VMs here, or nil when it can (root or kvm group, userfaultfd allowed).
    public static let unavailableReason: String? = {
        do {
            let k = try KVM()
            _ = try VirtualMachine(kvm: k)
            let u = ckvm_userfaultfd(O_CLOEXEC | O_NONBLOCK)
            if u < 0 { return "userfaultfd(2) refused: \(Errno(rawValue: -u)) (needs root or vm.unprivileged_userfaultfd=1)" }
            close(u)
            return nil
        } catch {
            return "\(error)"
        }
    }()

    /// True when /dev/kvm can create VMs and userfaultfd works (tests use it to skip).
    public static var isUsable: Bool { unavailableReason == nil }

    /// `KVM_CHECK_EXTENSION`: 0 when absent, else a positive value (often a size or count).
    public func check(_ cap: KVMCapability) -> Int {
        let r = ckvm_check_extension(fd.raw, Int(cap.rawValue))
        return r < 0 ? 0 : Int(r)
    }

    /// `KVM_GET_SUPPORTED_CPUID`, as a buffer ready for `KVM_SET_CPUID2`.
    func supportedCPUID() throws(KVMError) -> CPUIDBuffer {
        var n = 64
        while true {
            let buf = CPUIDBuffer(entries: n)
            let r = buf.withPointer { ckvm_get_supported_cpuid(fd.raw, $0) }
            if r == -E2BIG && n < 4096 { n *= 2; continue }
            _ = try checked(r, "KVM_GET_SUPPORTED_CPUID")
            return buf
        }
    }

    /// `KVM_GET_MSR_INDEX_LIST`: the MSRs KVM saves and restores.
    func msrIndexList() throws(KVMError) -> [UInt32] {
        var n = 256
        while true {
            let raw = UnsafeMutableRawPointer.allocate(byteCount: 4 + 4 * n, alignment: 8)
            defer { raw.deallocate() }
            let list = raw.bindMemory(to: kvm_msr_list.self, capacity: 1)
            list.pointee.nmsrs = UInt32(n)
            let r = ckvm_get_msr_index_list(fd.raw, list)
            if r == -E2BIG && n < 8192 { n *= 2; continue }
            _ = try checked(r, "KVM_GET_MSR_INDEX_LIST")
            let count = Int(list.pointee.nmsrs)
            let idx = (raw + 4).bindMemory(to: UInt32.self, capacity: count)
            return (0..<count).map { idx[$0] }
        }
    }
}

/// A `struct kvm_cpuid2` with room for `entries` entries (flexible array).
final class CPUIDBuffer: @unchecked Sendable {
    let raw: UnsafeMutableRawPointer
    init(entries: Int) {
        let size = MemoryLayout<kvm_cpuid2>.size + entries * MemoryLayout<kvm_cpuid_entry2>.stride
        raw = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 8)
        raw.initializeMemory(as: UInt8.self, repeating: 0, count: size)
        raw.assumingMemoryBound(to: kvm_cpuid2.self).pointee.nent = UInt32(entries)
    }
    deinit { raw.deallocate() }
    func withPointer<R>(_ body: (UnsafeMutablePointer<kvm_cpuid2>) -> R) -> R {
        body(raw.assumingMemoryBound(to: kvm_cpuid2.self))
    }
}
