import MemVirtCore
import Testing

// JSONValue rendering: exact output for hand-written cases, and a property test that parses
// the output back with a small independent JSON parser (RFC 8259 grammar) written here.

@Suite("JSONValue rendering")
struct JSONTests {

    @Test("strings escape quote, backslash and every control character")
    func escaping() {
        let s: JSONValue = .string("a\"b\\c\nd\re\tf\u{01}g\u{1F}h\u{7F}/é😀")
        #expect(s.rendered() == #""a\"b\\c\nd\re\tf\u0001g\u001fh"# + "\u{7F}/é😀\"")
        #expect(JSONValue.string("").rendered() == #""""#)
        #expect(JSONValue.string("\u{08}\u{0C}\u{00}").rendered() == #""\u0008\u000c\u0000""#)
    }

    @Test("object keys keep their order and are escaped too")
    func keyOrder() {
        let o: JSONValue = .object([("z", 1), ("a", 2), ("m", 3), ("k\"ey", "v")])
        #expect(o.rendered() == #"{"z":1,"a":2,"m":3,"k\"ey":"v"}"#)
        #expect(o["a"] == .int(2))
        #expect(o["nope"] == nil)
        #expect(JSONValue.int(1)["a"] == nil)
    }

    @Test(
        "numbers: integers print as integers, whole doubles without a point, non-finite as null",
        arguments: [
            (JSONValue.int(-5), "-5"), (.int(0), "0"), (.int(Int64.min), "-9223372036854775808"),
            (.uint(UInt64.max), "18446744073709551615"), (.double(3.0), "3"), (.double(-2.0), "-2"),
            (.double(2.5), "2.5"), (.double(0.1), "0.1"), (.double(123_456_789_012_345), "123456789012345"),
            (.double(.nan), "null"), (.double(.infinity), "null"), (.double(-.infinity), "null"),
            (42, "42"), (1.25, "1.25"),
        ] as [(JSONValue, String)]
    )
    func numbers(value: JSONValue, text: String) {
        #expect(value.rendered() == text)
    }

    @Test("large and tiny doubles still render as valid JSON numbers that parse back", arguments: [1e15, 1e20, -3.5e300, 1e-7, Double.leastNonzeroMagnitude, 0.1 + 0.2])
    func extremeDoubles(d: Double) throws {
        let text = JSONValue.double(d).rendered()
        var p = MiniJSONParser(text)
        let back = try #require(try p.parseDocument(), "'\(text)' is not JSON")
        guard case .number(let n) = back else { Issue.record("'\(text)' is not a number"); return }
        #expect(n == d, "'\(text)'")
    }

    @Test("literals, arrays, nesting, empty containers, bool and null")
    func structure() {
        let v: JSONValue = ["a", 1, 2.5, true, .null, .array([]), .object([])]
        #expect(v.rendered() == #"["a",1,2.5,true,null,[],{}]"#)
        let nested: JSONValue = .object([("x", .array([.object([("y", false)])]))])
        #expect(nested.rendered() == #"{"x":[{"y":false}]}"#)
        #expect(nested.rendered(pretty: true) == "{\n  \"x\": [\n    {\n      \"y\": false\n    }\n  ]\n}")
    }

    @Test("random documents render to JSON that an independent parser reads back identically")
    func roundTripProperty() throws {
        var rng = ReferenceSplitMix64(seed: 0x750)
        for i in 0..<500 {
            let doc = randomValue(&rng, depth: 0)
            for pretty in [false, true] {
                let text = doc.rendered(pretty: pretty)
                var p = MiniJSONParser(text)
                let parsed = try #require(try p.parseDocument(), "document \(i) did not parse: \(text)")
                #expect(parsed == Parsed(doc), "document \(i): \(text)")
            }
        }
    }
}

@Suite("Counters")
struct CounterTests {
    @Test("CounterSet.json holds the applicable counters, zeros included, in declaration order")
    func applicableZeros() {
        var c = CounterSet(applicable: [.guestPageFaults, .accesses, .tlbHits, .tlbMisses, .walkMemoryRefs])
        c[.tlbHits] = 5
        #expect(c.json.rendered() == #"{"accesses":0,"tlb_hits":5,"tlb_misses":0,"walk_memory_refs":0,"guest_page_faults":0}"#)
        // Counting something makes it applicable.
        c.add(.pfGuest, 2)
        #expect(c.json["pf_guest"] == .uint(2))
        #expect(c.json["reads"] == nil)
        c.markApplicable([.reads])
        #expect(c.json["reads"] == .uint(0))
    }

    @Test("merge adds values and unions applicability")
    func merge() {
        var a = CounterSet(applicable: [.accesses])
        a[.accesses] = 10
        var b = CounterSet(applicable: [.writes])
        b[.accesses] = 5
        a.merge(b)
        #expect(a[.accesses] == 15)
        #expect(a.reported.map(\.0) == [.accesses, .writes])
        #expect(a.reported.map(\.1) == [15, 0])
    }

