import Foundation
import MemVirtConfig
import MemVirtCore
import MemVirtModel
import Testing

/// Scenario and profile files: every mistake is an error naming file, line and what is allowed.
@Suite struct StrictParsingTests {
    func scenarioError(_ text: String) -> ConfigError? {
        do {
            _ = try Scenario.decode(text, file: "s.toml")
            return nil
        } catch {
            return error
        }
    }

    @Test func scenarioDecodes() throws {
        let s = try Scenario.decode("""
            # a comment
            [workload]
            pattern = "zipf:0.99"
            footprint = "64MiB"
            accesses = 2000000   # bare numbers too
            write_ratio = 0.3
            seed = 7
            threads = 2
            compute_per_access = "1K"

            [platform]
            paging = "nested"
            page_size = "2M"
            host_limit = "16MiB"
            swap_device = "hdd"
            profile = "zen4"
            """, file: "s.toml")
        #expect(s.pattern == .zipf(theta: 0.99))
        #expect(s.footprint == ByteCount(64 << 20))
        #expect(s.accesses == 2_000_000 && s.writeRatio == 0.3 && s.seed == 7 && s.threads == 2 && s.computePerAccess == 1_000)
        #expect(s.paging == .nested && s.pageSize == .size2M && s.hostLimit == ByteCount(16 << 20) && s.swapDevice == "hdd" && s.profile == "zen4")
        #expect(s.location("platform.profile") == "s.toml:16")
        // Flags override the file.
        let spec = try Scenario.workload(s, overrides: WorkloadOverrides(footprint: "8MiB", seed: 9))
        #expect(spec.footprint == ByteCount(8 << 20) && spec.seed == 9 && spec.accesses == 2_000_000 && spec.threads == 2)
    }

    @Test func unknownKeyNamesLineAndAllowedKeys() throws {
        let e = try #require(scenarioError("[workload]\nfootprint = \"64MiB\"\nfootprnt = \"1GiB\"\n"))
        #expect(e.file == "s.toml" && e.line == 3)
        #expect(e.description.hasPrefix("s.toml:3: [workload] unknown key 'footprnt'"))
        #expect(e.description.contains("allowed keys: " + Scenario.workloadKeys.joined(separator: ", ")))
    }

    @Test func unknownSectionNamesLineAndAllowedSections() throws {
        let e = try #require(scenarioError("\n[wrkload]\npattern = \"uniform\"\n"))
        #expect(e.line == 2)
        #expect(e.description == "s.toml:2: unknown section [wrkload] (allowed sections: [workload], [platform])")
        // A stray top-level key is refused the same way.
        let k = try #require(scenarioError("pattern = \"uniform\"\n"))
        #expect(k.line == 1 && k.description.contains("unknown key 'pattern'") && k.description.contains("workload, platform"))
    }

    @Test func wrongTypeNamesLine() throws {
        let e = try #require(scenarioError("[workload]\nseed = \"one\"\n"))
        #expect(e.description == "s.toml:2: [workload] seed must be an integer, not a string")
        let t = try #require(scenarioError("[platform]\npaging = 3\n"))
        #expect(t.description == "s.toml:2: [platform] paging must be a string, not an integer")
        let s = try #require(scenarioError("workload = 3\n"))
        #expect(s.line == 1 && s.description.contains("workload must be a table"))
    }

    @Test func outOfRangeNamesLineAndRange() throws {
        let e = try #require(scenarioError("[workload]\n\nwrite_ratio = 1.5\n"))
        #expect(e.description == "s.toml:3: [workload] write_ratio = 1.5 is out of range (allowed: 0.0...1.0)")
        let l = try #require(scenarioError("[platform]\nlevels = 6\n"))
        #expect(l.description == "s.toml:2: [platform] levels = 6 is out of range (allowed: 4...5)")
        let p = try #require(scenarioError("[platform]\npaging = \"nestd\"\n"))
        #expect(p.description == "s.toml:2: [platform] paging = \"nestd\" is not allowed (allowed: native, shadow, nested)")
        let f = try #require(scenarioError("[workload]\nfootprint = \"64 potatoes\"\n"))
        #expect(f.line == 2 && f.description.contains("[workload] footprint:"))
        let both = try #require(scenarioError("[platform]\nprofile = \"zen4\"\ncosts = \"vmx-ept\"\n"))
        #expect(both.line == 3 && both.description.contains("not both"))
    }

