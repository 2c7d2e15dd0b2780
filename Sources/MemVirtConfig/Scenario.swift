import Foundation
import MemVirtCore
import MemVirtModel

/// A scenario file (`memvirt run --config FILE`), read and decoded once, strictly: an unknown
/// section or key, a wrong type or an out-of-range value is a `ConfigError` naming the file,
/// the line and what is allowed. Every field is optional; command-line flags override them.
///
///     [workload]
///     pattern = "zipf:0.99"     # uniform|sequential|strided[:STRIDE]|zipf[:THETA]|chase|gups|lackey:PATH
///     footprint = "64MiB"
///     accesses = "2M"
///     write_ratio = 0.3
///     seed = 1
///     threads = 1
///     compute_per_access = 0
///
///     [platform]
///     paging = "native"         # native|shadow|nested
///     page_size = "4K"
///     profile = "vmx-ept"       # a built-in profile or a profile file (relative to this file)
public struct Scenario: Sendable {
    public var file: String

    // [workload]
    public var pattern: WorkloadSpec.Pattern?
    public var footprint: ByteCount?
    public var accesses: UInt64?
    public var writeRatio: Double?
    public var seed: UInt64?
    public var threads: Int?
    public var computePerAccess: UInt64?

    // [platform]
    public var paging: PagingKind?
    public var pageSize: PageSize?
    public var levels: Int?
    public var hostPageSize: PageSize?
    public var hostLevels: Int?
    public var hostLimit: ByteCount?
    public var swapDevice: String?
    public var shadowMaxPages: Int?
    /// `profile = "NAME|FILE"` (or the older `costs = "NAME"`, a built-in name).
    public var profile: String?
    /// The line of each key given, "section.key" -> line (for errors found later).
    public var lines: [String: Int] = [:]

    public static let workloadKeys = ["pattern", "footprint", "accesses", "write_ratio", "seed", "threads", "compute_per_access"]
    public static let platformKeys = ["paging", "page_size", "levels", "host_page_size", "host_levels", "host_limit", "swap_device",
                                      "shadow_max_pages", "profile", "costs"]

    public init(file: String) { self.file = file }

    /// Reads and decodes `path`.
    public static func load(_ path: String) throws(ConfigError) -> Scenario {
        try decode(TOMLParser.parse(contentsOf: path), file: path)
    }

    public static func decode(_ text: String, file: String) throws(ConfigError) -> Scenario {
        try decode(TOMLParser.parse(text, file: file), file: file)
    }

    public static func decode(_ root: TOMLTableNode, file: String) throws(ConfigError) -> Scenario {
        let doc = ConfigTable(root: root, file: file)
        try doc.check(allowed: ["workload", "platform"])
        var s = Scenario(file: file)
        /// Runs a parser of the value's text, turning its InputError into a located error.
        func parsed<T>(_ t: ConfigTable, _ key: String, _ f: (String) throws(InputError) -> T) throws(ConfigError) -> T? {
            guard let text = try t.text(key) else { return nil }
            s.lines[t.path + "." + key] = t.node[key]!.line
            do { return try f(text) } catch { throw t.error(key, "\(key): \(error.message)") }
        }
        if let w = try doc.table("workload") {
            try w.check(allowed: workloadKeys)
            s.pattern = try parsed(w, "pattern") { v throws(InputError) in try WorkloadSpec.Pattern(parsing: v) }
            s.footprint = try parsed(w, "footprint") { v throws(InputError) in try ByteCount(parsing: v) }
            s.accesses = try parsed(w, "accesses") { v throws(InputError) in try parseCount(v) }
            s.writeRatio = try w.double("write_ratio", range: 0...1)
            s.seed = try w.int("seed", range: 0...Int64.max).map { UInt64($0) }
            s.threads = try w.int("threads", range: 1...1024).map { Int($0) }
            s.computePerAccess = try parsed(w, "compute_per_access") { v throws(InputError) in try parseCount(v) }
            for k in ["write_ratio", "seed", "threads"] where w.has(k) { s.lines["workload." + k] = w.node[k]!.line }
        }
        if let p = try doc.table("platform") {
            try p.check(allowed: platformKeys)
            s.paging = try p.choice("paging", PagingKind.allNames).flatMap(PagingKind.init(rawValue:))
            s.pageSize = try p.choice("page_size", ["4K", "2M", "1G"]).flatMap(PageSize.init(parsing:))
            s.levels = try p.int("levels", range: 4...5).map { Int($0) }
            s.hostPageSize = try p.choice("host_page_size", ["4K", "2M", "1G"]).flatMap(PageSize.init(parsing:))
            s.hostLevels = try p.int("host_levels", range: 4...5).map { Int($0) }
            s.hostLimit = try parsed(p, "host_limit") { v throws(InputError) in try ByteCount(parsing: v) }
            s.swapDevice = try p.choice("swap_device", MachineProfile.swapDevices.keys.sorted())
            s.shadowMaxPages = try p.int("shadow_max_pages", range: 8...Int64(Int32.max)).map { Int($0) }
            let profile = try p.string("profile")
            let costs = try p.choice("costs", MachineProfile.builtInNames)
            if profile != nil && costs != nil {
                throw p.error("costs", "give profile or costs, not both (costs = \"NAME\" is a shorthand for profile = \"NAME\")")
            }
            s.profile = profile ?? costs
            for k in platformKeys where p.has(k) { s.lines["platform." + k] = p.node[k]!.line }
        }
        return s
    }

