import MemVirtCore
import Testing

// Quantities as people write them: ByteCount (KiB/MiB/GiB binary, KB/MB/GB decimal), counts
// (K/M/G decimal), Duration64. Expected values are written out as plain integers.

@Suite("Units: ByteCount, parseCount, Duration64")
struct UnitsTests {

    // MARK: ByteCount

    @Test(
        "byte counts parse binary and decimal units",
        arguments: [
            ("64MiB", 67_108_864), ("64MB", 64_000_000), ("1.5GiB", 1_610_612_736), ("4096", 4096),
            ("4096B", 4096), ("0", 0), ("1KiB", 1024), ("1KB", 1000), ("2GiB", 2_147_483_648),
            ("1GB", 1_000_000_000), ("1TiB", 1_099_511_627_776), ("1TB", 1_000_000_000_000),
            ("64mib", 67_108_864), ("64 MiB", 67_108_864), ("  4KiB ", 4096), ("0.5KiB", 512),
            ("1e3", 1000), ("1e3KB", 1_000_000),
        ] as [(String, UInt64)]
    )
    func byteCountParses(text: String, bytes: UInt64) throws {
        #expect(try ByteCount(parsing: text).rawValue == bytes)
    }

    @Test(
        "bad byte counts are refused with a message naming the input",
        arguments: [
            ("64K", "64KiB"),  // ambiguous: the message offers both readings
            ("2M", "2MiB"), ("1G", "1GB"),
            ("12parsecs", "parsecs"), ("", "byte count"), ("-1MiB", "byte count"),
            ("MiB", "byte count"), ("1.1B", "whole"), ("1.0000001KiB", "whole"), ("20EiB", "EiB"),
            ("99999999TiB", "2^64"), ("0x10", "x10"), ("abc", "byte count"),
        ]
    )
    func byteCountErrors(text: String, hint: String) {
        let error = #expect(throws: InputError.self) { try ByteCount(parsing: text) }
        let message = error?.message ?? ""
        #expect(message.contains("'\(text)'"), "\(message)")
        #expect(message.contains(hint), "\(message)")
    }

    @Test(
        "descriptions use binary units, exact where the value is a whole number of them",
        arguments: [
            (0, "0B"), (1000, "1000B"), (1024, "1KiB"), (67_108_864, "64MiB"),
            (1_610_612_736, "1.50GiB"), (3 << 30, "3GiB"), (1 << 40, "1TiB"), (1536, "1.50KiB"),
        ] as [(UInt64, String)]
    )
    func byteCountDescription(bytes: UInt64, text: String) {
        #expect(ByteCount(bytes).description == text)
    }

    @Test("the kib/mib/gib constructors scale by 2^10, 2^20, 2^30")
    func byteCountConstructors() {
        #expect(ByteCount.kib(3).rawValue == 3072)
        #expect(ByteCount.mib(64).rawValue == 67_108_864)
        #expect(ByteCount.gib(2).rawValue == 2_147_483_648)
        #expect(ByteCount.mib(1) < ByteCount.mib(2))
    }

    /// Whole numbers of a binary unit below 1024 of it: parse(description) == value.
    @Test("parse(description) == value for whole binary units (k < 1024 of the unit)")
    func byteCountRoundTripSmallMultiples() throws {
        var rng = ReferenceSplitMix64(seed: 0xB17E)
        for _ in 0..<20_000 {
            let shift = UInt64(10 * rng.bounded(5))  // B, KiB, MiB, GiB, TiB
            let k = 1 + rng.bounded(1023)
            let value = ByteCount(k << shift)
            let back = try ByteCount(parsing: value.description)
            #expect(back == value, "\(k) << \(shift) printed as \(value.description)")
        }
    }

    /// Any whole number of KiB, MiB, GiB or TiB (e.g. 1025KiB) should print so it parses back.
    @Test(
        "parse(description) == value for every whole number of a binary unit"
    )
    func byteCountRoundTripAllMultiples() throws {
        var rng = ReferenceSplitMix64(seed: 0xB17E5)
        var failures: [String] = []
        for _ in 0..<20_000 {
            let shift = UInt64(10 * (1 + rng.bounded(4)))  // KiB, MiB, GiB, TiB
            let k = 1 + rng.bounded(1 << 20)
            let value = ByteCount(k << shift)
            let back = try? ByteCount(parsing: value.description)
            if back != value && failures.count < 5 {
                failures.append("\(k)<<\(shift) -> '\(value.description)' -> \(back.map { String($0.rawValue) } ?? "parse error")")
            }
        }
        #expect(failures.isEmpty, "\(failures)")
        #expect(ByteCount.kib(1025).description == "1025KiB")
    }

