import MemVirtCore

/// A host memory limit too small for one access: under nested paging an access needs every
/// guest page its walk reads (one guest page-table page per level) and its data page resident
/// at once. With a limit below that, each EPT violation's reclaim evicts a page the same walk
/// needs, the retried walk faults on it, and so on: with swap room left nothing ever fails, and
/// the access would retry forever (the run used to stop at the CPU's retry bound with "did not
/// resolve after 64 faults"). Linux would report the same situation as an out-of-memory in the
/// memory cgroup once reclaim makes no progress (mem_cgroup_out_of_memory after
/// try_to_free_mem_cgroup_pages fails MAX_RECLAIM_RETRIES times); here it is a run error
/// naming the limit and what one access needs.
extension NestedPaging {
    /// Host faults one access can legitimately take before it translates: one per guest
    /// page-table page of the walk and the data page, plus a write's second fault (a KSM copy,
    /// a write-protected leaf), with room to spare: `4 x (levels + 1)`, below the CPU's bound of 64.
    static func hostRetryBound(levels: Int) -> Int { 4 * (levels + 1) }

    /// Counts consecutive host-fault retries of one access (the same vCPU and address: another
    /// access in between, such as another guest thread's after an async page fault, starts the
    /// count again); past the bound, with a limit on host memory, turns the retry into a host
    /// failure that says why.
    func hostLimitCheck(_ outcome: MissOutcome, va: UInt64, cpu: ModelCPU) -> MissOutcome {
        let id = ObjectIdentifier(cpu)
        let levels = cpu.paging.levels
        switch outcome {
        case .retry:
            let same = hostRetriesAccess.map { $0.cpu == id && $0.va == va } ?? false
            hostRetriesInRow = same ? hostRetriesInRow + 1 : 1
            hostRetriesAccess = (id, va)
            guard hostRetriesInRow > Self.hostRetryBound(levels: levels), let limit = hostMemory.limitFrames else { return outcome }
            hostRetriesInRow = 0
            return .hostFailure(InputError(
                "host memory exhausted: a limit of \(ByteCount(limit << 12)) (\(limit) pages) cannot keep resident the \(levels + 1) guest pages one access needs at once "
                + "(\(levels) guest page-table pages on the walk to \(GuestVirtualAddress(va)) and the data page): each host fault's reclaim evicted a page the same walk needs "
                + "(\(Self.hostRetryBound(levels: levels)) host faults without progress, \(hostMemory.evicted) pages evicted so far); raise the host limit"))
        default:
            hostRetriesInRow = 0
            return outcome
        }
    }
}
