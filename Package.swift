// swift-tools-version: 6.0
import PackageDescription

// MemVirt: memory virtualization made visible, measurable and real.
// Dependencies point one way: CLI -> Experiments -> {Model, KVM} -> Core.
let package = Package(
    name: "MemVirt",
    platforms: [.macOS(.v13)],
    products: [
        .executable(name: "memvirt", targets: ["memvirt"]),
        .library(name: "MemVirtCore", targets: ["MemVirtCore"]),
        .library(name: "MemVirtModel", targets: ["MemVirtModel"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift", from: "0.1.0"),
        // HMAC-SHA256 on the migration stream (--key-file).
        .package(url: "https://github.com/apple/swift-crypto", from: "3.12.3"),
    ],
    targets: [
        .target(name: "MemVirtCore"),
        .target(
            name: "MemVirtModel", dependencies: ["MemVirtCore"],
            // The per-access loop touches class fields millions of times a second; dynamic
            // exclusivity checks there cost more than the simulated work (measured: see
            // `memvirt bench`). Static checks still apply.
            swiftSettings: [.unsafeFlags(["-enforce-exclusivity=unchecked"])]
        ),
        .target(name: "MemVirtReport", dependencies: ["MemVirtCore"]),
        // Machine profiles (TOML files compiled into the binary) and scenario files, decoded
        // strictly by MemVirt's own TOML parser.
        .target(
            name: "MemVirtConfig", dependencies: ["MemVirtCore", "MemVirtModel"],
            resources: [
                .embedInCode("Profiles/bare-metal.toml"), .embedInCode("Profiles/vmx-ept.toml"),
                .embedInCode("Profiles/pvm-shadow.toml"), .embedInCode("Profiles/zen4.toml"),
                .embedInCode("Profiles/skylake-sp.toml"),
            ]
        ),
        // The KVM engine: a C shim over <linux/kvm.h> and <linux/userfaultfd.h>, the guest
        // runtime (C and assembly, linked into the binary and copied into guest memory), and
        // the typed Swift VMM.
        // -O2: the shim's hash and zero-page loops run over all guest memory during migration.
        .target(name: "CKVM", cSettings: [.unsafeFlags(["-O2"])]),
        .target(
            name: "MemVirtGuest",
            // Guest code is copied into guest memory and runs at CPL3 at another address:
            // keep it in its own section, with no jump tables, FP/SSE or stack protector.
            cSettings: [.unsafeFlags(["-O2", "-fno-jump-tables", "-fno-stack-protector", "-mgeneral-regs-only"])]
        ),
        .target(
            name: "MemVirtKVM",
            dependencies: [
                "MemVirtCore", "CKVM", "MemVirtGuest",
                .product(name: "Histogram", package: "hdrhistogram-swift"),
                .product(name: "Crypto", package: "swift-crypto"),
            ]
        ),
        .target(
            name: "MemVirtExperiments",
            dependencies: [
                "MemVirtCore", "MemVirtModel", "MemVirtKVM", "MemVirtReport",
                // Sweep files (Sweep/SweepFile.swift) are TOML, read by MemVirtConfig's strict
                // parser against the scenario schema.
                "MemVirtConfig",
            ]
        ),
        .executableTarget(
            name: "memvirt",
            dependencies: [
                "MemVirtCore", "MemVirtModel", "MemVirtKVM", "MemVirtExperiments", "MemVirtReport", "MemVirtConfig",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .testTarget(name: "MemVirtCoreTests", dependencies: ["MemVirtCore"]),
        .testTarget(name: "MemVirtModelTests", dependencies: ["MemVirtCore", "MemVirtModel"]),
        .testTarget(name: "MemVirtConfigTests", dependencies: ["MemVirtCore", "MemVirtModel", "MemVirtConfig"]),
        .testTarget(name: "MemVirtKVMTests", dependencies: ["MemVirtCore", "MemVirtKVM", "CKVM"]),
        .testTarget(name: "MemVirtExperimentsTests", dependencies: ["MemVirtCore", "MemVirtModel", "MemVirtKVM", "MemVirtExperiments", "MemVirtReport"]),
        .testTarget(name: "MemVirtReportTests", dependencies: ["MemVirtCore", "MemVirtReport", "MemVirtExperiments"]),
    ]
)

// Fuzz targets (Fuzz/README.md, scripts/fuzz): declared only when MEMVIRT_FUZZ is set, so an
// ordinary `swift build` never sees them (they have no `main`: libFuzzer's, linked by
// `--sanitize fuzzer`, drives them). scripts/fuzz builds them in .build-fuzz.
if Context.environment["MEMVIRT_FUZZ"] != nil {
    let fuzzTargets: [(String, [Target.Dependency])] = [
        ("fuzz-units", ["MemVirtCore"]),
        ("fuzz-lackey", ["MemVirtCore", "MemVirtModel"]),
        ("fuzz-migration", ["MemVirtCore", "MemVirtKVM", "CKVM"]),
        ("fuzz-snapshot", ["MemVirtCore", "MemVirtKVM", "CKVM"]),
        ("fuzz-multiboot", ["MemVirtCore", "MemVirtKVM"]),
        ("fuzz-scenario", ["MemVirtCore", "MemVirtConfig"]),
    ]
    for (name, deps) in fuzzTargets {
        let dir = String(name.dropFirst("fuzz-".count))
        package.targets.append(.executableTarget(name: name, dependencies: deps, path: "Fuzz/Targets/\(dir)"))
        package.products.append(.executable(name: name, targets: [name]))
    }
}
