import Foundation
import MemVirtCore
import MemVirtGuest
import Testing
@testable import MemVirtKVM

/// The guest runtime as a multiboot image: parsing and refusals (no KVM needed), booting it
/// under MemVirt against the oracle, migrating it, and the same image under QEMU.
@Suite("Multiboot images: parsing and refusals")
struct MultibootParsingTests {
    static func u32(_ v: UInt32) -> [UInt8] { (0..<4).map { UInt8(truncatingIfNeeded: v >> (8 * $0)) } }
    static func set32(_ b: inout [UInt8], _ at: Int, _ v: UInt32) { for k in 0..<4 { b[at + k] = UInt8(truncatingIfNeeded: v >> (8 * UInt32(k))) } }

    @Test("the runtime image is an ELF32 multiboot image entered inside its one segment")
    func runtimeImage() throws {
        let img = try MultibootImage.parse(Multiboot.runtimeImage())
        #expect(img.format == "elf32")
        #expect(img.headerOffset == 0x60)
        #expect(img.segments.count == 1)
        let s = img.segments[0]
        #expect(s.address == Multiboot.loadAddress)
        #expect(UInt64(img.entry) > s.address && UInt64(img.entry) < s.address + s.memorySize)
    }

    @Test("a file with no header is refused, saying so (and that an ELF64 is not multiboot v1)")
    func notMultiboot() {
        var rng = SplitMix64(seed: 3)
        let junk = (0..<10_000).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
        #expect(throws: KVMError.self) { try MultibootImage.parse(junk, name: "junk.bin") }
        do { _ = try MultibootImage.parse(junk, name: "junk.bin"); Issue.record("accepted") } catch {
            #expect("\(error)".contains("junk.bin: not a multiboot image"))
        }
        var elf64 = [UInt8](repeating: 0, count: 9000)
        elf64[0...4] = [0x7f, 0x45, 0x4c, 0x46, 2]
        do { _ = try MultibootImage.parse(elf64, name: "vmlinux"); Issue.record("accepted") } catch {
            #expect("\(error)".contains("64-bit ELF"))
        }
        do { _ = try MultibootImage.parse([1, 2, 3]); Issue.record("accepted") } catch {
            #expect("\(error)".contains("not a multiboot image"))
        }
    }

    @Test("a bad checksum is refused with the header's offset and the sum")
    func badChecksum() {
        var b = Multiboot.runtimeImage()
        b[0x68] ^= 1
        do { _ = try MultibootImage.parse(b, name: "img"); Issue.record("accepted") } catch {
            let s = "\(error)"
            #expect(s.contains("bad checksum") && s.contains("offset 0x60") && s.contains("must be 0"))
        }
    }

    @Test("a required flag the loader cannot meet (video mode) is refused")
    func videoFlag() {
        var b = Multiboot.runtimeImage()
        let flags: UInt32 = 0x7
        Self.set32(&b, 0x64, flags)
        Self.set32(&b, 0x68, UInt32(0) &- MultibootImage.magic &- flags)
        do { _ = try MultibootImage.parse(b); Issue.record("accepted") } catch {
            #expect("\(error)".contains("requires flags 0x4"))
        }
    }

    /// The runtime image re-wrapped with the a.out kludge: a 4 KiB header page loaded just
    /// below the segment (load_addr = 0xFF000), the header's own addresses, no ELF.
    static func aoutImage() -> [UInt8] {
        let elf = Multiboot.runtimeImage()
        let seg = Array(elf[Multiboot.segmentFileOffset...])
        let entry = UInt32(try! MultibootImage.parse(elf).entry)
        let load: UInt32 = 0xFF000
        var f = [UInt8](repeating: 0, count: 0x1000)
        let flags: UInt32 = 0x1_0003
        let header = [MultibootImage.magic, flags, UInt32(0) &- MultibootImage.magic &- flags, load + 0x40, load, load + 0x1000 + UInt32(seg.count), 0, entry]
        for (i, v) in header.enumerated() { set32(&f, 0x40 + 4 * i, v) }
        return f + seg
    }

    @Test("the a.out kludge is parsed from the header's addresses")
    func aout() throws {
        let img = try MultibootImage.parse(Self.aoutImage())
        #expect(img.format == "a.out kludge")
        #expect(img.segments.count == 1 && img.segments[0].address == 0xFF000)
        var bad = Self.aoutImage()
        Self.set32(&bad, 0x40 + 20, 0x100)  // load_end_addr before load_addr
        #expect(throws: KVMError.self) { try MultibootImage.parse(bad) }
    }
}

/// read_sum and memory_checksum from the oracle (KVMTests.swift) for thread 0.
func multibootOracle(_ spec: WorkloadSpec) throws -> (readSum: UInt64, checksum: UInt64) {
    let o = try oracle(spec)
    return (o.readSum, o.checksum)
}

