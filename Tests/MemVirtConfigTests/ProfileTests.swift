import Foundation
import MemVirtConfig
import MemVirtCore
import MemVirtModel
import Testing

@Suite struct ProfileTests {
    @Test func builtInsDecodeAndNameThemselves() throws {
        let all = try MachineProfile.builtIn()
        #expect(all.map(\.name) == MachineProfile.builtInNames)
        for p in all {
            #expect(p.origin == .builtIn)
            // Every parameter has a non-empty source.
            for param in ProfileParameter.all {
                guard case .source(let s)? = p.provenance[param.name] else {
                    Issue.record("\(p.name): \(param.name) has no source")
                    continue
                }
                #expect(!s.isEmpty)
                #expect(!s.contains("REFERENCES.md"), "\(p.name) \(param.name) cites REFERENCES.md")
            }
        }
    }

    /// The Swift presets the experiments still name and the profile files must not drift apart.
    @Test func goldenCoveProfilesEqualTheSwiftPresets() throws {
        for (name, preset) in [("bare-metal", CostModel.bareMetal), ("vmx-ept", CostModel.vmxEPT), ("pvm-shadow", CostModel.pvmShadow)] {
            let p = try MachineProfile.load(name)
            #expect(p.costModel == preset, "\(name)")
            #expect(p.tlb == TLBConfig.goldenCove)
            var host = HostCosts()
            var scheduling = GuestSchedulingCosts()
            // pvm-shadow's page-ready delay is the one measured on kvm_pvm (as the APF reproduction's),
            // and so are its timer wake-up and the VMM-side guest kernel's async-PF legs.
            if name == "pvm-shadow" {
                scheduling.pageReadyDelay = 150_000
                scheduling.apfFaultLegs = 266_220
                host.timerWakeLatency = 122_700
                host.timerWakeSpread = 53_100
                host.remoteFlushInitiator = 299_229
            }
            #expect(p.costs.host == host)
            #expect(p.costs.scheduling == scheduling)
            #expect(p.costs.dirty == DirtyTrackingCosts())
        }
    }

    @Test func parameterTableCoversEveryField() {
        // Mirror counts the stored properties of each struct; the table must name each one
        // (CostModel's name and clock are [profile] name and [cpu] clock_ghz).
        func fields(_ v: Any) -> Set<String> { Set(Mirror(reflecting: v).children.compactMap(\.label)) }
        let named = Set(ProfileParameter.all.map(\.name))
        for (s, v) in [("CostModel", CostModel.bareMetal as Any), ("HostCosts", HostCosts()), ("GuestSchedulingCosts", GuestSchedulingCosts()),
                       ("DirtyTrackingCosts", DirtyTrackingCosts())] {
            for f in fields(v) where !(s == "CostModel" && (f == "name" || f == "clockGHz")) {
                #expect(named.contains("\(s).\(f)"), "\(s).\(f) is missing from ProfileParameter.all")
            }
        }
        #expect(Set(ProfileParameter.all.map { $0.section + "." + $0.key }).count == ProfileParameter.all.count)
    }

    @Test func everyBuiltInRoundTrips() throws {
        for name in MachineProfile.builtInNames {
            let p = try MachineProfile.load(name)
            let text = p.toTOML()
            let q = try MachineProfile.decode(text, file: "\(name)-written.toml")
            #expect(q == p, "\(name)")
            #expect(q.toTOML() == text)
        }
    }

    static let calibration = [
        CalibratedCost(parameter: "CostModel.vmExitRoundTrip", medianNanos: 12.345, p10Nanos: 11.1, p90Nanos: 14.9, samples: 200, method: "PIO to an in-kernel device"),
        CalibratedCost(parameter: "HostCosts.pageCopy", medianNanos: 250.5, p10Nanos: 240, p90Nanos: 300, samples: 300, method: "KSM CoW break"),
        CalibratedCost(parameter: "GuestSchedulingCosts.pageReadyDelay", medianNanos: 150_000, p10Nanos: 100_000, p90Nanos: 190_000, samples: 250, method: "APF ready"),
        CalibratedCost(parameter: "DirtyTrackingCosts.bitmapPerGiB", medianNanos: 9_100, p10Nanos: 8_000, p90Nanos: 13_000, samples: 200, method: "GET_DIRTY_LOG, empty 1 GiB slot"),
    ]

