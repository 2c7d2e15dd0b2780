import CKVM
import Foundation
import MemVirtCore
import MemVirtGuest
import Testing
@testable import MemVirtKVM

@Suite("Multiboot loader: what a refusal says")
struct MultibootMessageTests {
    @Test("each unmet requirement flag is named for what it is (bit 15 is reserved, not video mode)",
          arguments: [(UInt32(1 << 15), "bit 15: reserved requirement"), (UInt32(1 << 2), "bit 2: video mode information"),
                      (UInt32(1 << 2 | 1 << 9), "bit 2: video mode information; bit 9: reserved requirement")])
    func requirementNames(flags: UInt32, expected: String) {
        var b = Multiboot.runtimeImage()
        MultibootParsingTests.set32(&b, 0x64, flags)
        MultibootParsingTests.set32(&b, 0x68, UInt32(0) &- MultibootImage.magic &- flags)
        do { _ = try MultibootImage.parse(b); Issue.record("accepted") } catch {
            #expect("\(error)".contains("requires flags 0x\(String(flags, radix: 16)) (\(expected)"))
            if flags & 4 == 0 { #expect(!"\(error)".contains("video")) }
        }
    }
}

@Suite("Multiboot guests on /dev/kvm: messages and limits", .serialized, .enabled(if: KVM.isUsable, Comment(rawValue: kvmReason)))
struct MultibootLimitTests {
    @Test("the guest's error lines arrive whole (were cut at 40 bytes)")
    func wholeErrorText() throws {
        let image = try MultibootImage.parse(Multiboot.runtimeImage())
        let r = try Multiboot.run(image, memory: 16 << 20, cmdline: "pattern=zipf:0.99")
        #expect(r.exitValue == UInt64(MEMVIRT_MB_EXIT_BAD_INPUT))
        #expect(r.console.contains("memvirt-guest: error pattern (this image runs sequential, strided[:N], uniform, gups): zipf:0.99\n"))
        let rate = try Multiboot.run(image, memory: 16 << 20, cmdline: "rate=1000 footprint=4MiB")
        #expect(rate.console.contains("memvirt-guest: error rate= and gap-us= need tsc-khz=\n"))
    }

    @Test("--max-run stops a multiboot guest that does not power off, naming the limit", .timeLimit(.minutes(1)))
    func maxRun() throws {
        let image = try MultibootImage.parse(Multiboot.runtimeImage())
        let t0 = monotonicNanoseconds()
        do {
            _ = try Multiboot.run(image, memory: 16 << 20, cmdline: "pattern=uniform footprint=4MiB accesses=1000000000000", timeoutNanos: 300_000_000)
            Issue.record("powered off")
        } catch {
            #expect("\(error)".contains("did not power off (port 0xf4) within --max-run 300ms"))
        }
        #expect(monotonicNanoseconds() - t0 < 10_000_000_000)
    }

    @Test("guest RAM over --memory-limit is refused before the VM exists")
    func memoryLimit() throws {
        let image = try MultibootImage.parse(Multiboot.runtimeImage())
        do { _ = try Multiboot.run(image, memory: 64 << 20, cmdline: "", memoryLimit: 32 << 20); Issue.record("booted") } catch {
            #expect("\(error)" == "this multiboot guest needs \(ByteCount(64 << 20)) of host memory (guest RAM \(ByteCount(64 << 20))), more than --memory-limit \(ByteCount(32 << 20)): refused")
        }
    }
}