    /// Issue 17 defect 9: `--footprint 4095` was reported as "4.00KiB" (rounded to a size the
    /// run did not have). A value no binary unit shows exactly is printed in bytes.
    @Test(
        "a byte count no unit shows exactly is printed in bytes, not rounded",
        arguments: [
            (4095, "4095B"), (4097, "4097B"), (1_234_567, "1234567B"), (1025, "1025B"),
            ((1 << 30) + 1, "1073741825B"), (2_700_000_000, "2636718.75KiB"),  // exact: 2636718.75 x 1024
        ] as [(UInt64, String)]
    )
    func inexactByteCountsInBytes(bytes: UInt64, text: String) throws {
        #expect(ByteCount(bytes).description == text)
        #expect(try ByteCount(parsing: text).rawValue == bytes)
    }

    /// Found by the fuzz target: a value between 1.8e19 and 2^64 printed with decimals
    /// ("17325157235822.25MiB") was refused when parsed back (the bound was 1.8e19, not 2^64).
    @Test("byte counts, counts and durations up to 2^64 - 1 parse; 2^64 is refused")
    func boundIsTwoToThe64() throws {
        #expect(try ByteCount(parsing: "17325157235822.25MiB").rawValue == 18_166_744_073_709_551_616)
        #expect(try ByteCount(parsing: ByteCount(18_166_744_073_709_551_616).description).rawValue == 18_166_744_073_709_551_616)
        #expect(try ByteCount(parsing: "16777215.75TiB").rawValue == 18_446_743_798_831_644_672)  // 2^64 - 2^38
        #expect(throws: InputError.self) { try ByteCount(parsing: "16777216TiB") }  // 2^64
        #expect(try ByteCount(parsing: "10673149362141900.25KiB").rawValue == 10_929_304_946_833_305_856)  // > 2^53
        #expect(try ByteCount(parsing: ".5KiB").rawValue == 512)
        #expect(throws: InputError.self) { try ByteCount(parsing: "0.0000000000000000001TiB") }  // 0.11 bytes
        #expect(try parseCount("18.4T") == 18_400_000_000_000)
        #expect(try parseCount("18.4e18") == 18_400_000_000_000_000_000)  // was refused: above 1.8e19
        #expect(throws: InputError.self) { try parseCount("18446744073709551616") }
        #expect(try Duration64(parsing: "18000000000s").rawValue == 18_000_000_000_000_000_000)
        #expect(throws: InputError.self) { try Duration64(parsing: "18446744074s") }
    }

    /// The fuzz target's property (Fuzz/Targets/units): every description parses back to the
    /// same value, for any byte count (it failed for "10673149362141900.25KiB": decimals went
    /// through a Double).
    @Test("parse(description) == value for any byte count")
    func byteCountRoundTripAnyValue() throws {
        var rng = ReferenceSplitMix64(seed: 0x4095)
        var failures: [String] = []
        for i in 0..<50_000 {
            let raw = i < 5000 ? UInt64(i) : rng.next() >> rng.bounded(64)
            let value = ByteCount(raw)
            let back = try? ByteCount(parsing: value.description)
            if back != value && failures.count < 5 { failures.append("\(raw) -> '\(value.description)'") }
        }
        #expect(failures.isEmpty, "\(failures)")
    }

    @Test(
        "integers above 2^53 parse exactly"
    )
    func exactLargeIntegers() throws {
        #expect(try parseCount("9007199254740993") == 9_007_199_254_740_993)
        #expect(try ByteCount(parsing: "9007199254740993").rawValue == 9_007_199_254_740_993)
        #expect(try parseCount("18000000000000000001") == 18_000_000_000_000_000_001)
    }

    // MARK: Counts

    @Test(
        "counts take decimal K/M/G and digit separators",
        arguments: [
            ("10M", 10_000_000), ("2_000_000", 2_000_000), ("1.5G", 1_500_000_000), ("500K", 500_000),
            ("2000000", 2_000_000), ("2,000,000", 2_000_000), ("1e6", 1_000_000), ("0", 0), ("10m", 10_000_000),
            ("2k", 2000), ("1T", 1_000_000_000_000), (" 7 ", 7), ("2.5K", 2500),
        ] as [(String, UInt64)]
    )
    func countParses(text: String, value: UInt64) throws {
        #expect(try parseCount(text) == value)
    }