    @Test func applyingCalibrationIsExact() throws {
        let base = try MachineProfile.load("skylake-sp")
        let c = try base.applying(calibration: Self.calibration, date: "2026-12-04", host: "test host")
        #expect(c.origin == .calibrated)
        #expect(c.base == "skylake-sp")
        #expect(c.host == "test host")
        #expect(c.date == "2026-12-04")
        #expect(c.clockGHz == 2.5)
        // Cycles at the base's clock; nanosecond parameters stay in nanoseconds.
        #expect(c.costs.costs.vmExitRoundTrip == 12.345 * 2.5)
        #expect(c.costs.host.pageCopy == 250.5 * 2.5)
        #expect(c.costs.scheduling.pageReadyDelay == 150_000)
        #expect(c.costs.dirty.bitmapPerGiB == 9_100 * 2.5)
        #expect(c.provenance["CostModel.vmExitRoundTrip"] == .measured(method: "PIO to an in-kernel device", samples: 200, medianNanos: 12.345, p10Nanos: 11.1, p90Nanos: 14.9))
        let measured = Set(Self.calibration.map(\.parameter))
        for p in ProfileParameter.all where !measured.contains(p.name) {
            #expect(p.get(c.costs) == p.get(base.costs), "\(p.name) changed")
            guard case .source(let s)? = base.provenance[p.name] else { Issue.record("base source"); continue }
            #expect(c.provenance[p.name] == .inherited(s), "\(p.name)")
        }
        // The calibrated profile round-trips too (measured and inherited entries).
        let back = try MachineProfile.decode(c.toTOML(), file: "calibrated.toml")
        #expect(back == c)
    }

    @Test func calibrationErrors() throws {
        let base = try MachineProfile.load("pvm-shadow")
        func fails(_ c: [CalibratedCost], _ fragment: String) {
            do {
                _ = try base.applying(calibration: c, date: "2026-12-04", host: "h")
                Issue.record("accepted: \(c)")
            } catch {
                #expect("\(error)".contains(fragment), "\(error)")
            }
        }
        fails([CalibratedCost(parameter: "CostModel.vmExitRoundtrip", medianNanos: 1, p10Nanos: 1, p90Nanos: 1, samples: 1, method: "m")], "unknown parameter 'CostModel.vmExitRoundtrip'")
        fails([CalibratedCost(parameter: "DirtyTrackingCosts.pmlEntries", medianNanos: 1, p10Nanos: 1, p90Nanos: 1, samples: 1, method: "m")], "is a count")
        fails(Array(repeating: Self.calibration[0], count: 2), "twice")
        fails([CalibratedCost(parameter: "HostCosts.pageCopy", medianNanos: .nan, p10Nanos: 1, p90Nanos: 1, samples: 1, method: "m")], "not a valid measurement")
    }

    @Test func diffComparesMediansWhenBothMeasured() throws {
        let base = try MachineProfile.load("pvm-shadow")
        let a = try base.applying(calibration: Self.calibration, date: "2026-12-04", host: "h")
        var second = Self.calibration
        second[0].medianNanos = 12.345 * 1.2
        second[0].p90Nanos = 20
        let b = try base.applying(calibration: second, date: "2026-12-05", host: "h")
        let d = MachineProfile.diff(a, b)
        let exit = try #require(d.first { $0.parameter == "CostModel.vmExitRoundTrip" })
        #expect(exit.measuredInBoth && exit.unit == "ns")
        #expect(exit.a == 12.345 && exit.b == 12.345 * 1.2)
        #expect(abs(exit.relativeChange - 0.2) < 1e-12)
        let copy = try #require(d.first { $0.parameter == "HostCosts.pageCopy" })
        #expect(copy.relativeChange == 0)
        #expect(d.filter(\.measuredInEither).count == 4)
        // Two built-ins: values in their units.
        let z = MachineProfile.diff(try MachineProfile.load("vmx-ept"), try MachineProfile.load("zen4"))
        let dram = try #require(z.first { $0.parameter == "CostModel.walkRefDRAM" })
        #expect(dram.a == 300 && dram.b == 330 && abs(dram.relativeChange - 0.1) < 1e-12)
    }

