import MemVirtCore
import MemVirtModel
import MemVirtReport
import Testing

// Issue 17 defect 4: a huge --compute-per-access made the text report trap converting the cycle
// total (above 2^64) to UInt64, while --json worked. The report now prints such totals as
// numbers, and the same run's JSON and text agree on the total.
@Suite("Text report of huge cycle counts")
struct TextReportLargeCyclesTests {
    @Test("a run whose cycles exceed 2^64 prints its text report")
    func hugeComputePerAccess() throws {
        let spec = WorkloadSpec(pattern: .sequential, footprint: .kib(64), accesses: 100, computePerAccess: UInt64.max)
        let r = try ModelEngine.run(spec: spec, config: ModelConfig())
        let cycles = try #require(r.cycles)
        // 100 accesses x (2^64 - 1) compute cycles each: the oracle is the product itself.
        #expect(cycles >= 100 * 18_446_744_073_709_551_615.0)
        let text = TextReport.run(r)
        #expect(text.contains("total"))
        #expect(text.contains("e+21"), "\(text)")
    }

    @Test("cycles below 2^64 are still grouped whole numbers")
    func ordinaryCycles() throws {
        let r = try ModelEngine.run(spec: WorkloadSpec(pattern: .sequential, footprint: .kib(64), accesses: 1000), config: ModelConfig())
        let cycles = try #require(r.cycles)
        let text = TextReport.run(r)
        #expect(text.contains(formatGrouped(UInt64(cycles.rounded()))), "\(text)")
    }
}
