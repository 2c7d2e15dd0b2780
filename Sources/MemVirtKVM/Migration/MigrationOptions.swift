import CKVM
import MemVirtCore
import MemVirtGuest
#if canImport(Glibc)
import Glibc
#endif

/// How a live migration runs (`memvirt kvm migrate`).
public struct MigrationOptions: Sendable {
    public enum Mode: String, Sendable, CaseIterable {
        /// Dirty-log rounds while the guest runs, then stop-and-copy of the rest and the vCPUs.
        case precopy
        /// Stop at once, send the vCPUs; the destination runs and pulls pages on fault while
        /// the source pushes the rest.
        case postcopy
        /// Pre-copy rounds (`maxRounds`), then post-copy for what is still dirty.
        case hybrid
    }
    public var mode: Mode = .precopy
    /// Bytes per second the sender keeps to (nil: no limit).
    public var bandwidth: UInt64? = nil
    /// Pre-copy stops iterating when the rest would take at most this long to send.
    public var downtimeTargetNanos: UInt64 = 30_000_000
    public var maxRounds = 30
    /// Seed 004's page groups: with N > 1 a group of N pages with a dirty page is sent whole and
    /// its pages are not write-protected again (fewer write-protect faults, more bytes).
    public var groupPages = 1
    /// Run the guest this long before migrating.
    public var afterNanos: UInt64 = 1_000_000_000
    /// Pace each guest thread's accesses to this many per second (nil: as fast as it goes).
    /// A uniform writer (`--write-ratio 1`) at 2,560/s dirties 10 MiB/s of 4 KiB pages.
    public var accessesPerSecond: UInt64? = nil
    /// Run the guest under the VMM-side guest kernel: per vCPU the workload thread and a
    /// counting thread sharing the vCPU by the guest timer (KernelMigration).
    public var guestKernel = false
    /// With `guestKernel`: async page faults on both sides (post-copy faults on the
    /// destination park the faulting thread while its page comes; the counting thread runs).
    public var asyncPF = false
    /// Before the guest starts, the VMM writes every data page (a pattern with no zero
    /// words): a guest whose whole memory is in use, so no page can be skipped as untouched.
    /// The workload's results then differ from the oracle's (which starts from zeroed memory);
    /// the switch-over hashes still must match.
    public var prefillData = false
    /// Post-copy: the answer to a page the destination asks for goes out this long after the
    /// request arrived (a network round trip longer than loopback's ~30 us). Pushing is not
    /// delayed: if the push in page order reaches the page first, it arrives sooner.
    public var requestRoundTripNanos: UInt64 = 0
    /// Timeouts and the pre-shared key of the connection.
    public var link = MigrationLink()
    /// A migration that fails before the switch (the guest goes on here) is tried again this
    /// many times, `retryDelayNanos` apart, while the guest still runs (`--retries`).
    public var retries = 0
    public var retryDelayNanos: UInt64 = 1_000_000_000
    /// Tests: called on the source's migration thread with the guest running, "hello" right
    /// after HELLO went out and, in post-copy, "prepared" once the runtime went before the stop
    /// (a test writes runtime pages as the VMM there; nil: nothing).
    var sourceHook: (@Sendable (GuestVM, String) -> Void)? = nil
    public init() {}
}