    static let conditions = { () -> CalibrationConditions in
        var c = CalibrationConditions(reference: "cpl0_instruction", referenceNanos: 350.5, referenceRoundMinNanos: 340,
                                                  referenceRoundMaxNanos: 371.25, stealPercent: 0.125, loadAverage: 2.5, runSeconds: 180.5)
        c.hostLoopNanos = 267_300.5
        c.hostLoopRoundMinNanos = 267_100
        c.hostLoopRoundMaxNanos = 268_500
        return c
    }()

    static func bound(_ est: Double, _ res: Double) -> CalibratedBound {
        CalibratedBound(parameter: "CostModel.shadowFaultHandler", estimateNanos: est, upperNanos: est + res, resolutionNanos: res,
                        samples: 960, method: "first touch minus exit minus host zero")
    }

    @Test func boundsAndConditionsRoundTrip() throws {
        let base = try MachineProfile.load("pvm-shadow")
        let c = try base.applying(calibration: Self.calibration, bounds: [Self.bound(600, 700)], conditions: Self.conditions,
                                  date: "2026-12-04", host: "h")
        // The estimate is charged (cycles at the base's clock), the provenance says bound.
        #expect(c.costs.costs.shadowFaultHandler == 600 * base.clockGHz)
        #expect(c.provenance["CostModel.shadowFaultHandler"] == .bound(method: "first touch minus exit minus host zero", samples: 960,
                                                                        estimateNanos: 600, upperNanos: 1300, resolutionNanos: 700))
        #expect(c.provenance["CostModel.shadowFaultHandler"]?.isMeasured == false)
        let text = c.toTOML()
        #expect(text.contains("provenance = \"bound\"") && text.contains("[calibration]"))
        let back = try MachineProfile.decode(text, file: "b.toml")
        #expect(back == c && back.conditions == Self.conditions)
        // A bound whose estimate exceeds its upper bound is refused, naming the key.
        let bad = text.replacingOccurrences(of: "upper_ns = 1300", with: "upper_ns = 500")
        #expect(throws: ConfigError.self) { try MachineProfile.decode(bad, file: "bad.toml") }
        // An unknown key in [calibration] is refused.
        let unknown = text.replacingOccurrences(of: "run_seconds = ", with: "run_secs = ")
        #expect(throws: ConfigError.self) { try MachineProfile.decode(unknown, file: "bad.toml") }
        // A parameter both measured and bounded is refused.
        let twice = CalibratedBound(parameter: "CostModel.vmExitRoundTrip", estimateNanos: 1, upperNanos: 2, resolutionNanos: 1, samples: 1, method: "m")
        #expect(throws: ProfileError.self) { try base.applying(calibration: Self.calibration, bounds: [twice], date: "2026-12-04", host: "h") }
    }

    @Test func diffChecksBoundsNotRelativeChange() throws {
        let base = try MachineProfile.load("pvm-shadow")
        func profile(_ b: CalibratedBound?, measured: Double? = nil, reference: Double = 350.5) throws -> MachineProfile {
            var cal = Self.calibration
            if let m = measured {
                cal.append(CalibratedCost(parameter: "CostModel.shadowFaultHandler", medianNanos: m, p10Nanos: m, p90Nanos: m, samples: 9, method: "m"))
            }
            var cond = Self.conditions
            cond.referenceNanos = reference
            return try base.applying(calibration: cal, bounds: b.map { [$0] } ?? [], conditions: cond, date: "2026-12-04", host: "h")
        }
        func row(_ a: MachineProfile, _ b: MachineProfile) throws -> MachineProfile.ParameterDiff {
            try #require(MachineProfile.diff(a, b).first { $0.parameter == "CostModel.shadowFaultHandler" })
        }
        // 600 <= 1300 and 0 <= 700... but 600 > 0 + 700? no: 600 <= 700: consistent, though -100%.
        let r1 = try row(try profile(Self.bound(600, 700)), try profile(Self.bound(0, 700)))
        #expect(r1.boundInEither && r1.boundsConsistent && r1.agrees(threshold: 0.15) && r1.measuredInEither)
        #expect(r1.a == 600 && r1.b == 0 && r1.aUpper == 1300 && r1.bUpper == 700)
        // 900 > 0 + 700: inconsistent.
        let r2 = try row(try profile(Self.bound(900, 700)), try profile(Self.bound(0, 700)))
        #expect(r2.boundInEither && !r2.boundsConsistent && !r2.agrees(threshold: 0.15))
        // Measured in one, bounded in the other: the measured median against the bound.
        let r3 = try row(try profile(nil, measured: 2_000), try profile(Self.bound(300, 700)))
        #expect(r3.boundInEither && !r3.boundsConsistent && r3.a == 2_000 && r3.aUpper == nil && r3.bUpper == 1_000)
        let r4 = try row(try profile(nil, measured: 900), try profile(Self.bound(300, 700)))
        #expect(r4.boundsConsistent)
        // Measured in both: the relative change, as before.
        let r5 = try row(try profile(nil, measured: 1_000), try profile(nil, measured: 1_200))
        #expect(!r5.boundInEither && r5.measuredInBoth && !r5.agrees(threshold: 0.15) && r5.agrees(threshold: 0.25))
        // Host speed: the references' ratio.
        let fast = try profile(nil), slow = try profile(nil, reference: 350.5 * 1.4)
        #expect(abs(CalibrationConditions.speedRatio(fast.conditions!, slow.conditions!)! - 1.4) < 1e-12)
        #expect(CalibrationConditions.hostLoopRatio(fast.conditions!, slow.conditions!) == 1)
        // A [calibration] without the host loop (older files) reads as -1: no ratio.
        var old = fast
        old.conditions!.hostLoopNanos = -1
        let back = try MachineProfile.decode(old.toTOML().replacingOccurrences(of: "host_loop_ns = -1\n", with: ""), file: "old.toml")
        #expect(back.conditions?.hostLoopNanos == -1 && CalibrationConditions.hostLoopRatio(back.conditions!, fast.conditions!) == nil)
    }

    @Test func calibratedFileWrittenAndRead() throws {
        let text = try MachineProfile.calibratedTOML(base: "pvm-shadow", calibration: Self.calibration, date: "2026-12-04", host: "kvm-host")
        let p = try MachineProfile.decode(text, file: "cal.toml")
        #expect(p.origin == .calibrated && p.base == "pvm-shadow" && p.name == "calibrated-kvm-host")
        #expect(p.costs.costs.vmExitRoundTrip == 12.345 * 3.0)
        #expect(text.contains("vm_exit_round_trip = { cycles = \(12.345 * 3.0), provenance = \"measured\", method = \"PIO to an in-kernel device\", samples = 200, median_ns = 12.345, p10_ns = 11.1, p90_ns = 14.9 }"))
        #expect(throws: ProfileError.self) { try p.write(to: "/nonexistent-dir/x.toml") }
    }

    @Test func loadErrors() throws {
        #expect(throws: ProfileError.self) { try MachineProfile.load("no-such-profile") }
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("memvirt-profile-\(getpid())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let f = dir.appendingPathComponent("mine.toml").path
        try (try MachineProfile.load("zen4")).toTOML().write(toFile: f, atomically: true, encoding: .utf8)
        #expect(try MachineProfile.load(f) == MachineProfile.load("zen4"))
        #expect(try MachineProfile.load("mine.toml", relativeTo: dir.path).name == "zen4")
    }
}
