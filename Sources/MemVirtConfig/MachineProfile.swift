import Foundation
import MemVirtCore
import MemVirtModel

/// A machine description as data: the CPU (clock, TLB arrays, paging-structure caches, PCID),
/// every cost the model charges (each with its source, or how it was measured) and host memory
/// defaults. One TOML file each; the built-in ones are compiled into the binary
/// (Sources/MemVirtConfig/Profiles). The model reads the structs a profile decodes into
/// (`CostModel`, `TLBConfig`, `HostCosts`, `GuestSchedulingCosts`, `DirtyTrackingCosts`).
public struct MachineProfile: Sendable, Hashable {
    public enum Origin: String, Sendable, Hashable, CaseIterable {
        case builtIn = "built-in"
        case calibrated
    }

    /// Where one parameter's value comes from.
    public enum Provenance: Sendable, Hashable {
        /// A built-in value with its one-line public source (or "estimate: ...").
        case source(String)
        /// A calibrated profile's value kept from its base, with the base's source.
        case inherited(String)
        /// Measured on the host: the method, samples after warm-up and the spread, in ns.
        case measured(method: String, samples: Int, medianNanos: Double, p10Nanos: Double, p90Nanos: Double)
        /// Derived by a calibration but below the resolution of the measurements it comes
        /// from: the value charged is the point estimate (>= 0), and only `upperNanos`
        /// (estimate + resolution) is known. Not a measured median: `profile diff` checks the
        /// bounds, not a relative change.
        case bound(method: String, samples: Int, estimateNanos: Double, upperNanos: Double, resolutionNanos: Double)

        public var isMeasured: Bool { if case .measured = self { true } else { false } }
        public var isBound: Bool { if case .bound = self { true } else { false } }

        /// One line: the source, or how it was measured.
        public var summary: String {
            switch self {
            case .source(let s), .inherited(let s): s
            case .measured(let m, let n, let med, let p10, let p90):
                "measured: \(m) (median \(formatFixed(med, digits: 1)) ns, p10 \(formatFixed(p10, digits: 1)), p90 \(formatFixed(p90, digits: 1)), \(n) samples)"
            case .bound(let m, let n, let est, let up, let res):
                "bound: \(m) (estimate \(formatFixed(est, digits: 1)) ns, at most \(formatFixed(up, digits: 1)) ns, resolution \(formatFixed(res, digits: 1)) ns, \(n) samples)"
            }
        }
    }

    public var name: String
    public var description: String
    /// When the numbers were taken or written, "YYYY-MM-DD".
    public var date: String
    public var origin: Origin
    /// A calibrated profile: the profile it started from and the host it measured.
    public var base: String?
    public var host: String?

    public var cpuModel: String
    public var clockGHz: Double
    public var clockSource: String
    public var tlb: TLBConfig
    public var tlbSource: String
    public var walkCacheSource: String

    public var costs: ProfileCosts
    /// Per parameter (by `ProfileParameter.name`): where its value comes from.
    public var provenance: [String: Provenance]

    /// Default swap device for `--host-limit` runs: hdd, sata-ssd or nvme.
    public var swapDevice: String

    /// A calibrated profile: the host's state while it was measured (`[calibration]`), so two
    /// calibrations taken at different host speeds can be told apart. nil for built-ins.
    public var conditions: CalibrationConditions? = nil

    public static let swapDevices: [String: SwapDeviceModel] = ["hdd": .hdd, "sata-ssd": .sataSSD, "nvme": .nvme]

    /// The cost table the model reads, named after the profile and at its clock.
    public var costModel: CostModel {
        var c = costs.costs
        c.name = name
        c.clockGHz = clockGHz
        return c
    }

    public var swapDeviceModel: SwapDeviceModel { Self.swapDevices[swapDevice] ?? .nvme }

    /// Sets the model's CPU, costs and default swap device from this profile.
    public func apply(to config: inout ModelConfig) {
        config.costs = costModel
        config.tlb = tlb
        config.swapDevice = swapDeviceModel
    }

    /// `{"name", "origin", "date"}` for run reports.
    public var summaryJSON: JSONValue {
        .object([("name", .string(name)), ("origin", .string(origin.rawValue)), ("date", .string(date))])
    }

    public func value(_ p: ProfileParameter) -> Double { p.get(costs) }
}

