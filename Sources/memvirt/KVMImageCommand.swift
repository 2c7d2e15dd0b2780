import ArgumentParser
import Foundation
import MemVirtCore
import MemVirtKVM

/// `memvirt kvm image`: the guest runtime as a multiboot (v1) ELF32 image.
struct KVMImageCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "image",
        abstract: "Write the guest runtime as a multiboot image, bootable by `memvirt kvm run --kernel` and `qemu-system-x86_64 -kernel`.",
        discussion: """
            The workload comes from the command line (QEMU: -append), e.g.
              pattern=uniform footprint=64MiB accesses=2M write-ratio=0.3 seed=1
            and optionally compute=N, rate=N (accesses/s), tsc-khz=N, gap-us=N. The guest reports on
            port 0xe9 (QEMU: -device isa-debugcon,iobase=0xe9,chardev=...) and powers off through
            port 0xf4 (QEMU: -device isa-debug-exit,iobase=0xf4,iosize=4; QEMU then exits with 1).
            Its workload lives at 4 MiB: give the VM footprint + 4 MiB of RAM or more.
            """)

    @Option(name: .long, help: "Where to write the image.")
    var out: String

    func run() throws {
        let bytes = Multiboot.runtimeImage()
        // Every write checked (issue 17: `--out /dev/full` exited 0).
        do { try Output.writeFile(out, bytes) } catch {
            printError("memvirt kvm image: \(error.message)")
            throw ExitCode.failure
        }
        printError("memvirt kvm image: wrote \(out) (\(bytes.count) bytes, multiboot ELF32, loads at 0x100000)")
    }
}

/// `memvirt kvm run --kernel FILE`: a multiboot image instead of a workload.
struct KernelOptions: ParsableArguments {
    @Option(name: .long, help: "Boot this multiboot (v1) image as QEMU's -kernel does (ELF32 or a.out kludge).")
    var kernel: String?

    @Option(name: .long, help: "With --kernel: the command line (the guest gets \"KERNEL ARGS\", as under QEMU).")
    var append: String?

    @Option(name: .long, help: "With --kernel: guest RAM (default 128MiB, as QEMU).")
    var memory: String?

    /// QEMU's default guest RAM.
    static let defaultMemory = "128MiB"

    func memoryBytes() throws -> UInt64 {
        do { return try ByteCount(parsing: memory ?? Self.defaultMemory).rawValue } catch { throw ValidationError("--memory: \(error.message)") }
    }

    /// What the guest gets: "KERNEL ARGS", as QEMU passes it.
    func cmdline(_ path: String) -> String { (append ?? "").isEmpty ? path : path + " " + append! }

    func run(json: Bool, maxRunNanos: UInt64? = nil, memoryLimit: UInt64? = nil) throws {
        guard let path = kernel else { return }
        let mem = try memoryBytes()
        let r: MultibootRunReport
        do {
            let image = try Multiboot.read(path: path)
            r = try Multiboot.run(image, memory: mem, cmdline: cmdline(path), timeoutNanos: maxRunNanos ?? Multiboot.defaultMaxRunNanos, memoryLimit: memoryLimit)
        } catch {
            throw KVMCommand.failure("memvirt kvm run --kernel", error, json: json)
        }
        if json {
            print(r.json.rendered(pretty: true))
        } else {
            print(r.console, terminator: r.console.hasSuffix("\n") || r.console.isEmpty ? "" : "\n")
            print("memvirt: guest powered off with \(r.exitValue.map { "0x" + String($0, radix: 16) } ?? "-") after \(formatFixed(Double(r.wallNanos) / 1e9, digits: 3)) s (\(r.format), \(ByteCount(r.memoryBytes)) RAM; exits \(r.vcpuStats["exits"]), emulated instructions \(r.vcpuStats["insn_emulation"]))")
        }
        try KVMCommand.finishOutput("memvirt kvm run --kernel")
        if r.exitValue != 0 { throw ExitCode.failure }
    }
}
