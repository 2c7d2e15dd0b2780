import CKVM
import Foundation
import MemVirtCore
import Testing
@testable import MemVirtKVM

@Suite("Host memory budget and guest page sizes (no VM)")
struct HostMemoryBudgetTests {
    @Test("MemAvailable is read from a meminfo file, in bytes")
    func available() throws {
        let path = temporaryPath("meminfo")
        defer { unlink(path) }
        try "MemTotal:       24000000 kB\nMemFree:         1000 kB\nMemAvailable:   12345678 kB\nBuffers: 1 kB\n".write(toFile: path, atomically: true, encoding: .utf8)
        #expect(HostMemoryBudget.availableBytes(meminfo: path) == 12_345_678 * 1024)
        #expect(HostMemoryBudget.availableBytes(meminfo: "/nonexistent") == nil)
        // This host's: a number, and no more than MemTotal.
        let here = try #require(HostMemoryBudget.availableBytes())
        #expect(here > 0 && here <= UInt64(ProcessInfo.processInfo.physicalMemory))
    }

    @Test("a budget over the limit or over what the host has is refused with the numbers")
    func refusals() {
        let b = HostMemoryBudget(parts: [("guest data", 3 << 30), ("runtime", 2 << 20)])
        #expect(b.needBytes == (3 << 30) + (2 << 20))
        #expect(throws: Never.self) { try b.check("this run", limit: nil, available: 4 << 30) }
        #expect(throws: Never.self) { try b.check("this run", limit: b.needBytes, available: 4 << 30) }
        do { try b.check("this run", limit: 1 << 30, available: 4 << 30); Issue.record("accepted") } catch {
            #expect("\(error)" == "this run needs \(ByteCount(b.needBytes)) of host memory (guest data \(ByteCount(3 << 30)) + runtime \(ByteCount(2 << 20))), more than --memory-limit \(ByteCount(1 << 30)): refused")
        }
        do { try b.check("this run", limit: nil, available: 2 << 30); Issue.record("accepted") } catch {
            #expect("\(error)".contains("more than the \(ByteCount(2 << 30)) this host has available (MemAvailable"))
        }
        // Parts that overflow saturate (never wrap to a small need).
        #expect(HostMemoryBudget(parts: [("a", .max), ("b", 1)]).needBytes == .max)
    }

    @Test("1 GiB guest pages are refused up front without CPUID Page1GB, accepted with it")
    func pageSize1G() {
        #expect(throws: Never.self) { try KVMRunner.checkPageSize(.size1G, extendedFeatureEDX: 1 << 26) }
        #expect(throws: Never.self) { try KVMRunner.checkPageSize(.size2M, extendedFeatureEDX: 0) }
        for edx: UInt32? in [0, nil, ~(1 << 26)] {
            do { try KVMRunner.checkPageSize(.size1G, extendedFeatureEDX: edx); Issue.record("accepted \(String(describing: edx))") } catch {
                #expect("\(error)".contains("--page-size 1G"))
                #expect("\(error)".contains("Page1GB"))
            }
        }
    }
}

@Suite("KVM engine: run limits", .serialized, .enabled(if: KVM.isUsable, Comment(rawValue: kvmReason)))
struct KVMRunLimitTests {
    @Test("a footprint over the host's available memory or --memory-limit is refused before any VM, with the numbers")
    func memoryRefusals() throws {
        let avail = try #require(HostMemoryBudget.availableBytes())
        let huge = (avail / (1 << 30) + 2) << 30
        let spec = WorkloadSpec(pattern: .uniform, footprint: ByteCount(huge), accesses: 1000, writeRatio: 0.5, seed: 1)
        let t0 = monotonicNanoseconds()
        do { _ = try KVMRunner.run(spec); Issue.record("ran \(ByteCount(huge))") } catch {
            #expect("\(error)".contains("guest data \(ByteCount(huge))"))
            #expect("\(error)".contains("MemAvailable"))
        }
        // Refused before allocating or touching anything: well under a second.
        #expect(monotonicNanoseconds() - t0 < 1_000_000_000)
        var o = KVMRunOptions()
        o.memoryLimit = 8 << 20
        let small = WorkloadSpec(pattern: .uniform, footprint: .mib(16), accesses: 1000, writeRatio: 0.5, seed: 1)
        do { _ = try KVMRunner.run(small, options: o); Issue.record("ran over the limit") } catch {
            #expect("\(error)".contains("more than --memory-limit \(ByteCount(8 << 20))"))
        }
        o.memoryLimit = 64 << 20
        #expect(try KVMRunner.run(small, options: o).guests[0].accesses == 1000)
    }

    @Test("--max-run stops a guest that has not finished and fails the run, naming the limit", .timeLimit(.minutes(1)))
    func maxRun() throws {
        var o = KVMRunOptions()
        o.maxRunNanos = 100_000_000
        let endless = WorkloadSpec(pattern: .uniform, footprint: .mib(8), accesses: 1 << 50, writeRatio: 0.5, seed: 1, threads: 2)
        let t0 = monotonicNanoseconds()
        do { _ = try KVMRunner.run(endless, options: o); Issue.record("finished") } catch {
            #expect("\(error)" == "the guest did not finish within --max-run 100ms (2 of 2 vCPUs still running): stopped")
        }
        #expect(monotonicNanoseconds() - t0 < 10_000_000_000)
        // A run that finishes inside the limit is unaffected.
        o.maxRunNanos = 60_000_000_000
        let short = WorkloadSpec(pattern: .uniform, footprint: .mib(8), accesses: 100_000, writeRatio: 0.5, seed: 1)
        let r = try KVMRunner.run(short, options: o)
        #expect(r.guests[0].readSum == (try oracle(short)).readSum)
    }

    @Test("1 GiB guest pages: KVM's CPUID answer decides, and a run is refused up front where it lacks Page1GB")
    func pageSize1GOnThisHost() throws {
        let kvm = try KVM()
        let edx = try kvm.supportedCPUIDEntry(leaf: 0x8000_0001)?.edx
        let offered = (edx ?? 0) & (1 << 26) != 0
        print("KVM offers 1 GiB guest pages: \(offered)")
        if offered {
            #expect(throws: Never.self) { try KVMRunner.checkPageSize(.size1G, kvm: kvm) }
        } else {
            var o = KVMRunOptions()
            o.pageSize = .size1G
            do { _ = try KVMRunner.run(WorkloadSpec(pattern: .uniform, footprint: .gib(1), accesses: 10, writeRatio: 0, seed: 1), options: o); Issue.record("ran") } catch {
                #expect("\(error)".contains("Page1GB"))
            }
        }
    }
}