@Suite("Multiboot images on /dev/kvm", .serialized, .enabled(if: KVM.isUsable, Comment(rawValue: kvmReason)))
struct MultibootKVMTests {
    static let path: String = {
        let p = NSTemporaryDirectory() + "/memvirt-test-\(getpid()).elf"
        FileManager.default.createFile(atPath: p, contents: Data(Multiboot.runtimeImage()))
        return p
    }()

    @Test("the image boots under MemVirt and gives the oracle's read_sum and memory_checksum",
          arguments: ["uniform", "gups", "sequential", "strided:4160"])
    func boots(pattern: String) throws {
        var spec = WorkloadSpec(pattern: try .init(parsing: pattern), footprint: .mib(8), accesses: 300_000, writeRatio: 0.3, seed: 11)
        if pattern == "sequential" { spec.writeRatio = 1 }
        let image = try Multiboot.read(path: Self.path)
        let r = try Multiboot.run(image, memory: 32 << 20, cmdline: Self.path + " " + (try Multiboot.commandLine(spec)))
        let want = try multibootOracle(spec)
        #expect(r.exitValue == 0)
        #expect(r.result["read_sum"] == want.readSum)
        #expect(r.result["memory_checksum"] == want.checksum)
        #expect(r.result["accesses"] == spec.accesses)
        // The boot path is tiny: a few hundred emulated instructions, not thousands.
        #expect(r.vcpuStats["insn_emulation"] < 5_000)
    }

    @Test("write-ratio text becomes WorkloadSpec.writeThreshold exactly", arguments: [0.3, 0.1, 0.7, 0.999, 1e-3, 0.123456789])
    func writeRatio(ratio: Double) throws {
        let spec = WorkloadSpec(pattern: .uniform, footprint: .mib(4), accesses: 20_000, writeRatio: ratio, seed: 2)
        let image = try Multiboot.read(path: Self.path)
        let r = try Multiboot.run(image, memory: 16 << 20, cmdline: try Multiboot.commandLine(spec))
        #expect(r.console.contains("write_threshold=\(spec.writeThreshold) "))
        #expect(r.result["memory_checksum"] == (try multibootOracle(spec)).checksum)
    }

    @Test("the a.out-kludge wrapping of the same code boots to the same result")
    func aoutBoots() throws {
        let spec = WorkloadSpec(pattern: .uniform, footprint: .mib(8), accesses: 100_000, writeRatio: 0.5, seed: 4)
        let image = try MultibootImage.parse(MultibootParsingTests.aoutImage())
        let r = try Multiboot.run(image, memory: 32 << 20, cmdline: try Multiboot.commandLine(spec))
        #expect(r.result["memory_checksum"] == (try multibootOracle(spec)).checksum)
    }

    @Test("segments outside guest RAM and bad command lines are refused with clear errors")
    func refusals() throws {
        var b = Multiboot.runtimeImage()
        // p_paddr of the one PT_LOAD (program header at 52, paddr at +12) -> 1 GiB.
        MultibootParsingTests.set32(&b, 52 + 12, 0x4000_0000)
        let outside = try MultibootImage.parse(b)
        do { _ = try Multiboot.run(outside, memory: 64 << 20, cmdline: ""); Issue.record("booted") } catch {
            #expect("\(error)".contains("outside guest RAM"))
        }
        do { _ = try Multiboot.run(try MultibootImage.parse(Multiboot.runtimeImage()), memory: 1 << 20, cmdline: ""); Issue.record("booted") } catch {
            #expect("\(error)".contains("guest memory"))
        }
        let image = try Multiboot.read(path: Self.path)
        let zipf = try Multiboot.run(image, memory: 16 << 20, cmdline: "pattern=zipf:0.99")
        #expect(zipf.exitValue == UInt64(MEMVIRT_MB_EXIT_BAD_INPUT))
        #expect(zipf.console.contains("error pattern"))
        let big = try Multiboot.run(image, memory: 16 << 20, cmdline: "footprint=64MiB")
        #expect(big.exitValue == UInt64(MEMVIRT_MB_EXIT_BAD_INPUT))
        #expect(big.console.contains("does not fit in RAM"))
        let key = try Multiboot.run(image, memory: 16 << 20, cmdline: "footprnt=4MiB")
        #expect(key.console.contains("error unknown key: footprnt=4MiB"))
        do { _ = try Multiboot.read(path: "/nonexistent/kernel"); Issue.record("read") } catch {
            #expect("\(error)".contains("cannot open kernel '/nonexistent/kernel'"))
        }
    }

