import Foundation
import MemVirtCore
import MemVirtExperiments
import MemVirtReport
import Testing

func temporaryDirectory(_ tag: String) -> String {
    let d = NSTemporaryDirectory() + "memvirt-sweep-\(tag)-\(getpid())-\(UInt64.random(in: 0...UInt64.max))"
    try? FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true)
    return d
}

func lines(_ path: String) -> [String] {
    ((try? String(contentsOfFile: path, encoding: .utf8)) ?? "").split(separator: "\n").map(String.init)
}

/// A stand-in for `memvirt run --config F --json`: a shell that prints counters computed from
/// the scenario's text (its byte count and its seed line), appends to a log, and fails when
/// the scenario says `seed = 13`.
func fakeRun(log: String) -> @Sendable (String) -> [String] {
    { scenario in
        ["/bin/sh", "-c", """
            echo "$1" >> '\(log)'
            seed=$(sed -n 's/^seed = //p' "$1")
            if [ "$seed" = 13 ]; then echo "bad seed 13" >&2; exit 3; fi
            printf '{"schema":"memvirt.run/1","engine":"fake","counters":{"accesses":%s,"bytes":%s},"cycles":%s.5,"wall_seconds":0.1}\\n' "$seed" $(wc -c < "$1") $((seed * 7))
            """, "sh", scenario]
    }
}

@Suite("Sweep runs, status, merge and Slurm scripts", .serialized)
struct SweepRunnerTests {
    static let text = """
        [base]
        workload.pattern = "uniform"
        [axes]
        platform.paging = ["native", "nested"]
        workload.seed = [1, 2, 13]
        """

    @Test("Results are written whole, skipped when present; a failure keeps stderr in <ID>.err")
    func atomicAndSkip() throws {
        let dir = temporaryDirectory("run")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let log = dir + "-calls.log"
        defer { unlink(log) }
        let plan = try SweepPlan(file: SweepFile(text: Self.text, path: "t.toml"))
        let runner = try SweepRunner(plan: plan, out: dir, command: fakeRun(log: log))
        let first = try runner.runSequentially(plan.points)
        #expect(first.count == 6)
        for (p, o) in zip(plan.points, first) {
            let seed = p.values[1].description
            if seed == "13" {
                guard case .failed(let why) = o else { Issue.record("point \(p.id) should fail"); continue }
                #expect(why.contains("bad seed 13"))
                #expect(!FileManager.default.fileExists(atPath: runner.resultPath(p)))
                let err = try String(contentsOfFile: runner.errorPath(p), encoding: .utf8)
                #expect(err.contains("bad seed 13") && err.contains("exit status 3"), "\(err)")
            } else {
                #expect(o == .ran)
                let v = try JSONReader.parse(try String(contentsOfFile: runner.resultPath(p), encoding: .utf8))
                #expect(v["schema"]?.asString == SweepRunner.resultSchema)
                #expect(v["id"]?.asString == p.id)
                #expect(v["scenario"]?.asString == p.scenario)
                #expect(v["result"]?["counters"]?["accesses"]?.asDouble == Double(seed))
                #expect(v["result"]?["counters"]?["bytes"]?.asDouble == Double(p.scenario.utf8.count))
                #expect(v["axes"]?["platform.paging"]?.asString == p.values[0].description)
            }
        }
        #expect(lines(log).count == 6)
        // No temporary file is left behind.
        let work = try FileManager.default.contentsOfDirectory(atPath: dir + "/.work")
        #expect(!work.contains { $0.contains(".tmp.") || $0.hasSuffix(".out") || $0.hasSuffix(".stderr") }, "\(work)")
        // Again: the four done points are skipped (not run: the call log does not grow), the failed two are retried.
        let inode = { (p: SweepPoint) in (try? FileManager.default.attributesOfItem(atPath: runner.resultPath(p))[.systemFileNumber]) as? UInt64 }
        let before = plan.points.map(inode)
        let second = try runner.runSequentially(plan.points)
        #expect(second.filter { $0 == .present }.count == 4)
        #expect(lines(log).count == 8)
        #expect(plan.points.map(inode) == before)
        let st = SweepStatus(plan: plan, out: dir)
        #expect(st.done.count == 4 && st.failed.count == 2 && st.missing.isEmpty)
        // runs.log: a line per finished run, done or failed.
        let runs = lines(dir + "/runs.log")
        #expect(runs.filter { $0.hasPrefix("done ") }.count == 4)
        #expect(runs.filter { $0.hasPrefix("failed ") }.count == 4)
    }