    @Test(
        "bad counts are refused with a message naming the input",
        arguments: ["", "abc", "10X", "-5", "1.5", "10MiB", "1.0001K", "M", "1e30"]
    )
    func countErrors(text: String) {
        let error = #expect(throws: InputError.self) { try parseCount(text) }
        #expect(error?.message.contains("'\(text)'") == true, "\(error?.message ?? "")")
    }

    // MARK: Durations

    @Test(
        "durations parse ns, us/µs, ms, s, min, h (a bare number is seconds)",
        arguments: [
            ("300ms", 300_000_000), ("60s", 60_000_000_000), ("1.5s", 1_500_000_000), ("10us", 10_000),
            ("10µs", 10_000), ("100ns", 100), ("2min", 120_000_000_000), ("1h", 3_600_000_000_000),
            ("5", 5_000_000_000), ("0.25ms", 250_000), ("3m", 180_000_000_000), ("1MS", 1_000_000),
        ] as [(String, UInt64)]
    )
    func durationParses(text: String, nanoseconds: UInt64) throws {
        #expect(try Duration64(parsing: text).rawValue == nanoseconds)
    }

    @Test("bad durations are refused with a message naming the input", arguments: ["", "-1s", "10 parsecs", "abc", "5d", "1e30h"])
    func durationErrors(text: String) {
        let error = #expect(throws: InputError.self) { try Duration64(parsing: text) }
        #expect(error?.message.contains("'\(text)'") == true, "\(error?.message ?? "")")
    }

    @Test(
        "duration descriptions",
        arguments: [
            (0, "0s"), (100, "100ns"), (10_000, "10us"), (300_000_000, "300ms"), (1_500_000_000, "1.500s"),
            (60_000_000_000, "60s"), (1_234_567, "1.235ms"),
        ] as [(UInt64, String)]
    )
    func durationDescription(ns: UInt64, text: String) {
        #expect(Duration64(rawValue: ns).description == text)
    }

    @Test("parse(description) == value for k ns/us/ms (k < 10^6) and any whole number of seconds")
    func durationRoundTrip() throws {
        var rng = ReferenceSplitMix64(seed: 0xD0_0D)
        let units: [UInt64] = [1, 1_000, 1_000_000]
        for _ in 0..<20_000 {
            let unit = units[Int(rng.bounded(3))]
            let value = Duration64(rawValue: (1 + rng.bounded(999_999)) * unit)
            #expect(try Duration64(parsing: value.description) == value, "\(value.rawValue)ns printed as \(value.description)")
            let secs = Duration64.seconds(1 + rng.bounded(1_000_000_000))
            #expect(try Duration64(parsing: secs.description) == secs)
        }
    }

    @Test("parse(description) is within 0.05% of any duration")
    func durationRoundTripApproximate() throws {
        var rng = ReferenceSplitMix64(seed: 0xD0_0E)
        for _ in 0..<20_000 {
            let v = 1 + (rng.next() >> (10 + rng.bounded(50)))
            let back = try Duration64(parsing: Duration64(rawValue: v).description).rawValue
            let error = Double(back > v ? back - v : v - back) / Double(v)
            #expect(error <= 0.0005, "\(v)ns -> \(Duration64(rawValue: v).description)")
        }
    }

    @Test("the constructors and accessors use the right scale")
    func durationConstructors() {
        #expect(Duration64.microseconds(3).rawValue == 3_000)
        #expect(Duration64.milliseconds(3).rawValue == 3_000_000)
        #expect(Duration64.seconds(3).rawValue == 3_000_000_000)
        #expect(Duration64.milliseconds(1500).seconds == 1.5)
        #expect(Duration64.microseconds(1500).milliseconds == 1.5)
    }

    // MARK: Formatting helpers

    @Test("formatFixed and formatGrouped")
    func formatting() {
        #expect(formatFixed(1.5, digits: 3) == "1.500")
        #expect(formatFixed(-0.004, digits: 2) == "0.00")
        #expect(formatFixed(-2.345, digits: 1) == "-2.3")
        #expect(formatFixed(0.999, digits: 2) == "1.00")
        #expect(formatFixed(12, digits: 0) == "12")
        #expect(formatFixed(.nan, digits: 2) == "nan")
        #expect(formatGrouped(0) == "0")
        #expect(formatGrouped(999) == "999")
        #expect(formatGrouped(1000) == "1,000")
        #expect(formatGrouped(1_234_567) == "1,234,567")
    }
}