    @Test func kvmEngineRefusesModelPlatformKeys() throws {
        try Scenario.decode("[workload]\nseed = 1\n[platform]\npage_size = \"2M\"\n", file: "k.toml").checkForKVMEngine()
        let s = try Scenario.decode("[platform]\npage_size = \"4K\"\npaging = \"shadow\"\n", file: "k.toml")
        #expect(throws: ConfigError(file: "k.toml", line: 3, "[platform] paging: the KVM engine runs on this host's MMU and takes only page_size from [platform] (paging is for `memvirt run`)")) {
            try s.checkForKVMEngine()
        }
    }

    /// Inputs that abort TOMLKit's bundled C++ parser (SIGABRT) or that it truncates silently.
    @Test(arguments: [
        ("[.]\n", 1), ("[=]\n", 1), ("[é]\n", 1), ("[$x]\n", 1), ("[\n", 1), ("[workload]\n[\n", 2),
        ("a = 1\n[.]", 2), ("[[]]\n", 1), ("[a.]\n", 1), ("[workload\n", 1), ("= 1\n", 1), ("a = [1,\n", 2),
    ])
    func malformedHeadersAreErrors(text: String, line: Int) throws {
        let e = try #require(scenarioError(text))
        #expect(e.line == line, "\(text.debugDescription): \(e)")
        #expect(e.file == "s.toml")
    }

    @Test func nulByteIsAnError() throws {
        var data = Data("[workload]\nseed = 1\n".utf8)
        data.append(0)
        data.append(contentsOf: Array("\n[wrkload]\n".utf8))
        do {
            _ = try TOMLParser.parse(data: data, file: "n.toml")
            Issue.record("accepted a NUL byte")
        } catch {
            #expect(error.file == "n.toml" && error.line == 3 && error.message.contains("NUL byte"))
        }
        #expect(throws: ConfigError.self) { try TOMLParser.parse(data: Data([0xff, 0xfe, 0x41]), file: "b.toml") }
    }

    @Test func tomlValues() throws {
        let t = try TOMLParser.parse("""
            a = "x\\ty\\u00e9\\"" # comment
            b = 'C:\\path'
            c = -1_000
            d = 1.5e3
            e = [ 1, 2,
                  3, ]   # trailing comma
            f = { g = true, h.i = 0x1f }
            "quoted key" = \"\"\"
            two
            lines\"\"\"
            [t.u]
            v = 5e-3
            [[arr]]
            n = 1
            [[arr]]
            n = 2
            """, file: "v.toml")
        guard case .string(let a)? = t["a"]?.node else { Issue.record("a"); return }
        #expect(a == "x\tyé\"")
        guard case .string(let b)? = t["b"]?.node, case .int(let c)? = t["c"]?.node, case .float(let d)? = t["d"]?.node,
            case .array(let e)? = t["e"]?.node, case .table(let f)? = t["f"]?.node, case .string(let q)? = t["quoted key"]?.node,
            case .table(let tt)? = t["t"]?.node, case .array(let arr)? = t["arr"]?.node
        else { Issue.record("types"); return }
        #expect(b == "C:\\path" && c == -1000 && d == 1500 && e.count == 3 && e[2].line == 6 && q == "two\nlines" && arr.count == 2)
        guard case .bool(true)? = f["g"]?.node, case .table(let h)? = f["h"]?.node, case .int(31)? = h["i"]?.node else { Issue.record("inline"); return }
        guard case .table(let u)? = tt["u"]?.node, case .float(let v)? = u["v"]?.node else { Issue.record("t.u"); return }
        #expect(v == 0.005 && u["v"]?.line == 12)
    }

    @Test(arguments: [
        ("a = 1\na = 2\n", 2, "defined twice"), ("[x]\n[x]\n", 2, "defined twice"), ("a = 01\n", 1, "not a value"),
        ("a = 1__0\n", 1, "not a value"), ("a = 2026-12-04\n", 1, "date"), ("a = \"open\n", 1, "not closed"),
        ("a = \"\\q\"\n", 1, "unknown escape"), ("a = 1 b = 2\n", 1, "after the value"), ("a = { b = 1,\n c = 2 }\n", 1, "inline table"),
        ("a = nope\n", 1, "not a value"), ("a.b = 1\n[a]\n", 2, "defined twice"), ("a = 1\na.b = 2\n", 2, "already defined"),
    ])
    func tomlErrors(text: String, line: Int, fragment: String) {
        do {
            _ = try TOMLParser.parse(text, file: "e.toml")
            Issue.record("accepted \(text.debugDescription)")
        } catch {
            #expect(error.line == line && error.message.contains(fragment), "\(text.debugDescription): \(error)")
        }
    }

    @Test func deepNestingIsAnErrorNotAStackOverflow() throws {
        let text = "a = " + String(repeating: "[", count: 100_000) + "\n"
        #expect(throws: ConfigError.self) { try TOMLParser.parse(text, file: "d.toml") }
        let inline = "a = " + String(repeating: "{ b = ", count: 70) + "1" + String(repeating: " }", count: 70) + "\n"
        #expect(throws: ConfigError.self) { try TOMLParser.parse(inline, file: "d.toml") }
    }

    /// Damaged profiles (bytes replaced, deleted or the file cut) decode or fail with a
    /// ConfigError naming a line inside the file; none crashes the process.
    @Test func damagedProfilesFailCleanly() throws {
        let original = Array(try #require(MachineProfile.builtInText("zen4")).utf8)
        let lines = original.filter { $0 == 10 }.count + 1
        var rng = SplitMix64(seed: 10)
        let alphabet = Array("[]{}=.,\"'#\n \\0xe+-_aZ9é".utf8) + [0, 0xff, 13]
        var failures = 0
        for _ in 0..<800 {
            var b = original
            for _ in 0..<(1 + Int(rng.next() % 3)) {
                let i = Int(rng.next() % UInt64(b.count))
                switch rng.next() % 3 {
                case 0: b[i] = alphabet[Int(rng.next() % UInt64(alphabet.count))]
                case 1: b.remove(at: i)
                default: b = Array(b[..<i])
                }
                if b.isEmpty { break }
            }
            do {
                _ = try MachineProfile.decode(TOMLParser.parse(data: Data(b), file: "m.toml"), file: "m.toml")
            } catch {
                failures += 1
                #expect(error.file == "m.toml" && error.line <= lines, "\(error)")
            }
        }
        #expect(failures > 500)
    }

    // MARK: profiles

    func profileError(_ edit: (String) -> String) throws -> ConfigError? {
        let text = edit(try #require(MachineProfile.builtInText("vmx-ept")))
        do {
            _ = try MachineProfile.decode(text, file: "p.toml")
            return nil
        } catch {
            return error
        }
    }

    func lineOf(_ needle: String, in name: String = "vmx-ept") throws -> Int {
        let lines = try #require(MachineProfile.builtInText(name)).split(separator: "\n", omittingEmptySubsequences: false)
        return try #require(lines.firstIndex { $0.hasPrefix(needle) }) + 1
    }

    @Test func profileUnknownKey() throws {
        let e = try #require(try profileError { $0.replacingOccurrences(of: "pde_cache = 32", with: "pde_cahce = 32") })
        #expect(e.line == (try lineOf("pde_cache")))
        #expect(e.message.hasPrefix("[cpu] unknown key 'pde_cahce' (allowed keys: model, clock_ghz,"))
        let c = try #require(try profileError { $0.replacingOccurrences(of: "vm_exit_round_trip = {", with: "vm_exit_roundtrip = {") })
        #expect(c.line == (try lineOf("vm_exit_round_trip")) && c.message.contains("[costs.cost_model] unknown key 'vm_exit_roundtrip'"))
        let v = try #require(try profileError { $0.replacingOccurrences(of: "invlpg = { cycles = 100,", with: "invlpg = { cycle = 100,") })
        #expect(v.line == (try lineOf("invlpg =")) && v.message.contains("[costs.cost_model.invlpg] unknown key 'cycle' (allowed keys: cycles, provenance, source)"))
    }

    @Test func profileUnknownSectionAndMissingParameter() throws {
        let e = try #require(try profileError { $0.replacingOccurrences(of: "[host]", with: "[hots]") })
        #expect(e.line == (try lineOf("[host]")) && e.message.contains("unknown section [hots]"))
        let m = try #require(try profileError { $0.replacingOccurrences(of: "\nshadow_resync = ", with: "\n#shadow_resync = ") })
        #expect(m.message.contains("[costs.cost_model] missing key 'shadow_resync'"))
    }

    @Test func profileWrongTypeAndRange() throws {
        let t = try #require(try profileError { $0.replacingOccurrences(of: "clock_ghz = 3.0", with: "clock_ghz = \"3 GHz\"") })
        #expect(t.line == (try lineOf("clock_ghz")) && t.message == "[cpu] clock_ghz must be a number, not a string")
        let r = try #require(try profileError { $0.replacingOccurrences(of: "clock_ghz = 3.0", with: "clock_ghz = 300") })
        #expect(r.message == "[cpu] clock_ghz = 300.0 is out of range (allowed: 0.1...10.0)")
        let s = try #require(try profileError { $0.replacingOccurrences(of: "{ sets = 16, ways = 6,", with: "{ sets = 12, ways = 6,") })
        #expect(s.line == (try lineOf("    { sets = 16, ways = 6")) && s.message.contains("[cpu.l1d[0]] sets = 12 must be a power of two"))
        let p = try #require(try profileError { $0.replacingOccurrences(of: "page_sizes = [\"4K\"] }", with: "page_sizes = [\"4KB\"] }") })
        #expect(p.message.contains("page size '4KB' is not allowed (allowed: 4K, 2M, 1G)"))
        let n = try #require(try profileError { $0.replacingOccurrences(of: "walk_ref_dram = { cycles = 300,", with: "walk_ref_dram = { cycles = -1,") })
        #expect(n.message.contains("cycles = -1.0 is out of range"))
        let o = try #require(try profileError { $0.replacingOccurrences(of: "origin = \"built-in\"", with: "origin = \"handmade\"") })
        #expect(o.message.contains("origin = \"handmade\" is not allowed (allowed: built-in, calibrated)"))
    }
}
