import MemVirtCore
import Testing

@testable import MemVirtModel

/// A nested-paging guest with `pages` 4 KiB pages mapped and written once (guest PTEs' A and D
/// set, so later writes to them make no guest-table writes), its tracker, and the gfn of each page.
func trackedGuest(_ mode: DirtyTrackingMode, pages: Int) throws -> (MigrationGuest, NestedDirtyTracker, NestedPaging, [UInt64]) {
    let spec = WorkloadSpec(pattern: .sequential, footprint: ByteCount(UInt64(pages) * 4096), accesses: .max, writeRatio: 1, seed: 1)
    let guest = try MigrationGuest(tracking: mode, spec: spec, guestCapacity: 1 << 30)
    let tracker = try #require(guest.tracker as? NestedDirtyTracker)
    let nested = try #require(guest.machine.pagingMode as? NestedPaging)
    var gfns: [UInt64] = []
    for p in 0..<pages {
        let va = spec.base.rawValue + UInt64(p) * 4096
        let leaf = try #require(guest.machine.kernel.lookupLeaf(va, space: guest.machine.space))
        gfns.append(leaf.entry.pageBase(.size4K) >> 12)
    }
    return (guest, tracker, nested, gfns)
}

func writePage(_ guest: MigrationGuest, _ p: Int) throws {
    try guest.machine.step(Access(address: GuestVirtualAddress(guest.spec.base.rawValue + UInt64(p) * 4096 + 8), kind: .write))
}

func eptLeaf(_ nested: NestedPaging, _ gfn: UInt64) throws -> EPTEntry {
    EPTEntry(rawValue: nested.host.read64(try #require(nested.leafAddress(gfn: gfn))))
}

@Suite("EPT log-dirty as a mechanism: write protection, PML log, dirty ring")
struct NestedDirtyTrackingTests {
    @Test("ept-wp: K distinct writes are K EPT violations at the writes; W cleared again after the harvest")
    func writeProtect() throws {
        let k = 300
        let (guest, tracker, nested, gfns) = try trackedGuest(.nestedWriteProtect, pages: 400)
        let cpu = guest.cpu
        let costs = DirtyTrackingCosts()
        tracker.startLogging(cpu: cpu, method: .bitmap, groupSize: 1, costs: costs)
        for g in gfns {
            let e = try eptLeaf(nested, g)
            #expect(!e.isWritable && e.rawValue & NestedPaging.logDirtyWriteProtected != 0, "leaf of gfn \(g) not write-protected at enable")
        }
        let perFault = cpu.costs.vmExitRoundTrip + costs.writeProtectFault
        for p in 0..<k {
            let before = cpu.ledger.total
            let exits = cpu.counters[.exits]
            try writePage(guest, p)
            // The violation is handled at the write: counted, and the clock advanced by it.
            #expect(tracker.trackingStats.writeFaults == UInt64(p + 1))
            #expect(cpu.counters[.exits] == exits + 1)
            #expect(cpu.ledger.total - before >= perFault)
            // A second write to the same page does not fault again.
            try writePage(guest, p)
            #expect(tracker.trackingStats.writeFaults == UInt64(p + 1))
        }
        #expect(tracker.trackingStats.writeFaultCycles == Double(k) * perFault)
        let dirty = tracker.harvest(cpu: cpu)
        #expect(dirty == Array(gfns[0..<k]).sorted())
        for g in gfns {
            let e = try eptLeaf(nested, g)
            #expect(!e.isWritable && !e.isDirty, "gfn \(g) writable or dirty after the harvest")
        }
        // The next round faults again, and only on what it writes.
        try writePage(guest, 0)
        #expect(tracker.trackingStats.writeFaults == UInt64(k + 1))
        #expect(tracker.harvest(cpu: cpu) == [gfns[0]])
    }

    @Test("ept-wp with page groups: one fault per group written; the group's pages are dirty")
    func writeProtectGroups() throws {
        let (guest, tracker, _, gfns) = try trackedGuest(.nestedWriteProtect, pages: 256)
        tracker.startLogging(cpu: guest.cpu, method: .bitmap, groupSize: 16, costs: DirtyTrackingCosts())
        var expected = Set<UInt64>()
        var groups = Set<UInt64>()
        for p in stride(from: 0, to: 256, by: 5) {
            try writePage(guest, p)
            groups.insert(gfns[p] / 16)
        }
        #expect(tracker.trackingStats.writeFaults == UInt64(groups.count))
        // Every backed page of a written group (data or guest page table) is reported.
        for g in tracker.backedFrames() where groups.contains(g / 16) { expected.insert(g) }
        #expect(tracker.harvest(cpu: guest.cpu) == expected.sorted())
    }

    @Test("ept-pml: floor(K/512) log-full exits by the K-th page written; the dirty set is the pages written",
          arguments: [511, 512, 1300])
    func pml(_ k: Int) throws {
        let (guest, tracker, nested, gfns) = try trackedGuest(.nestedPML, pages: k + 10)
        let costs = DirtyTrackingCosts()
        tracker.startLogging(cpu: guest.cpu, method: .bitmap, groupSize: 1, costs: costs)
        for p in 0..<k {
            try writePage(guest, p)
            #expect(tracker.trackingStats.logFullExits == UInt64((p + 1) / costs.pmlEntries), "after \(p + 1) pages")
        }
        #expect(nested.cur.pml.count == k % costs.pmlEntries)
        #expect(tracker.trackingStats.writeFaults == 0)
        #expect(tracker.harvest(cpu: guest.cpu) == Array(gfns[0..<k]).sorted())
        #expect(nested.cur.pml.isEmpty)
        for g in gfns { #expect(try !eptLeaf(nested, g).isDirty) }
    }

    @Test("Dirty ring: a vCPU exits each time its ring reaches the soft limit, at the write")
    func ringFull() throws {
        var costs = DirtyTrackingCosts()
        costs.ringSoftFull = 100
        let (guest, tracker, _, gfns) = try trackedGuest(.nestedWriteProtect, pages: 350)
        tracker.startLogging(cpu: guest.cpu, method: .ring, groupSize: 1, costs: costs)
        for p in 0..<350 {
            try writePage(guest, p)
            #expect(tracker.trackingStats.logFullExits == UInt64((p + 1) / 100), "after \(p + 1) pages")
        }
        #expect(tracker.harvest(cpu: guest.cpu) == gfns.sorted())
    }

    @Test("A write to a read-only leaf without the log-dirty bit is a host fault, not the fast path")
    func hostFaultIsNotWriteProtectFault() throws {
        let (guest, tracker, nested, gfns) = try trackedGuest(.nestedWriteProtect, pages: 8)
        tracker.startLogging(cpu: guest.cpu, method: .bitmap, groupSize: 1, costs: DirtyTrackingCosts())
        // Page 3's leaf: read-only for the host (as a KSM-merged page is), not for logging.
        let ea = try #require(nested.leafAddress(gfn: gfns[3]))
        nested.host.write64(ea, nested.host.read64(ea) & ~NestedPaging.logDirtyWriteProtected)
        #expect(!nested.writeProtectFault(gfns[3] << 12))
        #expect(nested.writeProtectFault(gfns[4] << 12))
    }
}
