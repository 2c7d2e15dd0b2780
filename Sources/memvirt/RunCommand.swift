import ArgumentParser
import Foundation
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

    @Option(name: .long, help: "Cost preset: bare-metal, vmx-ept (default) or pvm-shadow (constants measured on one kvm_pvm machine in 2026-12, not this one).")
    var costs: String?

    @Option(name: .customLong("shadow-max-pages"), help: "Shadow MMU: shadow pages before recycling (default: 2% of guest pages).")
    var shadowMaxPages: Int?

    @Flag(name: .customLong("no-unsync"), help: "Shadow MMU: emulate every write to a shadowed table (no unsync leaf tables).")
    var noUnsync = false

    @Flag(name: .customLong("no-tlb"), help: "Run without TLBs and paging-structure caches (every access walks).")
    var noTLB = false

    @Flag(name: .customLong("no-walk-caches"), help: "Run without paging-structure caches.")
    var noWalkCaches = false

    @Flag(name: .long, help: "Print one JSON object on stdout.")
    var json = false

    @Flag(name: .long, help: "No progress on stderr.")
    var quiet = false

    func run() throws {
        let spec = try workload.spec()
        var config = ModelConfig()
        config.pageSize = try workload.resolvedPageSize()
        let pagingText = try paging ?? workload.platformValue("paging") ?? "native"
        guard let kind = PagingKind(rawValue: pagingText) else {
            throw CLIError("paging '\(pagingText)': use native, shadow or nested")
        }
        config.paging = kind
        if let l = levels {
            guard l == 4 || l == 5 else { throw CLIError("levels \(l): use 4 or 5") }
            config.pagingConfig.levels = l
        }
        if let h = try hostPageSize ?? workload.platformValue("host_page_size") {
            guard let p = PageSize(parsing: h) else { throw CLIError("host page size '\(h)': use 4K, 2M or 1G") }
            config.hostPageSize = p
        }
        if let l = hostLevels {
            guard l == 4 || l == 5 else { throw CLIError("host levels \(l): use 4 or 5") }
            config.hostLevels = l
        }
        let costName = try costs ?? workload.platformValue("costs") ?? "vmx-ept"
        guard let preset = CostModel.presets[costName] else {
            throw CLIError("costs '\(costName)': use \(CostModel.presets.keys.sorted().joined(separator: ", "))")
        }
        config.costs = preset
        if let n = shadowMaxPages {
            guard n >= 8 else { throw CLIError("shadow-max-pages \(n): at least 8") }
            config.shadow.maxShadowPages = n
        }
        if noUnsync { config.shadow.unsync = false }
        if let h = try hostLimit ?? workload.platformValue("host_limit") {
            guard kind == .nested else { throw CLIError("--host-limit needs --paging nested (host reclaim uses EPT accessed bits)") }
            do { config.hostLimit = try ByteCount(parsing: h) } catch { throw CLIError("host limit: \(error.message)") }
            guard config.hostLimit!.rawValue >= 64 * 4096 else { throw CLIError("host limit \(h): at least 256KiB") }
        }
        if let d = try swapDevice ?? workload.platformValue("swap_device") {
            let devices: [String: SwapDeviceModel] = ["hdd": .hdd, "sata-ssd": .sataSSD, "nvme": .nvme]
            guard let m = devices[d] else { throw CLIError("swap device '\(d)': use hdd, sata-ssd or nvme") }
            config.swapDevice = m
        }
        if noTLB { config.tlb = .none }
        if noWalkCaches { config.tlb = config.tlb.withoutWalkCaches }
        let progress = ProgressReporter(enabled: !quiet && !json || !quiet && isatty(2) != 0)
        let result: RunResult
        do {
            result = try ModelEngine.run(spec: spec, config: config, progress: progress.callback)
        } catch let e as InputError {
            progress.finish()
            throw CLIError(e.message)
        } catch let e as GuestError {
            progress.finish()
            printError("memvirt run: the guest failed: \(e.message)")
            throw ExitCode(3)
        }
        progress.finish()
        if json {
            print(result.json.rendered(pretty: false))
        } else {
            print(TextReport.run(result))
        }
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