    /// The KVM engine runs the workload on this host's real MMU: of `[platform]` it takes only
    /// `page_size`; any other key given is an error naming it and its line.
    public func checkForKVMEngine() throws(ConfigError) {
        for k in Self.platformKeys where k != "page_size" {
            if let line = lines["platform." + k] {
                throw ConfigError(file: file, line: line, "[platform] \(k): the KVM engine runs on this host's MMU and takes only page_size from [platform] (\(k) is for `memvirt run`)")
            }
        }
    }

    /// "FILE:LINE" of a key, for errors found after decoding.
    public func location(_ key: String) -> String {
        lines[key].map { "\(file):\($0)" } ?? file
    }

    /// The workload: the scenario's values, each overridden by the flag's when given.
    public static func workload(_ s: Scenario?, overrides o: WorkloadOverrides) throws(InputError) -> WorkloadSpec {
        var spec = WorkloadSpec()
        func flag<T>(_ text: String?, _ name: String, _ f: (String) throws(InputError) -> T) throws(InputError) -> T? {
            guard let t = text else { return nil }
            do { return try f(t) } catch { throw InputError("--\(name): \(error.message)") }
        }
        if let v = try flag(o.pattern, "workload", { v throws(InputError) in try WorkloadSpec.Pattern(parsing: v) }) ?? s?.pattern { spec.pattern = v }
        if let v = try flag(o.footprint, "footprint", { v throws(InputError) in try ByteCount(parsing: v) }) ?? s?.footprint { spec.footprint = v }
        if let v = try flag(o.accesses, "accesses", { v throws(InputError) in try parseCount(v) }) ?? s?.accesses { spec.accesses = v }
        if let v = o.writeRatio ?? s?.writeRatio { spec.writeRatio = v }
        if let v = o.seed ?? s?.seed { spec.seed = v }
        if let v = o.threads ?? s?.threads { spec.threads = v }
        if let v = o.computePerAccess ?? s?.computePerAccess { spec.computePerAccess = v }
        do { try spec.validate() } catch {
            throw InputError(s.map { "\($0.file): \(error.message)" } ?? error.message)
        }
        return spec
    }
}

/// Workload values given on the command line (text where the flag takes units).
public struct WorkloadOverrides: Sendable {
    public var pattern: String?
    public var footprint: String?
    public var accesses: String?
    public var writeRatio: Double?
    public var seed: UInt64?
    public var threads: Int?
    public var computePerAccess: UInt64?
    public init(pattern: String? = nil, footprint: String? = nil, accesses: String? = nil, writeRatio: Double? = nil, seed: UInt64? = nil,
                threads: Int? = nil, computePerAccess: UInt64? = nil) {
        self.pattern = pattern
        self.footprint = footprint
        self.accesses = accesses
        self.writeRatio = writeRatio
        self.seed = seed
        self.threads = threads
        self.computePerAccess = computePerAccess
    }
}

extension PagingKind {
    public static var allNames: [String] { ["native", "shadow", "nested"] }
}
