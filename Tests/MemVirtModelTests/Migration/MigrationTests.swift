import MemVirtCore
import Testing

@testable import MemVirtModel

/// A small randomized guest: pattern, write ratio and footprint drawn from `seed`.
func randomGuest(_ tracking: DirtyTrackingMode, seed: UInt64, writeRatio: Double? = nil, pages: UInt64? = nil,
                 hostPageSize: PageSize = .size4K, pageSize: PageSize = .size4K) throws -> MigrationGuest {
    var rng = SplitMix64(seed: seed)
    let patterns: [WorkloadSpec.Pattern] = [.uniform, .zipf(theta: 0.99), .sequential, .gups]
    let pattern = patterns[Int(rng.bounded(UInt64(patterns.count)))]
    let n = pages ?? (256 + rng.bounded(512))
    let spec = WorkloadSpec(pattern: pattern, footprint: ByteCount(n * 4096), accesses: .max,
                            writeRatio: writeRatio ?? (0.1 + 0.8 * rng.unitDouble()), seed: seed, computePerAccess: 20_000)
    return try MigrationGuest(tracking: tracking, spec: spec, guestCapacity: 1 << 30, hostPageSize: hostPageSize, pageSize: pageSize)
}

func smallConfig(_ kind: MigrationKind, harvest: HarvestMethod = .bitmap) -> MigrationConfig {
    var c = MigrationConfig()
    c.kind = kind
    c.harvest = harvest
    // A slow link so that several rounds happen on a few MiB.
    c.link.bandwidth = 16 * 1_048_576
    c.downtimeLimit = 0.010
    c.maxRounds = 5
    return c
}

let allKinds: [MigrationKind] = [.preCopy, .postCopy, .hybrid(preCopyRounds: 2)]

@Suite("Live migration: destination equals source, no write lost")
struct MigrationTests {
    @Test("Whole-memory hash of the destination equals the source at switch-over",
          arguments: DirtyTrackingMode.allCases, [UInt64(1)])
    func hashesMatch(_ mode: DirtyTrackingMode, seed: UInt64) throws {
        for (i, kind) in allKinds.enumerated() {
            let guest = try randomGuest(mode, seed: seed &* 31 &+ UInt64(i))
            var config = smallConfig(kind, harvest: i == 1 ? .ring : .bitmap)
            config.guestRunsAfterSwitch = false
            let m = try MigrationSimulation(guest: guest, config: config)
            let r = try m.run()
            #expect(r.hashesMatch, "\(mode.rawValue) \(kind): source \(r.sourceHash) destination \(r.destinationHash)")
            if case .preCopy = kind {
                #expect(r.rounds.count >= 2)
            } else {
                #expect(r.destinationFinalHash == r.sourceHash, "\(mode.rawValue) \(kind): destination after post-copy differs")
            }
            #expect(r.trackingTotals.harvests > 0 || kind == .postCopy)
        }
    }