    /// CPU 0's and CPU 1's results in `console` against the oracle (CPU 1: seed + 1).
    static func bothCPUsEqualOracle(_ console: String, _ spec: WorkloadSpec) throws -> Bool {
        var s1 = spec
        s1.seed += 1
        let w0 = try multibootOracle(spec), w1 = try multibootOracle(s1)
        let r0 = MultibootRunReport.parseResult(console), r1 = MultibootRunReport.parseResult(console, cpu: 1)
        return r0["read_sum"] == w0.readSum && r0["memory_checksum"] == w0.checksum && r1["read_sum"] == w1.readSum && r1["memory_checksum"] == w1.checksum
            && r1["accesses"] == spec.accesses
    }

    @Test("with vcpus=2 the image starts its second vCPU (INIT/SIPI through KVM's LAPIC); both CPUs give the oracle's result")
    func twoVCPUs() throws {
        let spec = WorkloadSpec(pattern: .uniform, footprint: .mib(8), accesses: 200_000, writeRatio: 0.5, seed: 21)
        let image = try Multiboot.read(path: Self.path)
        let r = try Multiboot.run(image, memory: 64 << 20, cmdline: Self.path + " " + (try Multiboot.commandLine(spec, vcpus: 2)), vcpus: 2)
        #expect(r.exitValue == 0, "\(r.console)")
        #expect(try Self.bothCPUsEqualOracle(r.console, spec), "\(r.console)")
        // The same command line in a 1-vCPU VM (no irqchip, no LAPIC): a clear error, no hang.
        #expect(throws: KVMError.self) {
            _ = try Multiboot.run(image, memory: 64 << 20, cmdline: Self.path + " " + (try Multiboot.commandLine(spec, vcpus: 2)), timeoutNanos: 60_000_000_000)
        }
        #expect(throws: KVMError.self) { _ = try Multiboot.config(memory: 64 << 20, vcpus: 3) }
    }

    @Test("MemVirt migrates a running 2-vCPU image; both CPUs finish with the oracle's result")
    func migratesTwoVCPUs() throws {
        let spec = WorkloadSpec(pattern: .uniform, footprint: .mib(16), accesses: 12_000, writeRatio: 1, seed: 5)
        let khz = try Multiboot.hostTSCKHz()
        let line = try Multiboot.commandLine(spec, rate: 10_000, tscKHz: khz, gapMicros: 1000, vcpus: 2)
        var o = MigrationOptions()
        o.afterNanos = 300_000_000
        let image = try Multiboot.read(path: Self.path)
        let (s, d) = try LiveMigration.migrateLocally(kernel: image, memory: 64 << 20, cmdline: line, options: o, vcpus: 2)
        #expect(s.migrated && s.error == nil)
        #expect(s.sourceHash != nil && s.sourceHash == s.destinationHash)
        #expect(try Self.bothCPUsEqualOracle(d.console ?? "", spec), "\(d.console ?? "")")
    }

    @Test("MemVirt migrates the running image; the destination finishes it with the oracle's result")
    func migrates() throws {
        let spec = WorkloadSpec(pattern: .uniform, footprint: .mib(16), accesses: 24_000, writeRatio: 0.6, seed: 5)
        let khz = try Multiboot.hostTSCKHz()
        let line = try Multiboot.commandLine(spec, rate: 20_000, tscKHz: khz, gapMicros: 1000)
        var o = MigrationOptions()
        o.afterNanos = 300_000_000
        let image = try Multiboot.read(path: Self.path)
        let (s, d) = try LiveMigration.migrateLocally(kernel: image, memory: 64 << 20, cmdline: line, options: o)
        let want = try multibootOracle(spec)
        #expect(s.migrated && s.error == nil)
        #expect(s.sourceHash != nil && s.sourceHash == s.destinationHash)
        #expect(d.guest.first?.readSum == want.readSum)
        #expect(d.guest.first?.memoryChecksum == want.checksum)
        #expect(d.console?.contains("memvirt-guest: result") == true)
        #expect(s.downtimeNanos != nil)
    }
}

let qemuReason = QEMU.unavailableReason.map { "needs qemu-system-x86_64 and a usable /dev/kvm: \($0)" } ?? ""

