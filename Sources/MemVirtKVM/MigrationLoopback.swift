import MemVirtCore

extension LiveMigration {
    /// One migration within this process over loopback TCP: a destination listening on a
    /// free port on its own thread, the source here (the reproductions' way; two processes
    /// are `memvirt kvm listen` and `memvirt kvm migrate`).
    public static func loopback(_ spec: WorkloadSpec, options: MigrationOptions) throws(KVMError) -> (source: MigrationReport, destination: MigrationReport) {
        try loopback { (port) throws(KVMError) in try migrate(spec, to: "127.0.0.1", port: port, options: options) }
    }

    /// The same for any source: `source` migrates to 127.0.0.1 at the port it is given.
    public static func loopback(source: (UInt16) throws(KVMError) -> MigrationReport) throws(KVMError) -> (source: MigrationReport, destination: MigrationReport) {
        let box = ResultBox<MigrationReport>()
        let portBox = ResultBox<UInt16>()
        let t = try DedicatedThread.start(name: "memvirt-destination") {
            do { box.value = .success(try LiveMigration.listen(port: 0) { p in portBox.value = .success(p) }) } catch let e as KVMError {
                box.value = .failure(e)
                if portBox.value == nil { portBox.value = .failure(e) }
            } catch {}
        }
        while portBox.value == nil { usleepNanos(1_000_000) }
        let port: UInt16
        do { port = try portBox.value!.get() } catch { t.join(); throw error }
        let s: MigrationReport
        do { s = try source(port) } catch {
            // A source that failed before connecting leaves the destination in accept: a
            // connection closed at once ends it (a truncated stream), then it can be joined.
            if let ch = try? MigrationChannel.connect(host: "127.0.0.1", port: port) { ch.shutdownBoth() }
            t.join()
            throw error
        }
        t.join()
        guard let d = box.value else { throw KVMError.invalid("the loopback destination ended without a report") }
        return (s, try d.get())
    }
}
