import MemVirtCore
import Testing

@testable import MemVirtModel

/// A host limit below what one access needs, with swap room left (it used to livelock:
/// "did not resolve after 64 faults").
@Suite("Host memory limit below one access's pages under nested paging")
struct HostLimitThrashingTests {
    /// Writes `pages` pages through a nested-paged guest whose host memory has `limitKiB` and
    /// `swapSlots`; returns the error message ("" if none) and the guest faults taken.
    func run(limitKiB: UInt64, swapSlots: Int, pages: UInt64) throws -> (String, UInt64) {
        let cpu = ModelCPU(tlb: .goldenCove, paging: PagingConfig(), costs: .bareMetal)
        let host = try HostMemory(capacity: 2 << 30, limit: .kib(limitKiB), swapDevice: .nvme, swapSlots: swapSlots)
        let nested = try NestedPaging(cpu: cpu, guestCapacity: 1 << 30, hostMemory: host)
        let kernel = SimulatedGuestKernel(memory: nested.guestMemory, capacity: 1 << 30, paging: cpu.paging)
        let space = try kernel.createAddressSpace()
        let m = Machine(mode: nested, cpu: cpu, kernel: kernel, space: space)
        m.switchAddressSpace(to: space)
        let va: UInt64 = 0x4000_0000
        try kernel.map(VirtualMemoryArea(start: va, end: va + (16 << 20), pageSize: .size4K, writable: true), in: space)
        var message = ""
        do {
            for p in 0..<pages { try m.step(Access(address: GuestVirtualAddress(va + p * 4096), kind: .write)) }
        } catch {
            message = "\(error)"
        }
        #expect(host.invariantViolations().isEmpty)
        return (message, m.finish()[.guestPageFaults])
    }

    @Test("16 KiB and 16 swap slots: a clear exhaustion error naming the limit and the 5 pages one access needs, not a retry livelock")
    func fourPagesSixteenSlots() throws {
        let (message, _) = try run(limitKiB: 16, swapSlots: 16, pages: 64)
        #expect(message.contains("host memory exhausted"), "got: \(message)")
        #expect(message.contains("16KiB"), "the limit is not named: \(message)")
        #expect(message.contains("5 guest pages one access needs"), "the need is not named: \(message)")
        #expect(!message.contains("did not resolve"), "still the livelock: \(message)")
    }

    @Test("A limit that holds one access's pages (with room for the clock) runs through, swapping")
    func enoughForOneAccess() throws {
        // 8 pages resident: the 4 guest tables of the walk, the data page, room to evict others.
        let (message, faults) = try run(limitKiB: 32, swapSlots: 4096, pages: 64)
        #expect(message == "", "got: \(message)")
        #expect(faults == 64)
    }

    @Test("Swap full: still the out-of-memory error, not the thrashing one")
    func swapFull() throws {
        let (message, _) = try run(limitKiB: 256, swapSlots: 1, pages: 4096)
        #expect(message.contains("host memory exhausted"), "got: \(message)")
        #expect(message.contains("(and swap)"), "not the swap-full path: \(message)")
    }
}
