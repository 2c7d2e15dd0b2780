import MemVirtCore
import Testing

// WorkloadSpec: the pattern syntax of `--workload` and the checks of validate().

@Suite("WorkloadSpec")
struct WorkloadSpecTests {

    @Test(
        "Pattern(parsing:) accepts every documented form",
        arguments: [
            ("sequential", WorkloadSpec.Pattern.sequential), ("seq", .sequential),
            ("strided", .strided(stride: 4096)), ("strided:64", .strided(stride: 64)),
            ("strided:8", .strided(stride: 8)), ("strided:64KiB", .strided(stride: 65_536)),
            ("strided:2MiB", .strided(stride: 2_097_152)), ("strided:4KB", .strided(stride: 4000)),
            ("uniform", .uniform), ("random", .uniform),
            ("zipf", .zipf(theta: 0.99)), ("zipf:0.5", .zipf(theta: 0.5)), ("zipf:1.2", .zipf(theta: 1.2)),
            ("chase", .chase), ("pointer-chase", .chase), ("gups", .gups),
            ("lackey:/tmp/trace.txt", .lackey(path: "/tmp/trace.txt")),
            ("lackey:relative/a:b.txt", .lackey(path: "relative/a:b.txt")),
        ] as [(String, WorkloadSpec.Pattern)]
    )
    func parsesDocumentedForms(text: String, pattern: WorkloadSpec.Pattern) throws {
        #expect(try WorkloadSpec.Pattern(parsing: text) == pattern)
    }

    @Test(
        "Pattern(parsing:) rejects junk with a message naming the text",
        arguments: [
            // (text, what the message must contain: the offending text, quoted)
            ("", "unknown workload ''"), ("bogus", "'bogus'"), ("uniformly", "'uniformly'"),
            ("strided:0", "'strided:0'"), ("strided:12", "'strided:12'"), ("strided:abc", "'abc'"),
            ("strided:64K", "'64K'"), ("zipf:0", "'zipf:0'"), ("zipf:-1", "'zipf:-1'"), ("zipf:10", "'zipf:10'"),
            ("zipf:abc", "'zipf:abc'"), ("zipf:nan", "'zipf:nan'"), ("lackey", "lackey:PATH"), ("lackey:", "lackey:PATH"),
        ]
    )
    func rejectsJunk(text: String, hint: String) {
        let error = #expect(throws: InputError.self) { try WorkloadSpec.Pattern(parsing: text) }
        let message = error?.message ?? ""
        #expect(message.contains(hint), "\(message)")
    }

    @Test(
        "an argument on a pattern that takes none, or an empty argument, is refused",
        arguments: ["uniform:42", "gups:x", "chase:1", "sequential:8", "random:1", "strided:", "zipf:", ":uniform"]
    )
    func rejectsStrayArguments(text: String) {
        let error = #expect(throws: InputError.self) { try WorkloadSpec.Pattern(parsing: text) }
        #expect(error?.message.contains(text) == true, "\(error?.message ?? "")")
    }

    @Test("names and descriptions")
    func names() {
        #expect(WorkloadSpec.Pattern.strided(stride: 64).name == "strided")
        #expect(WorkloadSpec.Pattern.strided(stride: 64).description == "strided(64)")
        #expect(WorkloadSpec.Pattern.zipf(theta: 0.99).description == "zipf(0.99)")
        #expect(WorkloadSpec.Pattern.lackey(path: "t.txt").description == "lackey:t.txt")
        #expect(WorkloadSpec.Pattern.gups.description == "gups")
    }

    @Test("the default spec is valid and starts at 256 GiB")
    func defaults() throws {
        let s = WorkloadSpec()
        try s.validate()
        #expect(s.base.rawValue == 256 << 30)
        #expect(s.base.tableIndex(level: 4) == 0 && s.base.tableIndex(level: 3) == 256)
    }

    @Test(
        "validate() rejects bad specs with a message naming the field",
        arguments: [
            (WorkloadSpec(footprint: ByteCount(0)), "footprint"),
            (WorkloadSpec(footprint: ByteCount(4097)), "footprint"),
            (WorkloadSpec(footprint: ByteCount(2048)), "footprint"),
            (WorkloadSpec(footprint: .gib(2048)), "footprint"),
            (WorkloadSpec(pattern: .zipf(theta: 0.99), footprint: .gib(512)), "footprint"),
            (WorkloadSpec(writeRatio: -0.1), "write ratio"),
            (WorkloadSpec(writeRatio: 1.5), "write ratio"),
            (WorkloadSpec(writeRatio: .nan), "write ratio"),
            (WorkloadSpec(threads: 0), "threads"),
            (WorkloadSpec(threads: 1025), "threads"),
            (WorkloadSpec(base: GuestVirtualAddress(rawValue: 0x1000)), "base"),
            (WorkloadSpec(base: GuestVirtualAddress(rawValue: 0x0000_0040_0020_0000)), "base"),
        ] as [(WorkloadSpec, String)]
    )
    func validateRejects(spec: WorkloadSpec, field: String) {
        let error = #expect(throws: InputError.self) { try spec.validate() }
        #expect(error?.message.hasPrefix(field) == true, "\(error?.message ?? "")")
        // The generator refuses the same spec.
        #expect(throws: InputError.self) { try AccessGenerator(spec: spec) }
    }

    @Test(
        "validate() rejects a stride that is zero or not a multiple of 8 (the generator would emit unaligned accesses)",
        arguments: [0, 4, 12, 4100] as [UInt64]
    )
    func validateRejectsBadStride(stride: UInt64) {
        let spec = WorkloadSpec(pattern: .strided(stride: stride))
        let error = #expect(throws: InputError.self) { try spec.validate() }
        #expect(error?.message.hasPrefix("stride") == true, "\(error?.message ?? "")")
    }

    @Test(
        "validate() accepts the edges of each range",
        arguments: [
            WorkloadSpec(footprint: ByteCount(4096)), WorkloadSpec(footprint: .gib(1024)),
            WorkloadSpec(writeRatio: 0), WorkloadSpec(writeRatio: 1), WorkloadSpec(threads: 1024),
            WorkloadSpec(pattern: .zipf(theta: 0.5), footprint: .gib(256)),
            WorkloadSpec(base: GuestVirtualAddress(rawValue: 0)),
        ]
    )
    func validateAccepts(spec: WorkloadSpec) throws {
        try spec.validate()
    }

    @Test("json lists the pattern's parameters, then the shared fields, in order")
    func json() {
        let s = WorkloadSpec(pattern: .strided(stride: 128), footprint: .mib(1), accesses: 10, writeRatio: 0.25, seed: 3)
        #expect(s.json.rendered() == #"{"pattern":"strided","stride":128,"footprint_bytes":1048576,"accesses":10,"write_ratio":0.25,"seed":3,"threads":1,"compute_per_access":0,"base":"0x4000000000"}"#)
        let z = WorkloadSpec(pattern: .zipf(theta: 0.99))
        #expect(z.json["theta"] == .double(0.99))
        #expect(WorkloadSpec(pattern: .lackey(path: "a\"b")).json["trace"]?.rendered() == #""a\"b""#)
    }
}