    @Test("A run killed after writing its result but before its runs.log line: the next run logs it once, from the result file")
    func unloggedResult() throws {
        let dir = temporaryDirectory("unlogged")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let log = dir + "-calls.log"
        defer { unlink(log) }
        let plan = try SweepPlan(file: SweepFile(text: Self.text, path: "t.toml"))
        let ok = Array(plan.points.filter { $0.values[1].description != "13" })
        let runner = try SweepRunner(plan: plan, out: dir, command: fakeRun(log: log))
        #expect(try runner.runSequentially(ok) == Array(repeating: .ran, count: ok.count))
        let logged = lines(dir + "/runs.log")
        #expect(logged.count == ok.count)
        // The window a SIGKILL can hit: the result renamed into place, its line not yet appended.
        let lost = logged[1]
        try (logged.filter { $0 != lost }.joined(separator: "\n") + "\n").write(toFile: dir + "/runs.log", atomically: true, encoding: .utf8)
        // A new runner (a new process) over the same directory: nothing runs again, the line is back, once.
        let again = try SweepRunner(plan: plan, out: dir, command: fakeRun(log: log))
        #expect(try again.runSequentially(ok) == Array(repeating: .present, count: ok.count))
        #expect(try again.runSequentially(ok) == Array(repeating: .present, count: ok.count))
        #expect(lines(log).count == ok.count)
        let after = lines(dir + "/runs.log")
        #expect(after.count == ok.count)
        #expect(Set(after) == Set(logged), "the recovered line is the one the run would have written: \(after) vs \(logged)")
    }

    @Test("A point locked by another process is left alone")
    func busy() throws {
        let dir = temporaryDirectory("busy")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let log = dir + "-calls.log"
        defer { unlink(log) }
        let plan = try SweepPlan(file: SweepFile(text: Self.text, path: "t.toml"))
        let runner = try SweepRunner(plan: plan, out: dir, command: fakeRun(log: log))
        let p = plan.points[0]
        // Another process (flock(1)) holds the point's lock for 2 s.
        let holder = try ChildProcess.spawn(["/usr/bin/flock", dir + "/.work/\(p.id).lock", "sleep", "2"], stdout: "/dev/null", stderr: "/dev/null")
        var held = false
        for _ in 0..<200 where !held {
            usleep(10_000)
            held = SweepStatus(plan: plan, out: dir).running.contains(p)
        }
        #expect(held)
        #expect(try runner.runSequentially([p]) == [.busy])
        _ = try ChildProcess.wait(holder)
        #expect(try runner.runSequentially([p]) == [.ran])
    }

    @Test("runLocal with 3 jobs runs each missing point once")
    func local() throws {
        let dir = temporaryDirectory("local")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let log = dir + "-calls.log"
        defer { unlink(log) }
        let plan = try SweepPlan(file: SweepFile(text: Self.text, path: "t.toml"))
        let runner = try SweepRunner(plan: plan, out: dir, command: fakeRun(log: log))
        _ = try runner.runSequentially(plan.points.prefix(2))
        let outcomes = try runner.runLocal(jobs: 3)
        #expect(outcomes.filter { $0 == .present }.count == 2)
        #expect(outcomes.filter { $0 == .ran }.count == 2)
        #expect(lines(log).count == 6)
        #expect(Set(lines(log)).count == 6, "each point's scenario file ran once")
    }