@Suite("The same image under QEMU", .serialized, .enabled(if: QEMU.unavailableReason == nil, Comment(rawValue: qemuReason)))
struct MultibootQEMUTests {
    @Test("qemu-system-x86_64 -kernel prints the same read_sum and memory_checksum as MemVirt and the oracle")
    func sameResult() throws {
        let spec = WorkloadSpec(pattern: .uniform, footprint: .mib(16), accesses: 500_000, writeRatio: 0.3, seed: 9)
        let line = try Multiboot.commandLine(spec)
        let q = try QEMU.run(kernel: MultibootKVMTests.path, append: line, memory: 64 << 20, timeoutNanos: 60_000_000_000)
        let m = try Multiboot.run(try Multiboot.read(path: MultibootKVMTests.path), memory: 64 << 20, cmdline: MultibootKVMTests.path + " " + line)
        let want = try multibootOracle(spec)
        #expect(q.finished, "QEMU exit \(String(describing: q.exitStatus)): \(q.stderr)")
        #expect(q.result["read_sum"] == want.readSum)
        #expect(q.result["memory_checksum"] == want.checksum)
        #expect(q.result["read_sum"] == m.result["read_sum"])
        #expect(q.result["memory_checksum"] == m.result["memory_checksum"])
    }

    @Test("QEMU live-migrates the image over loopback (QMP) and its destination reaches the oracle's result")
    func qemuMigrates() throws {
        let spec = WorkloadSpec(pattern: .uniform, footprint: .mib(16), accesses: 20_000, writeRatio: 1, seed: 6)
        let khz = try Multiboot.hostTSCKHz()
        let line = try Multiboot.commandLine(spec, rate: 10_000, tscKHz: khz, gapMicros: 1000)
        let q = try QEMU.migrate(kernel: MultibootKVMTests.path, append: line, memory: 64 << 20, afterNanos: 300_000_000, timeoutNanos: 60_000_000_000)
        #expect(q.status == "completed", "\(q.raw) \(q.error ?? "")")
        #expect(q.totalMillis != nil && q.downtimeMillis != nil && (q.ramTransferred ?? 0) > 0)
        #expect(q.result["memory_checksum"] == (try multibootOracle(spec)).checksum)
    }

    @Test("with -smp 2 and vcpus=2 the image starts its second CPU under QEMU too; both give the oracle's result")
    func twoVCPUs() throws {
        let spec = WorkloadSpec(pattern: .uniform, footprint: .mib(8), accesses: 200_000, writeRatio: 0.5, seed: 21)
        let q = try QEMU.run(kernel: MultibootKVMTests.path, append: try Multiboot.commandLine(spec, vcpus: 2), memory: 64 << 20, vcpus: 2, timeoutNanos: 60_000_000_000)
        #expect(q.finished, "QEMU exit \(String(describing: q.exitStatus)): \(q.stderr) \(q.console)")
        #expect(try MultibootKVMTests.bothCPUsEqualOracle(q.console, spec), "\(q.console)")
    }

    @Test("migrate-set-parameters sets max-bandwidth and downtime-limit; query-migrate-parameters reads them back")
    func parameters() throws {
        let wanted = QEMU.MigrationSettings(maxBandwidth: 3 << 30, downtimeLimitMillis: 30)
        let (defaults, applied) = try QEMU.checkParameters(wanted, kernel: MultibootKVMTests.path)
        // QEMU's own defaults, as its source states them (migration.c: MAX_THROTTLE 128 MiB/s,
        // DEFAULT_MIGRATE_SET_DOWNTIME 300 ms), are what an untouched QEMU reports.
        #expect(defaults == QEMU.MigrationSettings(maxBandwidth: 128 << 20, downtimeLimitMillis: 300))
        #expect(defaults == .qemuDefaults)
        #expect(applied == wanted)
        // A value QEMU refuses (downtime-limit above its 2,000 s maximum) is an error naming QMP.
        #expect(throws: KVMError.self) {
            _ = try QEMU.checkParameters(QEMU.MigrationSettings(maxBandwidth: 1 << 20, downtimeLimitMillis: 3_000_000), kernel: MultibootKVMTests.path)
        }
    }

    @Test("a QEMU migration runs at the settings it was given (read back before migrate)")
    func migratesAtSettings() throws {
        let spec = WorkloadSpec(pattern: .uniform, footprint: .mib(16), accesses: 20_000, writeRatio: 1, seed: 6)
        let khz = try Multiboot.hostTSCKHz()
        let line = try Multiboot.commandLine(spec, rate: 10_000, tscKHz: khz, gapMicros: 1000)
        let tight = QEMU.MigrationSettings(maxBandwidth: 1 << 40, downtimeLimitMillis: 30)
        let q = try QEMU.migrate(kernel: MultibootKVMTests.path, append: line, memory: 64 << 20, afterNanos: 300_000_000, settings: tight, timeoutNanos: 60_000_000_000)
        #expect(q.status == "completed", "\(q.raw) \(q.error ?? "")")
        #expect(q.settings == tight)
        #expect(q.json["max_bandwidth"] == .uint(1 << 40) && q.json["downtime_limit_ms"] == .uint(30))
        #expect(q.result["memory_checksum"] == (try multibootOracle(spec)).checksum)
    }
}