    @Test("Every value written up to switch-over (and after, in post-copy) is on the destination",
          arguments: DirtyTrackingMode.allCases)
    func noLostWrite(_ mode: DirtyTrackingMode) throws {
        for (i, kind) in allKinds.enumerated() {
            let guest = try randomGuest(mode, seed: 100 + UInt64(i), writeRatio: 0.9)
            var expected: [UInt64: UInt64] = [:]
            let mem = guest.tracker.sourceMemory
            guest.onAccess = { a, pa in
                if a.kind == .write { expected[a.address.rawValue & ~7] = mem.read64(pa) }
            }
            let m = try MigrationSimulation(guest: guest, config: smallConfig(kind))
            let r = try m.run()
            #expect(!expected.isEmpty)
            var lost = 0
            for (va, v) in expected where m.destinationRead(va) != v { lost += 1 }
            #expect(lost == 0, "\(mode.rawValue) \(kind): \(lost) of \(expected.count) written words differ on the destination")
            if case .preCopy = kind { #expect(r.hashesMatch) }
        }
    }

    @Test("Huge pages are split while logging and migrate intact")
    func hugePages() throws {
        for mode in [DirtyTrackingMode.shadowWriteProtect, .nestedDirtyBits, .nestedPML] {
            let guest = try randomGuest(mode, seed: 7, pages: 2048, hostPageSize: .size2M, pageSize: mode.paging == .shadow ? .size2M : .size4K)
            let m = try MigrationSimulation(guest: guest, config: smallConfig(.preCopy))
            let r = try m.run()
            #expect(r.hashesMatch, "\(mode.rawValue)")
            #expect(r.trackingTotals.hugePagesSplit > 0, "\(mode.rawValue): no huge page split")
        }
    }

    @Test("Xen style re-shadows after every clean; KVM style only takes fixup faults")
    func xenReshadows() throws {
        var reshadow: [DirtyTrackingMode: UInt64] = [:]
        var fixups: [DirtyTrackingMode: UInt64] = [:]
        for mode in [DirtyTrackingMode.shadowWriteProtect, .shadowDropAll] {
            let guest = try randomGuest(mode, seed: 9, writeRatio: 0.3, pages: 1024)
            let r = try MigrationSimulation(guest: guest, config: smallConfig(.preCopy)).run()
            reshadow[mode] = r.trackingTotals.reshadowFaults
            fixups[mode] = r.trackingTotals.writeFaults
            #expect(r.hashesMatch)
        }
        #expect(reshadow[.shadowWriteProtect]! == 0)
        #expect(reshadow[.shadowDropAll]! > 100)
        #expect(fixups[.shadowWriteProtect]! > 100)
    }

    @Test("Page groups: a sequential writer takes about n times fewer write faults, and sends no fewer bytes")
    func pageGroups() throws {
        var faults: [Int: UInt64] = [:]
        var bytes: [Int: Double] = [:]
        for n in [1, 8, 64] {
            let spec = WorkloadSpec(pattern: .sequential, footprint: ByteCount(2048 * 4096), accesses: .max, writeRatio: 1, seed: 3, computePerAccess: 20_000)
            let guest = try MigrationGuest(tracking: .shadowWriteProtect, spec: spec, guestCapacity: 1 << 30)
            var c = smallConfig(.preCopy)
            c.pageGroup = n
            c.maxRounds = 4
            let r = try MigrationSimulation(guest: guest, config: c).run()
            #expect(r.hashesMatch)
            faults[n] = r.trackingTotals.writeFaults
            bytes[n] = r.bytes
        }
        let f1 = Double(faults[1]!), f8 = Double(faults[8]!), f64 = Double(faults[64]!)
        #expect(f1 / f8 > 5 && f1 / f8 < 10, "n=8: \(f1) -> \(f8)")
        #expect(f1 / f64 > 30, "n=64: \(f1) -> \(f64)")
        #expect(bytes[64]! >= bytes[1]! * 0.99)
    }

    @Test("A write-heavy guest does not converge; auto-converge rescues it")
    func autoConverge() throws {
        var results: [Bool: MigrationResult] = [:]
        for ac in [false, true] {
            let spec = WorkloadSpec(pattern: .uniform, footprint: ByteCount(1024 * 4096), accesses: .max, writeRatio: 1, seed: 5, computePerAccess: 20_000)
            let guest = try MigrationGuest(tracking: .nestedPML, spec: spec, guestCapacity: 1 << 30)
            var c = smallConfig(.preCopy)
            c.autoConverge = ac
            c.maxRounds = 30
            let r = try MigrationSimulation(guest: guest, config: c).run()
            #expect(r.hashesMatch)
            results[ac] = r
        }
        #expect(!results[false]!.converged)
        #expect(results[true]!.converged)
        #expect(results[true]!.finalThrottle >= 0.2)
        #expect(results[true]!.downtimeSeconds < results[false]!.downtimeSeconds)
    }
}
