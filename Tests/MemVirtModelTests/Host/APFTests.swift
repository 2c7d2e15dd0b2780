import Testing
import MemVirtCore
@testable import MemVirtModel

func smallVM(apf: Bool, limit: ByteCount?, duration: Double = 0.3e9) -> VMSimulationConfig {
    var c = VMSimulationConfig()
    c.vcpus = 2
    c.guestMemory = .mib(64)
    c.hostLimit = limit
    c.faultThreads = 2
    c.workThreads = 2
    c.faultBuffer = .mib(4)
    c.apf = apf
    c.duration = duration
    c.scheduler = .forCPUs(2)
    return c
}

@Suite("APF and guest scheduling over host memory")
struct APFTests {
    @Test("randomized: through nested paging, resident memory stays under the limit and every page survives swap cycles", arguments: [1, 2, 3] as [UInt64])
    func contentThroughNestedPaging(seed: UInt64) throws {
        var rng = SplitMix64(seed: seed)
        var c = smallVM(apf: false, limit: ByteCount((16 + rng.bounded(48)) * 4096))
        c.vcpus = 1
        c.faultThreads = 1
        c.workThreads = 0
        c.faultBuffer = .kib(1024)
        c.device = SwapDeviceModel(name: "t", readLatency: 10_000, writeLatency: 1_000, bandwidth: 1, queueDepth: 2)
        let sim = try VMSimulation(config: c)
        let (base, pages) = sim.faultBuffers[0]
        var oracle: [UInt64: [Int: UInt64]] = [:]
        for _ in 0..<2500 {
            let p = rng.bounded(pages), w = Int(rng.bounded(512))
            let va = base + p * 4096 + UInt64(w) * 8
            if rng.bounded(3) == 0 {
                #expect(try sim.directAccess(va: va, write: false, value: 0) == oracle[p]?[w] ?? 0)
            } else {
                let v = rng.next()
                try sim.directAccess(va: va, write: true, value: v)
                oracle[p, default: [:]][w] = v
            }
            #expect(sim.host.residentFrames <= sim.host.limitFrames!)
        }
        let owner = sim.nested.ownerIndex
        #expect(sim.host.stats(owner: owner).swapOuts > 100)
        #expect(sim.host.peakResidentFrames <= sim.host.limitFrames!)
        #expect(sim.host.invariantViolations() == [])
        for (p, words) in oracle {
            let gfn = try #require(sim.guestFrame(of: base + p * 4096))
            #expect(sim.host.contentHash(owner: owner, gfn: gfn) == expectedPageHash(words))
        }
    }

    @Test("with no memory limit, APF on and APF off give identical results")
    func noLimitNoDifference() throws {
        let a = try VMSimulation(config: smallVM(apf: true, limit: nil, duration: 0.03e9)).run()
        let b = try VMSimulation(config: smallVM(apf: false, limit: nil, duration: 0.03e9)).run()
        #expect(a.workerIncrements == b.workerIncrements)
        #expect(a.faultAccesses == b.faultAccesses)
        #expect(a.checksum == b.checksum)
        #expect(a.time == b.time)
        #expect(a.counters == b.counters)
        #expect(a.counters[.apfNotPresent] == 0)
        #expect(a.counters[.hostMajorFaults] == 0)
    }

    @Test("given a 4x overcommitted guest on a disk, APF about doubles the counter threads' work")
    func apfPays() throws {
        var c = smallVM(apf: true, limit: .mib(4), duration: 2e9)
        c.faultBuffer = .mib(8)
        let on = try VMSimulation(config: c).run()
        c.apf = false
        let off = try VMSimulation(config: c).run()
        let ratio = on.totalIncrements / off.totalIncrements
        #expect(ratio >= 1.8)
        #expect(on.share(.workThread) > 0.95)
        #expect(off.share(.workThread) < 0.6)
        #expect(off.share(.blocked) > 0.4)
        #expect(on.counters[.apfNotPresent] > 0)
        #expect(on.counters[.apfReady] + 2 >= on.counters[.apfNotPresent])
        #expect(off.counters[.apfNotPresent] == 0)
        #expect(on.peakResidentFrames <= on.limitFrames!)
    }

    @Test("at most 64 async page faults are outstanding on a vCPU; beyond that the vCPU blocks")
    func outstandingCap() throws {
        var c = smallVM(apf: true, limit: .kib(512), duration: 1e9)
        c.vcpus = 1
        c.scheduler = .forCPUs(1)
        c.faultThreads = 70
        c.workThreads = 0
        c.faultBuffer = .kib(64)
        let r = try VMSimulation(config: c).run()
        #expect(r.maxOutstandingAPF == 64)
        #expect(r.time[VCPUTime.blocked.rawValue] > 0)
        #expect(r.counters[.apfNotPresent] > 64)
    }
}
