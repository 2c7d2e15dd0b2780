// Fuzz target: the multiboot loader's parsing (MemVirtKVM/Guest/Multiboot.swift,
// `MultibootImage.parse`), with no VM: the header search and checksum, required flags, the
// a.out kludge address fields and ELF32 program headers. Besides "no crash": a refusal names
// the image, and every accepted segment's file bytes fit in its memory size.
//
// Seeds: `MEMVIRT_FUZZ_SEEDS=DIR fuzz-multiboot` writes memvirt's own image
// (`Multiboot.runtimeImage()`, what `memvirt kvm image` writes) into DIR and exits.
import MemVirtCore
import MemVirtKVM

#if canImport(Glibc)
import Glibc
#endif

/// Writes to standard error (Swift 6 refuses the C `stderr` global).
func sayError(_ text: String) {
    var t = text
    t.withUTF8 { b in _ = write(2, b.baseAddress, b.count) }
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzMultiboot(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    do throws(KVMError) {
        let image = try MultibootImage.parse(bytes, name: "fuzz")
        // What the loader copies: each segment's file bytes fit its memory size.
        for seg in image.segments where UInt64(seg.bytes.count) > seg.memorySize {
            sayError("fuzz-multiboot: a segment of \(seg.bytes.count) file bytes in \(seg.memorySize) bytes of memory\n")
            abort()
        }
    } catch {
        if !error.description.hasPrefix("fuzz") && !error.description.contains("fuzz") {
            sayError("fuzz-multiboot: an error that does not name the image: \(error)\n")
            abort()
        }
    }
    return 0
}

@_cdecl("LLVMFuzzerInitialize")
public func fuzzInitialize(_ argc: UnsafeMutablePointer<Int32>, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>) -> CInt {
    guard let dir = getenv("MEMVIRT_FUZZ_SEEDS").map({ String(cString: $0) }) else { return 0 }
    let image = Multiboot.runtimeImage()
    guard let f = fopen("\(dir)/memvirt-image", "wb") else { sayError("cannot write \(dir)\n"); exit(1) }
    _ = image.withUnsafeBytes { fwrite($0.baseAddress, 1, $0.count, f) }
    fclose(f)
    print("fuzz-multiboot: wrote 1 seed (\(image.count) bytes) to \(dir)")
    exit(0)
}