    @Test("counter names are unique snake_case, and KVM's stat names are KVM's")
    func names() {
        let names = Counter.allCases.map(\.name)
        #expect(Set(names).count == names.count)
        #expect(Counter.byName.count == names.count)
        for n in names {
            #expect(n.allSatisfy { $0.isLowercase || $0.isNumber || $0 == "_" }, "\(n)")
            #expect(Counter.byName[n]?.name == n)
        }
        // The names `memvirt run --json` must carry (issue 2) and KVM's x86 stat names.
        for required in ["accesses", "tlb_hits", "tlb_misses", "walk_memory_refs", "guest_page_faults",
                         "pf_taken", "pf_fixed", "pf_emulate", "pf_spurious", "pf_fast", "pf_mmio_spte_created",
                         "pf_guest", "tlb_flush", "invlpg", "exits", "io_exits", "mmio_exits", "insn_emulation",
                         "hypercalls", "mmu_shadow_zapped", "mmu_pte_write", "mmu_pde_zapped", "mmu_flooded",
                         "mmu_recycled", "mmu_cache_miss", "mmu_unsync", "pages_4k", "pages_2m", "pages_1g"] {
            #expect(Counter.byName[required] != nil, "\(required)")
        }
        for c in Counter.allCases { #expect(!c.meaning.isEmpty) }
    }

    @Test("RunResult.json starts with the schema and carries counters and numeric cycles")
    func runResult() {
        var c = CounterSet(applicable: [.accesses])
        c[.accesses] = 3
        let r = RunResult(engine: "model", paging: "native", pageSize: .size4K, workload: WorkloadSpec(), counters: c,
                          cycles: 1234, cycleBreakdown: [("tlb", 1000), ("walk", 234)], wallSeconds: 0.5,
                          extra: [("note", "x")])
        guard case .object(let kv) = r.json else { Issue.record("not an object"); return }
        #expect(kv.map(\.0) == ["schema", "engine", "paging", "page_size", "workload", "counters", "cycles",
                                "cycle_breakdown", "wall_seconds", "note"])
        #expect(r.json["schema"] == .string("memvirt.run/1"))
        #expect(r.json["cycles"]?.rendered() == "1234")
        #expect(r.json["counters"]?.rendered() == #"{"accesses":3}"#)
        #expect(r.json["page_size"] == .string("4K"))
        let measured = RunResult(engine: "kvm", paging: "ept", pageSize: .size2M, workload: WorkloadSpec(),
                                 counters: c, cycles: nil, wallSeconds: 1)
        #expect(measured.json["cycles"] == .null)
    }
}

// MARK: - An independent JSON reader (RFC 8259), for the round-trip property

/// What a JSON document means, without JSONValue's int/uint/double distinction.
indirect enum Parsed: Equatable {
    case null, bool(Bool), number(Double), string(String), array([Parsed]), object([(String, Parsed)])

    init(_ v: JSONValue) {
        switch v {
        case .null: self = .null
        case .bool(let b): self = .bool(b)
        case .int(let i): self = .number(Double(i))
        case .uint(let u): self = .number(Double(u))
        case .double(let d): self = d.isFinite ? .number(d) : .null
        case .string(let s): self = .string(s)
        case .array(let a): self = .array(a.map(Parsed.init))
        case .object(let kv): self = .object(kv.map { ($0.0, Parsed($0.1)) })
        }
    }

    static func == (a: Parsed, b: Parsed) -> Bool {
        switch (a, b) {
        case (.null, .null): true
        case (.bool(let x), .bool(let y)): x == y
        case (.number(let x), .number(let y)): x == y
        case (.string(let x), .string(let y)): x == y
        case (.array(let x), .array(let y)): x == y
        case (.object(let x), .object(let y)): x.count == y.count && zip(x, y).allSatisfy { $0.0 == $1.0 && $0.1 == $1.1 }
        default: false
        }
    }
}

struct MiniJSONParser {
    struct Failure: Error {}
    let s: [Unicode.Scalar]
    var i = 0
    init(_ text: String) { s = Array(text.unicodeScalars) }

    /// The whole text as one value, or nil if it is not exactly one JSON value.
    mutating func parseDocument() throws -> Parsed? {
        do {
            let v = try value()
            ws()
            return i == s.count ? v : nil
        } catch { return nil }
    }

    mutating func ws() { while i < s.count, [" ", "\n", "\r", "\t"].contains(s[i]) { i += 1 } }
    mutating func eat(_ c: Unicode.Scalar) throws { guard i < s.count, s[i] == c else { throw Failure() }; i += 1 }
    mutating func literal(_ word: String) throws { for c in word.unicodeScalars { try eat(c) } }

