import ArgumentParser
import Foundation
import MemVirtConfig
import MemVirtCore
import MemVirtModel
import MemVirtReport

/// `memvirt run`: one workload in the model engine.
struct RunCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run", abstract: "Run a workload in the model engine and report counters and cycles.")

    @OptionGroup var workload: WorkloadOptions

    @Option(name: .long, help: "How guest memory is virtualized: native, shadow or nested.")
    var paging: String?

    @Option(name: .long, help: "Paging levels: 4 or 5.")
    var levels: Int?

    @Option(name: .customLong("host-page-size"), help: "Host page size backing guest memory (nested): 4K, 2M or 1G.")
    var hostPageSize: String?

    @Option(name: .customLong("host-levels"), help: "Host (EPT) paging levels: 4 or 5.")
    var hostLevels: Int?

    @Option(name: .customLong("host-limit"), help: "Host memory limit for the VM (nested paging), e.g. 16MiB: beyond it pages are swapped.")
    var hostLimit: String?

    @Option(name: .customLong("swap-device"), help: "Swap device model with --host-limit: hdd, sata-ssd or nvme (default).")
    var swapDevice: String?

    @Option(name: .long, help: "Machine profile: a built-in (`memvirt profile list`) or a profile file (default vmx-ept).")
    var profile: String?

    @Option(name: .long, help: "Shorthand for --profile with a built-in name: bare-metal, vmx-ept (default), pvm-shadow, zen4, skylake-sp.")
    var costs: String?

    @Option(name: .customLong("shadow-max-pages"), help: "Shadow MMU: shadow pages before recycling (default: 2% of guest pages).")
    var shadowMaxPages: Int?

    @Flag(name: .customLong("no-unsync"), help: "Shadow MMU: emulate every write to a shadowed table (no unsync leaf tables).")
    var noUnsync = false

    @Flag(name: .customLong("no-tlb"), help: "Run without TLBs and paging-structure caches (every access walks).")
    var noTLB = false

    @Flag(name: .customLong("no-walk-caches"), help: "Run without paging-structure caches.")
    var noWalkCaches = false

    @Option(name: .customLong("memory-limit"), help: "Most host memory the model may use, e.g. 8GiB (default: what the host has available); a run that needs more is refused up front.")
    var memoryLimit: String?

    @Flag(name: .long, help: "Print one JSON object on stdout (on failure: {\"error\": ...}).")
    var json = false

    @Flag(name: .long, help: "No progress on stderr.")
    var quiet = false

    func run() throws {
        try reportingErrors(json: json) { try runModel() }
    }

    /// Flags and scenario keys resolved to a model configuration; settings the chosen paging
    /// mode would ignore are refused with the reason.
    func runModel() throws {
        let scenario = try workload.loadScenario()
        let spec = try workload.spec(scenario)
        var config = ModelConfig()
        config.pageSize = try workload.pageSize(scenario)
        func from(_ key: String) -> String { scenario.map { " (\($0.location("platform." + key)))" } ?? "" }
        var kind = scenario?.paging ?? .native
        if let p = paging {
            guard let k = PagingKind(rawValue: p) else { throw CLIError("--paging '\(p)': use native, shadow or nested") }
            kind = k
        }
        config.paging = kind
        if let l = levels ?? scenario?.levels {
            guard l == 4 || l == 5 else { throw CLIError("--levels \(l): use 4 or 5") }
            config.pagingConfig.levels = l
        }

        // The machine: a profile (or --costs NAME), then the flags that change it.
        if profile != nil && costs != nil { throw CLIError("give --profile or --costs, not both (--costs NAME is a shorthand for --profile NAME)") }
        if let c = costs, !MachineProfile.builtInNames.contains(c) {
            throw CLIError("--costs '\(c)': use \(MachineProfile.builtInNames.joined(separator: ", ")) (or --profile FILE)")
        }
        let profileName = profile ?? costs ?? scenario?.profile ?? "vmx-ept"
        let folder = (profile ?? costs) == nil ? scenario.map { ($0.file as NSString).deletingLastPathComponent } : nil
        let machine: MachineProfile
        do { machine = try MachineProfile.load(profileName, relativeTo: folder) } catch {
            throw CLIError(errorMessage(error) + ((profile ?? costs) == nil ? from("profile") : ""))
        }
        machine.apply(to: &config)

        if let h = hostPageSize {
            guard let p = PageSize(parsing: h) else { throw CLIError("--host-page-size '\(h)': use 4K, 2M or 1G") }
            config.hostPageSize = p
        } else if let p = scenario?.hostPageSize {
            config.hostPageSize = p
        }
        if let l = hostLevels ?? scenario?.hostLevels {
            guard l == 4 || l == 5 else { throw CLIError("--host-levels \(l): use 4 or 5") }
            config.hostLevels = l
        }
        let hostPageSizeGiven = hostPageSize != nil || scenario?.hostPageSize != nil
        let hostLevelsGiven = hostLevels != nil || scenario?.hostLevels != nil
        let shadowMaxGiven = shadowMaxPages != nil || scenario?.shadowMaxPages != nil
        if kind == .native {
            if hostPageSizeGiven { throw CLIError("--host-page-size\(from("host_page_size")): native paging has no host pages (use --paging shadow or nested)") }
            if hostLevelsGiven { throw CLIError("--host-levels\(from("host_levels")): native paging has no host (EPT) tables (use --paging nested)") }
        }
        if kind == .shadow && hostLevelsGiven {
            throw CLIError("--host-levels\(from("host_levels")): shadow paging has no EPT tables (use --paging nested)")
        }
        if kind != .shadow && shadowMaxGiven {
            throw CLIError("--shadow-max-pages\(from("shadow_max_pages")): only the shadow MMU has shadow pages (use --paging shadow)")
        }
        if kind != .shadow && noUnsync { throw CLIError("--no-unsync: only the shadow MMU unsyncs tables (use --paging shadow)") }
        if let n = shadowMaxPages ?? scenario?.shadowMaxPages {
            guard n >= 8 else { throw CLIError("--shadow-max-pages \(n): at least 8") }
            config.shadow.maxShadowPages = n
        }
        if noUnsync { config.shadow.unsync = false }
        if let h = hostLimit {
            do { config.hostLimit = try ByteCount(parsing: h) } catch { throw CLIError("--host-limit: \(error.message)") }
        } else if let h = scenario?.hostLimit {
            config.hostLimit = h
        }
        if let h = config.hostLimit {
            guard kind == .nested else { throw CLIError("--host-limit\(hostLimit == nil ? from("host_limit") : ""): needs --paging nested (host reclaim uses EPT accessed bits)") }
            guard h.rawValue >= 64 * 4096 else { throw CLIError("--host-limit \(h): at least 256KiB") }
        }
        if let d = swapDevice ?? scenario?.swapDevice {
            guard config.hostLimit != nil else {
                throw CLIError("--swap-device\(swapDevice == nil ? from("swap_device") : ""): only used with --host-limit (without a limit nothing is swapped)")
            }
            guard let m = MachineProfile.swapDevices[d] else { throw CLIError("--swap-device '\(d)': use hdd, sata-ssd or nvme") }
            config.swapDevice = m
        }
        if noTLB { config.tlb = .none }
        if noWalkCaches { config.tlb = config.tlb.withoutWalkCaches }
        if let m = memoryLimit {
            do { config.memoryLimit = try ByteCount(parsing: m) } catch { throw CLIError("--memory-limit: \(error.message)") }
        }
        let progress = ProgressReporter(enabled: !quiet && !json || !quiet && isatty(2) != 0)
        var result: RunResult
        do {
            result = try ModelEngine.run(spec: spec, config: config, progress: progress.callback)
        } catch let e as InputError {
            progress.finish()
            throw CLIError(e.message)
        } catch let e as GuestError {
            progress.finish()
            if json {
                print(JSONValue.object([("error", .string("the guest failed: \(e.message)"))]).rendered())
            } else {
                printError("memvirt run: the guest failed: \(e.message)")
            }
            throw ExitCode(3)
        }
        progress.finish()
        result.extra.append(("profile", machine.summaryJSON))
        // Output that cannot be written is a failure (issue 17: `run --json > /dev/full` exited 0).
        let text = json ? result.json.rendered(pretty: false)
            : TextReport.run(result) + "\nprofile: \(machine.name) (\(machine.origin.rawValue), \(machine.date))"
        do { try Output.standardOutput(text + "\n") } catch { throw CLIError(error.message) }
    }
}

/// Progress on stderr for long runs: at most every half second, overwritten in place.
final class ProgressReporter: @unchecked Sendable {
    let enabled: Bool
    var last: Double = 0
    let clock = WallClock()
    var printed = false
    init(enabled: Bool) { self.enabled = enabled }

    var callback: ((UInt64, UInt64) -> Void)? {
        guard enabled else { return nil }
        return { [self] done, total in
            let t = clock.seconds
            guard t - last >= 0.5 else { return }
            last = t
            printed = true
            let pct = total > 0 ? " (\(formatFixed(100 * Double(done) / Double(total), digits: 0))%)" : ""
            FileHandle.standardError.write(Data("\r  \(formatGrouped(done)) accesses\(pct), \(formatFixed(t, digits: 1)) s".utf8))
        }
    }

    func finish() {
        if printed { FileHandle.standardError.write(Data("\r\u{1B}[K".utf8)) }
    }
}
