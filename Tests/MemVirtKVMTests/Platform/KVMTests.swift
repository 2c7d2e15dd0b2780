import CKVM
import MemVirtCore
import MemVirtGuest
import Testing
@testable import MemVirtKVM

let kvmReason = KVM.unavailableReason.map { "needs a usable /dev/kvm and userfaultfd (root): \($0)" } ?? ""

/// The independent oracle: replay `spec` with MemVirtCore's AccessGenerator over a flat
/// array, applying the guest runtime's documented access rules.
func oracle(_ spec: WorkloadSpec) throws -> (readSum: UInt64, checksum: UInt64, reads: UInt64, writes: UInt64) {
    var gen = try AccessGenerator(spec: spec)
    var mem = [UInt64](repeating: 0, count: Int(spec.footprint.rawValue / 8))
    var readSum: UInt64 = 0, reads: UInt64 = 0, writes: UInt64 = 0
    let gups = spec.pattern == .gups
    for i in 0..<spec.accesses {
        let a = gen.next()
        let w = Int((a.address.rawValue - spec.base.rawValue) / 8)
        let v = (i &+ 1) &* 0x9E37_79B9_7F4A_7C15
        if gups {
            let x = mem[w]
            readSum &+= x
            mem[w] = x ^ v
            writes += 1
        } else if a.kind == .write {
            mem[w] = v
            writes += 1
        } else {
            readSum &+= mem[w]
            reads += 1
        }
    }
    var h: UInt64 = 0
    for k in 0..<mem.count { h &+= mem[k] &* (2 &* UInt64(k) &+ 1) }
    return (readSum, h, reads, writes)
}

@Suite("KVM engine: pure parts (no /dev/kvm)", .serialized)
struct KVMPureTests {
    @Test("the guest image is a contiguous section with its entry and stubs inside")
    func image() {
        var img = memvirt_guest_image()
        memvirt_guest_image_get(&img)
        #expect(img.size > 256 && img.size < 64 << 10)
        #expect(img.entry_offset < img.size)
        #expect(img.trap_stubs_offset + 32 * 16 <= img.size)
        #expect(img.cpl0_loop_offset < img.size)
    }

    @Test("a synthetic KVM_EXIT_IO decodes to ioOut with port and data")
    func decodeIO() {
        let raw = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 8)
        defer { raw.deallocate() }
        raw.initializeMemory(as: UInt8.self, repeating: 0, count: 4096)
        let run = raw.assumingMemoryBound(to: kvm_run.self)
        run.pointee.exit_reason = UInt32(KVM_EXIT_IO)
        run.pointee.io.direction = UInt8(KVM_EXIT_IO_OUT)
        run.pointee.io.size = 4
        run.pointee.io.port = 0x10
        run.pointee.io.count = 1
        run.pointee.io.data_offset = 1024
        raw.storeBytes(of: UInt32(0xdead_beef), toByteOffset: 1024, as: UInt32.self)
        #expect(VCPUExit.decode(run) == .ioOut(port: 0x10, size: 4, data: 0xdead_beef))
        run.pointee.exit_reason = UInt32(KVM_EXIT_SHUTDOWN)
        #expect(VCPUExit.decode(run) == .shutdown)
        run.pointee.exit_reason = UInt32(KVM_EXIT_MMIO)
        run.pointee.mmio.phys_addr = 0xC000_0000
        run.pointee.mmio.is_write = 1
        run.pointee.mmio.len = 8
        #expect(VCPUExit.decode(run) == .mmio(address: GuestPhysicalAddress(rawValue: 0xC000_0000), isWrite: true, length: 8))
    }

    @Test("errors name the call and the errno")
    func errorText() {
        let e = KVMError.call("KVM_SET_USER_MEMORY_REGION(slot 3)", Errno(rawValue: 17))
        #expect(e.description == "KVM_SET_USER_MEMORY_REGION(slot 3) failed: EEXIST (File exists)")
    }
}