/// A profile that cannot be used: unknown name, a bad calibration.
public struct ProfileError: Error, CustomStringConvertible, Sendable {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

// MARK: built-in profiles and loading

extension MachineProfile {
    /// Names of the built-in profiles, in the order `memvirt profile list` shows them.
    public static let builtInNames = ["bare-metal", "vmx-ept", "pvm-shadow", "zen4", "skylake-sp"]

    /// The TOML text of a built-in profile.
    public static func builtInText(_ name: String) -> String? {
        let bytes: [UInt8]
        switch name {
        case "bare-metal": bytes = PackageResources.bare_metal_toml
        case "vmx-ept": bytes = PackageResources.vmx_ept_toml
        case "pvm-shadow": bytes = PackageResources.pvm_shadow_toml
        case "zen4": bytes = PackageResources.zen4_toml
        case "skylake-sp": bytes = PackageResources.skylake_sp_toml
        default: return nil
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// Every built-in profile, decoded (they are tested to decode).
    public static func builtIn() throws -> [MachineProfile] {
        try builtInNames.map { try load($0) }
    }

    /// A built-in profile by name, or a profile file by path (relative paths also tried
    /// against `relativeTo`, the folder of the scenario that named it).
    public static func load(_ nameOrPath: String, relativeTo folder: String? = nil) throws -> MachineProfile {
        if let text = builtInText(nameOrPath) {
            let p = try decode(text, file: "built-in:\(nameOrPath).toml")
            guard p.name == nameOrPath else { throw ProfileError("built-in profile '\(nameOrPath)' names itself '\(p.name)'") }
            return p
        }
        var candidates = [nameOrPath]
        if let f = folder, !nameOrPath.hasPrefix("/") { candidates.append((f as NSString).appendingPathComponent(nameOrPath)) }
        for path in candidates where FileManager.default.fileExists(atPath: path) {
            return try decode(TOMLParser.parse(contentsOf: path), file: path)
        }
        throw ProfileError("no profile '\(nameOrPath)': not a built-in (\(builtInNames.joined(separator: ", "))) and no such file")
    }

    public static func decode(_ text: String, file: String) throws(ConfigError) -> MachineProfile {
        try decode(TOMLParser.parse(text, file: file), file: file)
    }

    static let entryValueKeys: [ProfileParameter.Unit: String] = [.cycles: "cycles", .nanoseconds: "nanoseconds", .count: "count"]

    /// Decodes a parsed profile strictly: every section, key and cost parameter is checked.
    public static func decode(_ root: TOMLTableNode, file: String) throws(ConfigError) -> MachineProfile {
        let doc = ConfigTable(root: root, file: file)
        try doc.check(allowed: ["profile", "cpu", "costs", "host", "calibration"])

        let prof = try doc.required(try doc.table("profile"), "profile")
        try prof.check(allowed: ["name", "description", "date", "origin", "base", "host"])
        let name = try prof.required(try prof.string("name"), "name")
        guard !name.isEmpty, name.allSatisfy({ $0.isLetter || $0.isNumber || "-_.".contains($0) }) else {
            throw prof.error("name", "name '\(name)' must be letters, digits, '-', '_' or '.'")
        }
        let originText = try prof.required(try prof.choice("origin", Origin.allCases.map(\.rawValue)), "origin")
        let date = try prof.required(try prof.string("date"), "date")
        guard date.count == 10, date.split(separator: "-").count == 3, date.allSatisfy({ $0.isNumber || $0 == "-" }) else {
            throw prof.error("date", "date '\(date)' must be YYYY-MM-DD")
        }

        let cpu = try doc.required(try doc.table("cpu"), "cpu")
        try cpu.check(allowed: ["model", "clock_ghz", "clock_source", "pcid", "tlb_source", "l1d", "l1i", "l2",
                                "pml4e_cache", "pdpte_cache", "pde_cache", "walk_cache_source"])
        func arrays(_ key: String) throws(ConfigError) -> [TLBArrayConfig] {
            var out: [TLBArrayConfig] = []
            for t in try cpu.required(try cpu.tables(key), key) {
                try t.check(allowed: ["sets", "ways", "page_sizes"])
                let sets = try t.required(try t.int("sets", range: 1...65_536), "sets")
                guard sets & (sets - 1) == 0 else { throw t.error("sets", "sets = \(sets) must be a power of two (the model indexes sets by the low bits of the page number)") }
                let ways = try t.required(try t.int("ways", range: 1...4_096), "ways")
                guard sets * ways <= 1 << 20 else { throw t.error("ways", "sets x ways = \(sets * ways) entries: at most 1,048,576 per array") }
                let names = try t.required(try t.strings("page_sizes"), "page_sizes")
                var sizes: [PageSize] = []
                for n in names {
                    guard let s = PageSize(parsing: n) else { throw t.error("page_sizes", "page size '\(n)' is not allowed (allowed: 4K, 2M, 1G)") }
                    guard !sizes.contains(s) else { throw t.error("page_sizes", "page size '\(n)' is listed twice") }
                    sizes.append(s)
                }
                guard !sizes.isEmpty else { throw t.error("page_sizes", "page_sizes must name at least one of 4K, 2M, 1G") }
                out.append(TLBArrayConfig(sets: Int(sets), ways: Int(ways), sizes: sizes))
            }
            return out
        }
        let tlb = TLBConfig(
            l1d: try arrays("l1d"), l1i: try arrays("l1i"), l2: try arrays("l2"),
            pml4eCache: Int(try cpu.required(try cpu.int("pml4e_cache", range: 0...4_096), "pml4e_cache")),
            pdpteCache: Int(try cpu.required(try cpu.int("pdpte_cache", range: 0...4_096), "pdpte_cache")),
            pdeCache: Int(try cpu.required(try cpu.int("pde_cache", range: 0...4_096), "pde_cache")),
            pcid: try cpu.required(try cpu.bool("pcid"), "pcid"))
        let clock = try cpu.required(try cpu.double("clock_ghz", range: 0.1...10), "clock_ghz")

        let costsTable = try doc.required(try doc.table("costs"), "costs")
        try costsTable.check(allowed: ProfileParameter.sections)
        var costs = ProfileCosts(costs: .bareMetal)
        var provenance: [String: Provenance] = [:]
        for section in ProfileParameter.sections {
            let params = ProfileParameter.all.filter { $0.section == section }
            let t = try costsTable.required(try costsTable.table(section), section)
            try t.check(allowed: params.map(\.key))
            for p in params {
                if let since = ProfileParameter.addedLater[p.name], try t.table(p.key) == nil {
                    // A profile written before this parameter existed: the model's default.
                    provenance[p.name] = .inherited("not in this file (written before the parameter existed): the default, " + since)
                    continue
                }
                let e = try t.required(try t.table(p.key), p.key)
                let (v, prov) = try decodeEntry(e, p)
                p.set(&costs, v)
                provenance[p.name] = prov
            }
        }
        costs.costs.name = name
        costs.costs.clockGHz = clock

        var swap = "nvme"
        if let h = try doc.table("host") {
            try h.check(allowed: ["swap_device"])
            swap = try h.choice("swap_device", swapDevices.keys.sorted()) ?? swap
        }
        var conditions: CalibrationConditions? = nil
        if let t = try doc.table("calibration") {
            try t.check(allowed: CalibrationConditions.keys)
            func d(_ k: String) throws(ConfigError) -> Double { try t.required(try t.double(k, range: -1...1e13), k) }  // -1: unreadable
            conditions = CalibrationConditions(
                reference: try t.required(try t.string("reference"), "reference"), referenceNanos: try d("reference_ns"),
                referenceRoundMinNanos: try d("reference_round_min_ns"), referenceRoundMaxNanos: try d("reference_round_max_ns"),
                stealPercent: try d("steal_percent"), loadAverage: try d("load_average"), runSeconds: try d("run_seconds"))
            // Optional (calibrations before the host loop have none): -1.
            conditions!.hostLoopNanos = try t.double("host_loop_ns", range: -1...1e13) ?? -1
            conditions!.hostLoopRoundMinNanos = try t.double("host_loop_round_min_ns", range: -1...1e13) ?? -1
            conditions!.hostLoopRoundMaxNanos = try t.double("host_loop_round_max_ns", range: -1...1e13) ?? -1
        }
        var profile = MachineProfile(
            name: name, description: try prof.string("description") ?? "", date: date, origin: Origin(rawValue: originText)!,
            base: try prof.string("base"), host: try prof.string("host"),
            cpuModel: try cpu.required(try cpu.string("model"), "model"), clockGHz: clock,
            clockSource: try cpu.string("clock_source") ?? "", tlb: tlb, tlbSource: try cpu.string("tlb_source") ?? "",
            walkCacheSource: try cpu.string("walk_cache_source") ?? "", costs: costs, provenance: provenance, swapDevice: swap)
        profile.conditions = conditions
        return profile
    }

    /// `key = { cycles = N, source = "..." }`, or with `provenance = "inherited"` (and a
    /// source), or `provenance = "measured"` with method, samples, median_ns, p10_ns, p90_ns.
    static func decodeEntry(_ e: ConfigTable, _ p: ProfileParameter) throws(ConfigError) -> (Double, Provenance) {
        let valueKey = entryValueKeys[p.unit]!
        let provenance = try e.choice("provenance", ["inherited", "measured", "bound"])
        let measuredKeys = ["method", "samples", "median_ns", "p10_ns", "p90_ns"]
        let boundKeys = ["method", "samples", "estimate_ns", "upper_ns", "resolution_ns"]
        try e.check(allowed: [valueKey, "provenance"] + (provenance == "measured" ? measuredKeys : provenance == "bound" ? boundKeys : ["source"]))
        let v = try e.required(try e.double(valueKey, range: 0...1e13), valueKey)
        if p.unit == .count && v != v.rounded() { throw e.error(valueKey, "\(valueKey) = \(v) must be a whole number") }
        if provenance == "measured" {
            let m = try e.required(try e.string("method"), "method")
            let n = try e.required(try e.int("samples", range: 1...1_000_000_000), "samples")
            let med = try e.required(try e.double("median_ns", range: 0...1e13), "median_ns")
            let p10 = try e.required(try e.double("p10_ns", range: 0...1e13), "p10_ns")
            let p90 = try e.required(try e.double("p90_ns", range: 0...1e13), "p90_ns")
            guard p10 <= med && med <= p90 else { throw e.error("median_ns", "p10_ns <= median_ns <= p90_ns does not hold (\(p10), \(med), \(p90))") }
            return (v, .measured(method: m, samples: Int(n), medianNanos: med, p10Nanos: p10, p90Nanos: p90))
        }
        if provenance == "bound" {
            let m = try e.required(try e.string("method"), "method")
            let n = try e.required(try e.int("samples", range: 1...1_000_000_000), "samples")
            let est = try e.required(try e.double("estimate_ns", range: 0...1e13), "estimate_ns")
            let up = try e.required(try e.double("upper_ns", range: 0...1e13), "upper_ns")
            let res = try e.required(try e.double("resolution_ns", range: 0...1e13), "resolution_ns")
            guard est <= up else { throw e.error("upper_ns", "estimate_ns <= upper_ns does not hold (\(est), \(up))") }
            return (v, .bound(method: m, samples: Int(n), estimateNanos: est, upperNanos: up, resolutionNanos: res))
        }
        let s = try e.required(try e.string("source"), "source")
        guard !s.isEmpty else { throw e.error("source", "source must say where the value comes from (or \"estimate: ...\")") }
        return (v, provenance == "inherited" ? .inherited(s) : .source(s))
    }
}

// MARK: writing

extension MachineProfile {
    /// The profile as a TOML file that `load`/`decode` read back to an equal profile.
    public func toTOML() -> String {
        let q = TOMLText.quote
        let n = TOMLText.number
        var out = """
            # MemVirt machine profile: `memvirt profile show \(name)`; use with `--profile NAME|FILE`.
            # Costs are core cycles at [cpu] clock_ghz unless an entry says nanoseconds or count.

            [profile]
            name = \(q(name))
            description = \(q(description))
            date = \(q(date))
            origin = \(q(origin.rawValue))

            """
        if let b = base { out += "base = \(q(b))\n" }
        if let h = host { out += "host = \(q(h))\n" }
        func arrays(_ key: String, _ a: [TLBArrayConfig]) -> String {
            if a.isEmpty { return "\(key) = []\n" }
            return "\(key) = [\n" + a.map { "    { sets = \($0.sets), ways = \($0.ways), page_sizes = [\($0.sizes.map { q($0.description) }.joined(separator: ", "))] },\n" }.joined() + "]\n"
        }
        out += """

            [cpu]
            model = \(q(cpuModel))
            clock_ghz = \(n(clockGHz))
            clock_source = \(q(clockSource))
            pcid = \(tlb.pcid)
            tlb_source = \(q(tlbSource))

            """
        out += arrays("l1d", tlb.l1d) + arrays("l1i", tlb.l1i) + arrays("l2", tlb.l2)
        out += """
            pml4e_cache = \(tlb.pml4eCache)
            pdpte_cache = \(tlb.pdpteCache)
            pde_cache = \(tlb.pdeCache)
            walk_cache_source = \(q(walkCacheSource))

            """
        for section in ProfileParameter.sections {
            out += "\n[costs.\(section)]\n"
            for p in ProfileParameter.all where p.section == section {
                let v = "\(Self.entryValueKeys[p.unit]!) = \(n(p.get(costs)))"
                switch provenance[p.name] ?? .source("") {
                case .source(let s): out += "\(p.key) = { \(v), source = \(q(s)) }\n"
                case .inherited(let s): out += "\(p.key) = { \(v), provenance = \"inherited\", source = \(q(s)) }\n"
                case .measured(let m, let samples, let med, let p10, let p90):
                    out += "\(p.key) = { \(v), provenance = \"measured\", method = \(q(m)), samples = \(samples), median_ns = \(n(med)), p10_ns = \(n(p10)), p90_ns = \(n(p90)) }\n"
                case .bound(let m, let samples, let est, let up, let res):
                    out += "\(p.key) = { \(v), provenance = \"bound\", method = \(q(m)), samples = \(samples), estimate_ns = \(n(est)), upper_ns = \(n(up)), resolution_ns = \(n(res)) }\n"
                }
            }
        }
        out += "\n[host]\nswap_device = \(q(swapDevice))\n"
        if let c = conditions {
            out += """

                # The host while this calibration ran: a reference figure (its median, and the
                # lowest and highest per-round medians), steal time and load. Two calibrations
                # whose references differ were taken at different host speeds.
                [calibration]
                reference = \(q(c.reference))
                reference_ns = \(n(c.referenceNanos))
                reference_round_min_ns = \(n(c.referenceRoundMinNanos))
                reference_round_max_ns = \(n(c.referenceRoundMaxNanos))
                steal_percent = \(n(c.stealPercent))
                load_average = \(n(c.loadAverage))
                run_seconds = \(n(c.runSeconds))
                host_loop_ns = \(n(c.hostLoopNanos))
                host_loop_round_min_ns = \(n(c.hostLoopRoundMinNanos))
                host_loop_round_max_ns = \(n(c.hostLoopRoundMaxNanos))

                """
        }
        return out
    }
}

extension MachineProfile {
    /// Writes `toTOML()` to `path`; a failed write is an error (not a silent success).
    public func write(to path: String) throws {
        do { try Data(toTOML().utf8).write(to: URL(fileURLWithPath: path)) } catch {
            throw ProfileError("cannot write profile '\(path)': \(error.localizedDescription)")
        }
    }

    /// What `memvirt kvm calibrate --out FILE --base PROFILE` produces: the base profile (name or
    /// file) with the measured costs, as TOML text.
    public static func calibratedTOML(base: String, calibration: [CalibratedCost], date: String, host: String) throws -> String {
        try load(base).applying(calibration: calibration, date: date, host: host).toTOML()
    }
}

// MARK: calibration and comparison

extension MachineProfile {
    /// This profile with every parameter named in `calibration` replaced by its median (converted
    /// to cycles at this profile's clock for cycle parameters) and marked measured; every other
    /// parameter marked inherited with this profile's source. Unknown parameter names, a
    /// parameter measured twice, counts (not times) and non-finite or negative medians are errors.
    public func applying(calibration: [CalibratedCost], bounds: [CalibratedBound] = [], conditions: CalibrationConditions? = nil,
                         date: String, host: String, name: String? = nil) throws -> MachineProfile {
        var p = self
        p.origin = .calibrated
        p.base = self.name
        p.host = host
        p.date = date
        p.name = name ?? "calibrated-" + host.map { $0.isLetter || $0.isNumber || "-_.".contains($0) ? $0 : "-" }.reduce("") { $0 + String($1) }
        p.description = "\(self.name) with the costs measured by `memvirt kvm calibrate` on \(host) on \(date)"
        var seen: Set<String> = []
        for c in calibration {
            guard let param = ProfileParameter.byName[c.parameter] else {
                throw ProfileError("calibration names an unknown parameter '\(c.parameter)' (known: \(ProfileParameter.all.map(\.name).joined(separator: ", ")))")
            }
            guard seen.insert(c.parameter).inserted else { throw ProfileError("calibration measures '\(c.parameter)' twice") }
            guard param.unit != .count else { throw ProfileError("'\(c.parameter)' is a count, not a time: a calibration cannot set it") }
            guard c.medianNanos.isFinite, c.medianNanos >= 0, c.p10Nanos <= c.medianNanos, c.medianNanos <= c.p90Nanos, c.samples > 0 else {
                throw ProfileError("calibration of '\(c.parameter)': median \(c.medianNanos) ns, p10 \(c.p10Nanos), p90 \(c.p90Nanos), \(c.samples) samples is not a valid measurement")
            }
            param.set(&p.costs, param.unit == .cycles ? c.medianNanos * clockGHz : c.medianNanos)
            p.provenance[c.parameter] = .measured(method: c.method, samples: c.samples, medianNanos: c.medianNanos, p10Nanos: c.p10Nanos, p90Nanos: c.p90Nanos)
        }
        for b in bounds {
            guard let param = ProfileParameter.byName[b.parameter] else {
                throw ProfileError("calibration bounds an unknown parameter '\(b.parameter)' (known: \(ProfileParameter.all.map(\.name).joined(separator: ", ")))")
            }
            guard seen.insert(b.parameter).inserted else { throw ProfileError("calibration measures or bounds '\(b.parameter)' twice") }
            guard param.unit != .count else { throw ProfileError("'\(b.parameter)' is a count, not a time: a calibration cannot set it") }
            guard b.estimateNanos.isFinite, b.estimateNanos >= 0, b.upperNanos >= b.estimateNanos, b.resolutionNanos >= 0, b.samples > 0 else {
                throw ProfileError("calibration bound of '\(b.parameter)': estimate \(b.estimateNanos) ns, upper \(b.upperNanos), resolution \(b.resolutionNanos), \(b.samples) samples is not a valid bound")
            }
            param.set(&p.costs, param.unit == .cycles ? b.estimateNanos * clockGHz : b.estimateNanos)
            p.provenance[b.parameter] = .bound(method: b.method, samples: b.samples, estimateNanos: b.estimateNanos, upperNanos: b.upperNanos, resolutionNanos: b.resolutionNanos)
        }
        p.conditions = conditions
        for param in ProfileParameter.all where !seen.contains(param.name) {
            let base = provenance[param.name] ?? .source("")
            switch base {
            case .measured, .bound: p.provenance[param.name] = .inherited("from \(self.name) (\(self.date)): " + base.summary)
            case .source(let s), .inherited(let s): p.provenance[param.name] = .inherited(s)
            }
        }
        p.costs.costs.name = p.name
        return p
    }

    /// One parameter compared between two profiles. When both measured it, `a` and `b` are the
    /// medians in nanoseconds (clock-independent); otherwise the values in the parameter's unit.
    public struct ParameterDiff: Sendable, Hashable {
        public var parameter: String
        public var unit: String
        public var a: Double
        public var b: Double
        public var measuredInBoth: Bool
        public var measuredInEither: Bool
        /// (b - a) / a; 0 when both are 0, infinity when only a is 0.
        public var relativeChange: Double
        /// Upper bounds (ns) where a calibration could only bound the parameter (`.bound`);
        /// `a`/`b` are then the point estimates (or the other side's measured median) in ns.
        public var aUpper: Double? = nil
        public var bUpper: Double? = nil
        /// Bounded in either profile: compared by `boundsConsistent`, not by a relative change.
        public var boundInEither: Bool { aUpper != nil || bUpper != nil }
        /// Each side's value lies within the other side's bound (where it has one).
        public var boundsConsistent: Bool { (aUpper.map { b <= $0 } ?? true) && (bUpper.map { a <= $0 } ?? true) }
        /// The verdict `profile diff` prints: bounds consistent where bounded, else |change| <= threshold.
        public func agrees(threshold: Double) -> Bool { boundInEither ? boundsConsistent : abs(relativeChange) <= threshold }
    }

    public static func diff(_ a: MachineProfile, _ b: MachineProfile) -> [ParameterDiff] {
        ProfileParameter.all.map { p in
            let pa = a.provenance[p.name], pb = b.provenance[p.name]
            var va = p.get(a.costs), vb = p.get(b.costs)
            var unit = p.unit.rawValue
            let both: Bool
            var ua: Double? = nil, ub: Double? = nil
            /// A calibrated side's value in ns and its upper bound where bounded.
            func nanos(_ x: Provenance?) -> (Double, Double?)? {
                switch x {
                case .measured(_, _, let m, _, _)?: (m, nil)
                case .bound(_, _, let e, let u, _)?: (e, u)
                default: nil
                }
            }
            if case .measured(_, _, let ma, _, _)? = pa, case .measured(_, _, let mb, _, _)? = pb {
                va = ma
                vb = mb
                unit = "ns"
                both = true
            } else {
                both = false
                if pa?.isBound == true || pb?.isBound == true, let (na, upa) = nanos(pa), let (nb, upb) = nanos(pb) {
                    va = na
                    vb = nb
                    ua = upa
                    ub = upb
                    unit = "ns"
                }
            }
            let rel = va == vb ? 0 : va == 0 ? Double.infinity : (vb - va) / va
            return ParameterDiff(parameter: p.name, unit: unit, a: va, b: vb, measuredInBoth: both,
                                 measuredInEither: pa?.isMeasured == true || pb?.isMeasured == true || pa?.isBound == true || pb?.isBound == true,
                                 relativeChange: rel, aUpper: ua, bUpper: ub)
        }
    }
}

/// The host while a calibration ran (`[calibration]` of a calibrated profile): a reference
/// figure timed in every round (its median and the lowest and highest per-round medians), the
/// steal time /proc/stat counted over the run, the load average at the start, the run's length.
/// Two calibrations whose references differ by more than their rounds did were taken at
/// different host speeds; nothing is normalized by it.
public struct CalibrationConditions: Sendable, Hashable {
    public var reference: String
    public var referenceNanos: Double
    public var referenceRoundMinNanos: Double
    public var referenceRoundMaxNanos: Double
    public var stealPercent: Double
    public var loadAverage: Double
    public var runSeconds: Double
    /// A native CPU loop on the VMM thread (ALU only, no memory, no KVM), the whole loop in ns:
    /// median and lowest/highest round medians; -1 where not recorded. Unchanged while the
    /// CPL0 reference moves: the host's clock did not change, its virtualization or memory
    /// path did.
    public var hostLoopNanos: Double = -1
    public var hostLoopRoundMinNanos: Double = -1
    public var hostLoopRoundMaxNanos: Double = -1
    public init(reference: String, referenceNanos: Double, referenceRoundMinNanos: Double, referenceRoundMaxNanos: Double,
                stealPercent: Double, loadAverage: Double, runSeconds: Double) {
        self.reference = reference
        self.referenceNanos = referenceNanos
        self.referenceRoundMinNanos = referenceRoundMinNanos
        self.referenceRoundMaxNanos = referenceRoundMaxNanos
        self.stealPercent = stealPercent
        self.loadAverage = loadAverage
        self.runSeconds = runSeconds
    }

    static let keys = ["reference", "reference_ns", "reference_round_min_ns", "reference_round_max_ns", "steal_percent", "load_average", "run_seconds",
                       "host_loop_ns", "host_loop_round_min_ns", "host_loop_round_max_ns"]

    /// b's host loop over a's; nil where either has none.
    public static func hostLoopRatio(_ a: CalibrationConditions, _ b: CalibrationConditions) -> Double? {
        guard a.hostLoopNanos > 0, b.hostLoopNanos > 0 else { return nil }
        return b.hostLoopNanos / a.hostLoopNanos
    }

    /// b's reference over a's; above 1 + `tolerance` (or below 1 / (1 + tolerance)) the two
    /// runs were taken at different host speeds.
    public static func speedRatio(_ a: CalibrationConditions, _ b: CalibrationConditions) -> Double? {
        guard a.reference == b.reference, a.referenceNanos > 0 else { return nil }
        return b.referenceNanos / a.referenceNanos
    }

    public var json: JSONValue {
        .object([("reference", .string(reference)), ("reference_ns", .double(referenceNanos)),
                 ("reference_round_min_ns", .double(referenceRoundMinNanos)), ("reference_round_max_ns", .double(referenceRoundMaxNanos)),
                 ("steal_percent", .double(stealPercent)), ("load_average", .double(loadAverage)), ("run_seconds", .double(runSeconds)),
                 ("host_loop_ns", .double(hostLoopNanos)), ("host_loop_round_min_ns", .double(hostLoopRoundMinNanos)),
                 ("host_loop_round_max_ns", .double(hostLoopRoundMaxNanos))])
    }
}