    mutating func value() throws -> Parsed {
        ws()
        guard i < s.count else { throw Failure() }
        switch s[i] {
        case "n": try literal("null"); return .null
        case "t": try literal("true"); return .bool(true)
        case "f": try literal("false"); return .bool(false)
        case "\"": return .string(try string())
        case "[":
            i += 1; ws()
            var out: [Parsed] = []
            if i < s.count, s[i] == "]" { i += 1; return .array(out) }
            while true {
                out.append(try value()); ws()
                if i < s.count, s[i] == "," { i += 1; continue }
                try eat("]"); return .array(out)
            }
        case "{":
            i += 1; ws()
            var out: [(String, Parsed)] = []
            if i < s.count, s[i] == "}" { i += 1; return .object(out) }
            while true {
                ws(); let k = try string(); ws(); try eat(":")
                out.append((k, try value())); ws()
                if i < s.count, s[i] == "," { i += 1; continue }
                try eat("}"); return .object(out)
            }
        default: return .number(try number())
        }
    }

    /// number = [ minus ] int [ frac ] [ exp ]; int = zero / ( digit1-9 *DIGIT )
    mutating func number() throws -> Double {
        let start = i
        func digit(_ c: Unicode.Scalar) -> Bool { c.value >= 0x30 && c.value <= 0x39 }
        if i < s.count, s[i] == "-" { i += 1 }
        guard i < s.count, digit(s[i]) else { throw Failure() }
        if s[i] == "0" { i += 1 } else { while i < s.count, digit(s[i]) { i += 1 } }
        if i < s.count, s[i] == "." {
            i += 1
            guard i < s.count, digit(s[i]) else { throw Failure() }
            while i < s.count, digit(s[i]) { i += 1 }
        }
        if i < s.count, s[i] == "e" || s[i] == "E" {
            i += 1
            if i < s.count, s[i] == "+" || s[i] == "-" { i += 1 }
            guard i < s.count, digit(s[i]) else { throw Failure() }
            while i < s.count, digit(s[i]) { i += 1 }
        }
        var text = ""
        text.unicodeScalars.append(contentsOf: s[start..<i])
        guard let d = Double(text) else { throw Failure() }
        return d
    }

    mutating func string() throws -> String {
        try eat("\"")
        var out = String.UnicodeScalarView()
        while true {
            guard i < s.count else { throw Failure() }
            let c = s[i]; i += 1
            if c == "\"" { return String(out) }
            if c.value < 0x20 { throw Failure() }  // raw control characters are not allowed
            if c != "\\" { out.append(c); continue }
            guard i < s.count else { throw Failure() }
            let e = s[i]; i += 1
            switch e {
            case "\"": out.append("\"")
            case "\\": out.append("\\")
            case "/": out.append("/")
            case "b": out.append("\u{08}")
            case "f": out.append("\u{0C}")
            case "n": out.append("\n")
            case "r": out.append("\r")
            case "t": out.append("\t")
            case "u":
                guard i + 4 <= s.count else { throw Failure() }
                var text = ""
                text.unicodeScalars.append(contentsOf: s[i..<i + 4])
                i += 4
                guard let v = UInt32(text, radix: 16), let u = Unicode.Scalar(v) else { throw Failure() }
                out.append(u)
            default: throw Failure()
            }
        }
    }
}

private func randomString(_ rng: inout ReferenceSplitMix64) -> String {
    let alphabet: [Unicode.Scalar] = ["a", "Z", "0", " ", "\"", "\\", "/", "\n", "\r", "\t", "\u{0}", "\u{1}",
                                      "\u{1F}", "\u{7F}", "é", "中", "😀", "\u{2028}", "{", "}", ":", ","]
    var s = String.UnicodeScalarView()
    for _ in 0..<rng.bounded(12) { s.append(alphabet[Int(rng.bounded(UInt64(alphabet.count)))]) }
    return String(s)
}

private func randomValue(_ rng: inout ReferenceSplitMix64, depth: Int) -> JSONValue {
    switch rng.bounded(depth > 3 ? 6 : 8) {
    case 0: return .null
    case 1: return .bool(rng.bounded(2) == 1)
    case 2: return .int(Int64(bitPattern: rng.next()) >> Int64(rng.bounded(64)))
    case 3: return .uint(rng.next() >> (11 + rng.bounded(53)))  // exact in a Double
    case 4:
        let d = Double(bitPattern: rng.next())
        return .double(rng.bounded(2) == 0 ? d : Double(Int64(bitPattern: rng.next()) >> 20) / 1024)
    case 5: return .string(randomString(&rng))
    case 6: return .array((0..<rng.bounded(5)).map { _ in randomValue(&rng, depth: depth + 1) })
    default: return .object((0..<rng.bounded(5)).map { _ in (randomString(&rng), randomValue(&rng, depth: depth + 1)) })
    }
}