@Suite("KVM engine on /dev/kvm", .serialized, .enabled(if: KVM.isUsable, Comment(rawValue: kvmReason)))
struct KVMEngineTests {
    @Test("kvm run uniform 64MiB 2M: every page first-touched through KVM (pf_fixed >= 16384)")
    func acceptanceRun() async throws {
        let spec = WorkloadSpec(pattern: .uniform, footprint: .mib(64), accesses: 2_000_000, seed: 1)
        let r = try await KVMRunner.runAsync(spec)
        let c = r.result.counters
        #expect(c[.pfFixed] >= 16_384)
        #expect(c[.accesses] == 2_000_000)
        #expect(c[.guestPageFaults] == 0)
        #expect(r.result.engine == "kvm")
        #expect(r.result.json["counters"]?["pf_fixed"] != nil)
        #expect(r.vmStats["pages_4k"] >= 16_384)
    }

    @Test("the guest's checksums equal a host replay of AccessGenerator",
          arguments: ["uniform", "sequential", "strided:4160", "zipf:0.99", "chase", "gups"])
    func checksums(pattern: String) async throws {
        var spec = WorkloadSpec(pattern: try .init(parsing: pattern), footprint: .mib(8), accesses: 300_000, writeRatio: 0.3, seed: 7)
        if pattern == "sequential" { spec.writeRatio = 1 }
        var o = KVMRunOptions()
        o.verify = true
        let r = try await KVMRunner.runAsync(spec, options: o)
        let want = try oracle(spec)
        #expect(r.guests[0].readSum == want.readSum)
        #expect(r.guests[0].memoryChecksum == want.checksum)
        #expect(r.guests[0].reads == want.reads)
        #expect(r.guests[0].writes == want.writes)
        #expect(want.checksum != 0)
    }

    @Test("2M guest pages on THP-backed memory map the footprint with large pages")
    func hugePages() async throws {
        let spec = WorkloadSpec(pattern: .sequential, footprint: .mib(32), accesses: 524_288, writeRatio: 1, seed: 3)
        var o = KVMRunOptions()
        o.pageSize = .size2M
        o.transparentHugePages = true
        o.verify = true
        let r = try await KVMRunner.runAsync(spec, options: o)
        #expect(r.guests[0].memoryChecksum == (try oracle(spec)).checksum)
        // 16 large pages can need far fewer than 8192 faults; THP may not be available to all.
        print("THP run: pf_fixed \(r.result.counters[.pfFixed]), pages_2m \(r.vmStats["pages_2m"]), pages_4k \(r.vmStats["pages_4k"])")
    }

    /// Writes exactly the pages `pages` of the data slot and returns what the log reports.
    func writePages(_ g: GuestVM, _ pages: [UInt64]) throws {
        let base = g.layout.dataVirtual.rawValue
        try g.runtime.write(array: pages.map { base + $0 * 4096 }, at: GuestPhysicalAddress(rawValue: g.layout.list))
        var m = GuestVM.command(MEMVIRT_CMD_WRITE_LIST)
        m.list = g.layout.list
        m.list_len = UInt64(pages.count)
        try g.setMailbox(0, m)
        _ = try onDedicatedThread(name: "test-vcpu") { () throws(KVMError) in try g.execute(vcpu: 0) }
    }

    func chosen(_ k: Int, of n: UInt64, seed: UInt64) -> [UInt64] {
        var rng = SplitMix64(seed: seed)
        var s = Set<UInt64>()
        while s.count < k { s.insert(rng.bounded(n)) }
        return s.sorted()
    }

    @Test("dirty bitmap with manual protect: writing K chosen pages yields exactly those, twice")
    func dirtyBitmap() throws {
        var c = GuestConfig(dataSize: 64 << 20)
        c.dataSlotFlags = .logDirtyPages
        c.manualDirtyProtect = true
        c.listCapacity = 4096
        let g = try GuestVM(kvm: try KVM(), config: c)
        let log = try DirtyBitmapLog(vm: g.vm, slot: GuestLayout.dataSlot)
        #expect(try log.harvest().pages.isEmpty)
        for (round, k) in [(1, 1000), (2, 3000)] {
            let want = chosen(k, of: 16_384, seed: UInt64(round))
            try writePages(g, want)
            let h = try log.harvest()
            #expect(h.pages == want, "round \(round)")
            print("bitmap round \(round): \(h.pages.count) dirty, get \(h.harvestNanos / 1000) us, clear \(h.resetNanos / 1000) us")
        }
        #expect(try log.harvest().pages.isEmpty)
    }