    @Test("Merge: a CSV row per point, a column per axis and counter; figures along the axes")
    func merge() throws {
        let dir = temporaryDirectory("merge")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let log = dir + "-calls.log"
        defer { unlink(log) }
        let text = Self.text.replacingOccurrences(of: "[1, 2, 13]", with: "[1, 2, 4]")
        let plan = try SweepPlan(file: SweepFile(text: text, path: "t.toml"))
        let runner = try SweepRunner(plan: plan, out: dir, command: fakeRun(log: log))
        _ = try runner.runLocal(jobs: 2)
        let m = try SweepMerge(directory: dir)
        let (csv, tables, figures) = try SweepMerge.load(directory: dir)
        let rows = csv.split(separator: "\n").map { $0.split(separator: ",", omittingEmptySubsequences: false).map(String.init) }
        #expect(rows[0] == ["id", "index", "platform.paging", "workload.seed", "accesses", "bytes", "cycles", "wall_seconds"])
        #expect(rows.count == 7)
        for (p, r) in zip(plan.points, rows.dropFirst()) {
            let seed = Int(p.values[1].description)!
            #expect(r == [p.id, String(p.index), p.values[0].description, String(seed), String(seed),
                          String(p.scenario.utf8.count), "\(seed * 7).5", "0.1"])
        }
        #expect(m.headline == "cycles")
        #expect(!tables.isEmpty && tables[0].rows.count == 6)
        // Two varied axes: a line figure each way and one heatmap.
        #expect(figures.count == 3)
        let bySeed = try #require(figures.first { $0.id == "sweep-cycles-vs-workload-seed-by-platform-paging" })
        #expect(bySeed.kind == .line)
        #expect(bySeed.series.map(\.name) == ["platform.paging = native", "platform.paging = nested"])
        #expect(bySeed.series[0].points == [DataPoint(x: 1, y: 7.5), DataPoint(x: 2, y: 14.5), DataPoint(x: 4, y: 28.5)])
        let byPaging = try #require(figures.first { $0.id == "sweep-cycles-vs-platform-paging-by-workload-seed" })
        #expect(byPaging.kind == .groupedBar && byPaging.categories == ["native", "nested"])
        let heat = try #require(figures.first { $0.kind == .heatmap })
        #expect(heat.categories == ["native", "nested"] && heat.series.count == 3)
        #expect(heat.series[2].points == [DataPoint(x: 0, y: 28.5), DataPoint(x: 1, y: 28.5)])
    }

    @Test("The sbatch script's array tasks cover every point once, in chunks")
    func slurmScript() throws {
        for (count, chunk) in [(16, 1), (16, 5), (7, 7), (1, 3)] {
            let a = try SlurmArray(executable: "/bin/echo", sweepFile: "/s w/f.toml", out: "/o", count: count, planDigest: "0123456789ab", chunk: chunk,
                                   partition: "debug", time: "00:05:00", throttle: 2)
            #expect(a.script.contains("#SBATCH --array=0-\(a.tasks - 1)%2\n"))
            #expect(a.script.contains("#SBATCH --partition=debug\n") && a.script.contains("#SBATCH --time=00:05:00\n"))
            var covered: [Int] = []
            for t in 0..<a.tasks {
                // Run the script itself with the task id Slurm would set; /bin/echo prints the call.
                let dir = temporaryDirectory("slurm")
                defer { try? FileManager.default.removeItem(atPath: dir) }
                try a.script.write(toFile: dir + "/s.sh", atomically: true, encoding: .utf8)
                setenv("SLURM_ARRAY_TASK_ID", String(t), 1)
                let pid = try ChildProcess.spawn(["/bin/bash", dir + "/s.sh"], stdout: dir + "/out", stderr: dir + "/err")
                #expect(try ChildProcess.wait(pid) == 0)
                let out = try String(contentsOfFile: dir + "/out", encoding: .utf8)
                #expect(out == "sweep run /s w/f.toml --points \(a.range(task: t)) --plan-digest 0123456789ab --out /o\n")
                let r = a.range(task: t).split(separator: "-").map { Int($0)! }
                covered += Array(r[0]...r[1])
            }
            unsetenv("SLURM_ARRAY_TASK_ID")
            #expect(covered == Array(0..<count))
        }
        #expect(throws: InputError.self) { try SlurmArray(executable: "x", sweepFile: "f", out: "o", count: 4, planDigest: "d", chunk: 0) }
        #expect(throws: InputError.self) { try SlurmArray(executable: "x", sweepFile: "f", out: "o", count: 4, planDigest: "d", chunk: 1, time: "5 min") }
    }
}
