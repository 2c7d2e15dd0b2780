import ArgumentParser
import Foundation
import MemVirtCore
import MemVirtExperiments
import MemVirtReport

/// `memvirt bench`: simulator speed beside a native loop over the same addresses, one run.
struct BenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "Simulated accesses per second (TLB-hit and walking streams) beside a native loop, measured in one run.",
        discussion: "Build with -c release for meaningful figures: swift build -c release && .build/release/memvirt bench")

    @Option(name: .long, help: "Accesses per TLB-hit stream, e.g. 20M.")
    var accesses: String = "20M"

    @Flag(name: .long, help: "Print one JSON object on stdout.")
    var json = false

    func run() throws {
        try reportingErrors(json: json) { try bench() }
    }

    func bench() throws {
        var c = SpeedBench.Config()
        do { c.accesses = try parseCount(accesses) } catch { throw CLIError(error.message) }
        c.walkAccesses = max(c.accesses / 4, 1)
        let (rows, j) = try SpeedBench(config: c).run()
        if json {
            print(j.rendered())
            return
        }
        var t = TextTable(header: ["stream", "accesses", "seconds", "accesses/s"])
        for r in rows { t.add([r.name, formatGrouped(r.accesses), formatFixed(r.seconds, digits: 3), formatGrouped(UInt64(r.rate))]) }
        print(t.rendered)
        if let s = j["tlb_hit_slowdown"] { print("tlb_hit_slowdown (native rate / simulated TLB-hit rate): \(s.rendered())") }
        #if DEBUG
        print("note: this is a debug build; use swift build -c release for real figures")
        #endif
    }
}
