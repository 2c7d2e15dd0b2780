import MemVirtCore

extension LiveMigration {
    /// One migration within this process over loopback TCP: a destination listening on a
    /// free port on its own thread, the source here (the reproductions' way; two processes
    /// are `memvirt kvm listen` and `memvirt kvm migrate`).
    public static func loopback(_ spec: WorkloadSpec, options: MigrationOptions) throws(KVMError) -> (source: MigrationReport, destination: MigrationReport) {
        try loopback(link: options.link) { (port) throws(KVMError) in try migrate(spec, to: "127.0.0.1", port: port, options: options) }
    }

    /// The same for any source: `source` migrates to 127.0.0.1 at the port it is given.
    public static func loopback(link: MigrationLink = MigrationLink(), source: (UInt16) throws(KVMError) -> MigrationReport) throws(KVMError) -> (source: MigrationReport, destination: MigrationReport) {
        let box = ResultBox<MigrationReport>()
        let bound = Handoff<Result<UInt16, KVMError>>()
        let t = try DedicatedThread.start(name: "memvirt-destination") {
            do { box.value = .success(try LiveMigration.listen(port: 0, link: link) { p in bound.put(.success(p)) }) } catch let e as KVMError {
                box.value = .failure(e)
                bound.put(.failure(e))  // ignored once the port was handed over
            } catch {}
        }
        let port: UInt16
        do { port = try bound.take().get() } catch { t.join(); throw error }
        // A source that never connected leaves the destination in accept: a connection closed
        // at once ends it (a truncated stream). Harmless once the destination has finished
        // (its listener is closed: the connect is refused).
        func release() { if let ch = try? MigrationChannel.connect(host: "127.0.0.1", port: port) { ch.shutdownBoth() } }
        let s: MigrationReport
        do { s = try source(port) } catch {
            release()
            t.join()
            throw error
        }
        if !s.migrated { release() }
        t.join()  // synchronizes `box`
        guard let d = box.value else { throw KVMError.invalid("the loopback destination ended without a report") }
        return (s, try d.get())
    }
}
