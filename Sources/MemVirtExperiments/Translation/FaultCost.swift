import MemVirtCore
import MemVirtModel
import MemVirtReport

/// `fault-cost` (seed 000, VMware KB 1687): what a guest page fault costs natively, under
/// shadow paging and under nested paging, for soft faults (a fresh zeroed page) and hard faults
/// (a page read from the guest's disk): page faults per second, cycles per fault, and the
/// cycles spent in the virtualization layer (exits, hypervisor fault handling, emulation,
/// shadow synchronization, host page allocation).
public struct FaultCost: Experiment {
    public static let name = "fault-cost"
    public static let summary = "Soft and hard guest page faults: faults/s and virtualization-layer cycles, native vs shadow vs nested"
    let pages: UInt64

    public init(quick: Bool) { pages = quick ? 2_000 : 20_000 }

    public func run(progress: @Sendable (String) -> Void) throws -> ExperimentReport {
        var t = TextTable(header: ["fault", "paging", "costs", "cycles/fault", "virt. layer/fault", "virt. share", "exits/fault", "faults/s (1 vCPU)", "CPU at 50k faults/s"])
        var rows: [JSONValue] = []
        // The last row is this host (`reproduce --profile`; pvm-shadow by default), with its TLBs.
        let thisHost = Reproductions.thisHost
        let configs: [(PagingKind, CostModel, TLBConfig)] = [
            (.native, .bareMetal, .goldenCove), (.shadow, .vmxEPT, .goldenCove), (.nested, .vmxEPT, .goldenCove), (.shadow, thisHost.costs, thisHost.tlb),
        ]
        for hard in [false, true] {
            for (kind, costs, tlb) in configs {
                progress("\(Self.name): \(hard ? "hard" : "soft") faults, \(kind.rawValue), \(costs.name)")
                var c = ModelConfig()
                c.paging = kind
                c.costs = costs
                c.tlb = tlb
                c.fileBacked = hard
                // Every access touches a new page: every access is a guest fault.
                let spec = WorkloadSpec(pattern: .strided(stride: 4096), footprint: ByteCount(pages * 4096), accesses: pages, writeRatio: hard ? 0 : 1, seed: 1)
                let r = try ModelEngine.run(spec: spec, config: c)
                let faults = Double(r.counters[.guestPageFaults])
                let cycles = r.cycles ?? 0
                let virt = r.cycleBreakdown.filter { CostModel.virtualizationCategories.contains($0.0) }.map(\.1).reduce(0, +)
                let perFault = cycles / faults
                let virtPerFault = virt / faults
                let rate = costs.clockGHz * 1e9 / perFault
                let cpuAt50k = 50_000 * virtPerFault / (costs.clockGHz * 1e9) * 100
                let exitsPerFault = Double(r.counters[.exits]) / faults
                t.add([hard ? "hard" : "soft", kind.rawValue, costs.name, formatGrouped(UInt64(perFault)), formatGrouped(UInt64(virtPerFault)),
                       formatFixed(100 * virt / max(cycles, 1), digits: 1) + "%", formatFixed(exitsPerFault, digits: 2),
                       formatGrouped(UInt64(rate)), formatFixed(cpuAt50k, digits: 1) + "%"])
                rows.append(.object([
                    ("fault", .string(hard ? "hard" : "soft")), ("paging", .string(kind.rawValue)), ("costs", .string(costs.name)),
                    ("guest_page_faults", .uint(r.counters[.guestPageFaults])), ("cycles_per_fault", .double(perFault)),
                    ("virtualization_cycles_per_fault", .double(virtPerFault)), ("virtualization_share", .double(virt / max(cycles, 1))),
                    ("exits_per_fault", .double(exitsPerFault)), ("faults_per_second", .double(rate)),
                    ("virtualization_cpu_at_50k_faults_per_s", .double(cpuAt50k / 100)),
                    ("pf_fixed", .uint(r.counters[.pfFixed])), ("pf_guest", .uint(r.counters[.pfGuest])),
                ]))
            }
        }
        return ExperimentReport(
            name: Self.name, title: Self.summary, tables: [t],
            notes: [
                "VMware KB 1687: under shadow paging both soft and hard guest faults enter the virtualization layer; hard faults also wait for disk I/O; tens of thousands of faults per second slow a VM to a crawl. The last column is the CPU the virtualization layer alone would take at 50,000 faults/s.",
                "Soft fault: first write to a fresh anonymous page. Hard fault: first read of a file-backed page (a 4 KiB NVMe read, ~80 us, plus the virtio notify and completion exits under virtualization).",
                "\(thisHost.name) describes this host (`reproduce --profile`; the built-in pvm-shadow holds constants from a calibration of kvm_pvm on one machine on 2026-11-22, where a first touch cost ~12 us).",
            ],
            json: .object([("schema", "memvirt.reproduce/1"), ("name", .string(Self.name)), ("rows", .array(rows))]))
    }
}