    @Test("dirty ring: writing K chosen pages yields exactly those, twice, with ring-full exits")
    func dirtyRing() throws {
        var c = GuestConfig(dataSize: 64 << 20)
        c.dataSlotFlags = .logDirtyPages
        c.dirtyRingBytes = 64 << 10  // 4096 entries: the 6000-page round fills it
        c.listCapacity = 8192
        let g = try GuestVM(kvm: try KVM(), config: c)
        let ring = DirtyRingCollector(vm: g)
        g.onDirtyRingFull = { v throws(KVMError) in try ring.harvest(v) }
        for (round, k) in [(1, 1000), (2, 6000)] {
            let want = chosen(k, of: 16_384, seed: UInt64(round) + 10)
            try writePages(g, want)
            let h = try ring.finish()
            #expect(h.pages == want, "round \(round)")
            if k > 4096 { #expect(h.harvests >= 2) }
            print("ring round \(round): \(h.pages.count) dirty from \(h.entries) entries in \(h.harvests) harvests, scan \(h.harvestNanos / 1000) us, reset \(h.resetNanos / 1000) us")
        }
    }

    @Test("pager with a resident limit of 1/4 footprint: content intact, p50/p99 reported")
    func pagerResidentLimit() async throws {
        let spec = WorkloadSpec(pattern: .uniform, footprint: .mib(16), accesses: 20_000, writeRatio: 0.5, seed: 11)
        var o = KVMRunOptions()
        o.residentLimit = 4 << 20
        o.verify = true
        let r = try await KVMRunner.runAsync(spec, options: o)
        let want = try oracle(spec)
        let p = try #require(r.pager)
        #expect(r.guests[0].readSum == want.readSum)
        #expect(r.guests[0].memoryChecksum == want.checksum)
        #expect(p.evictions > 0 && p.storeReads > 0)
        #expect(p.peakResidentPages <= 1024)
        print("pager: faults \(p.faults), evictions \(p.evictions), store reads \(p.storeReads), p50 \(p.serviceNanos.valueAtPercentile(50) / 1000) us, p99 \(p.serviceNanos.valueAtPercentile(99) / 1000) us")
    }

    @Test("read-ahead on sequential access: fewer userfaultfd faults, per-page cost near a plain first touch")
    func pagerReadAhead() async throws {
        let spec = WorkloadSpec(pattern: .sequential, footprint: .mib(32), accesses: 524_288, seed: 1)
        let plain = try await KVMRunner.runAsync(spec)
        var o = KVMRunOptions()
        o.readAhead = 15
        let ra = try await KVMRunner.runAsync(spec, options: o)
        let p = try #require(ra.pager)
        #expect(p.faults <= 8192 / 16 + 64)
        let ratio = ra.result.wallSeconds / plain.result.wallSeconds
        print("read-ahead 15: \(p.faults) faults, wall \(ra.result.wallSeconds) s vs \(plain.result.wallSeconds) s plain (x\(ratio))")
        #expect(ratio < 2.0)
    }

    @Test("misbehaving guests end their VM with a clear report; the process goes on",
          arguments: ["port", "mmio", "triple"])
    func misbehaving(kind: String) throws {
        let g = try GuestVM(kvm: try KVM(), config: GuestConfig(dataSize: 1 << 20))
        var m: memvirt_mailbox
        switch kind {
        case "port": m = GuestVM.command(MEMVIRT_CMD_BAD_PORT)
        case "mmio":
            m = GuestVM.command(MEMVIRT_CMD_TOUCH_ADDRESS)
            m.list = GuestLayout.holeVirtual.rawValue
        default:
            m = GuestVM.command(MEMVIRT_CMD_TRIPLE_FAULT)
            m.list = GuestVM.tssRSP0(0).rawValue
            m.count = 0x20_0000_0000  // mapped by nothing
        }
        try g.setMailbox(0, m)
        do {
            _ = try onDedicatedThread(name: "test-vcpu") { () throws(KVMError) in try g.execute(vcpu: 0) }
            Issue.record("the guest should have been stopped")
        } catch {
            guard case .guest(let f) = error else { Issue.record("not a guest failure: \(error)"); return }
            print("\(kind): \(error)")
            switch (kind, f) {
            case ("port", .unknownPort(let port, _, _, _)): #expect(port == UInt16(MEMVIRT_PORT_UNKNOWN))
            case ("mmio", .outsideMemory(let a, let w, _)): #expect(a == GuestLayout.holePhysical && w)
            case ("triple", .tripleFault): break
            default: Issue.record("\(kind): unexpected \(f)")
            }
        }
        // The process goes on: a fresh VM runs.
        let ok = try await_free_run()
        #expect(ok)
    }

    func await_free_run() throws -> Bool {
        let g = try GuestVM(kvm: try KVM(), config: GuestConfig(dataSize: 1 << 20))
        var m = GuestVM.command(MEMVIRT_CMD_PING)
        m.count = 3
        try g.setMailbox(0, m)
        let o = try onDedicatedThread(name: "test-vcpu") { () throws(KVMError) in try g.execute(vcpu: 0) }
        return o.pings == 3
    }

    @Test("a saved vCPU state restored into a fresh VM runs on and gives the oracle's checksums")
    func saveRestore() throws {
        let kvm = try KVM()
        let spec = WorkloadSpec(pattern: .uniform, footprint: .mib(4), accesses: 100_000, writeRatio: 0.5, seed: 5)
        let a = try GuestVM(kvm: kvm, config: GuestConfig(dataSize: spec.footprint.rawValue))
        var ping = GuestVM.command(MEMVIRT_CMD_PING)
        ping.count = 1
        try a.setMailbox(0, ping)
        _ = try onDedicatedThread(name: "test-vcpu") { () throws(KVMError) in try a.execute(vcpu: 0) }
        let state = try a.vcpus[0].saveState()
        let b = try GuestVM(kvm: kvm, config: GuestConfig(dataSize: spec.footprint.rawValue))
        try b.runtime.write(UnsafeRawBufferPointer(start: a.runtime.mapping.base, count: Int(a.runtime.size)), at: GuestPhysicalAddress(rawValue: 0))
        try b.vcpus[0].restoreState(state)
        let back = try b.vcpus[0].saveState()
        #expect(back.regs.rip == state.regs.rip && back.regs.rsp == state.regs.rsp)
        #expect(back.sregs.cs.dpl == 3 && back.sregs.cr3 == state.sregs.cr3)
        #expect(back.msrs.count == state.msrs.count)
        let (m, _) = try KVMRunner.prepare(spec, thread: 0, layout: b.layout)
        var mm = m
        mm.command = UInt64(MEMVIRT_CMD_WORKLOAD.rawValue)
        try b.setMailbox(0, mm)
        _ = try onDedicatedThread(name: "test-vcpu") { () throws(KVMError) in try b.execute(vcpu: 0) }
        var sum = GuestVM.command(MEMVIRT_CMD_CHECKSUM)
        sum.base = b.layout.dataVirtual.rawValue
        sum.footprint = spec.footprint.rawValue
        try b.setMailbox(0, sum)
        _ = try onDedicatedThread(name: "test-vcpu") { () throws(KVMError) in try b.execute(vcpu: 0) }
        #expect(try b.mailbox(0).memory_checksum == (try oracle(spec)).checksum)
    }

    @Test("errors name the ioctl: an overlapping memory slot is refused with EEXIST")
    func overlappingSlot() throws {
        let g = try GuestVM(kvm: try KVM(), config: GuestConfig(dataSize: 1 << 20))
        let r = try GuestMemoryRegion(guestPhysical: GuestLayout.dataPhysical, size: 4096)
        #expect {
            try g.vm.addSlot(id: 7, region: r)
        } throws: { e in "\(e)".contains("KVM_SET_USER_MEMORY_REGION(slot 7)") && "\(e)".contains("EEXIST") }
    }

    @Test("kvm probe measures first touch, re-touch, userfaultfd, exit and CPL0 costs")
    func probe() throws {
        let p = try KVMProbe.run(pages: 1024)
        #expect(p.firstTouchNanos > p.retouchNanos)
        #expect(p.userfaultfdNanos > 0 && p.exitRoundTripNanos > 0 && p.emulatedInstructionNanos > 0)
        print(p.text)
    }
}
