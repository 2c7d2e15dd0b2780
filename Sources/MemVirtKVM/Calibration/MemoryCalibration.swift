import MemVirtCore

/// `kvm calibrate`'s benchmarks of the host's memory events inside KVM's faults that the
/// validation cases meet and the other benchmarks do not isolate.
///
/// zero_page_cow_write: a guest write to a 4 KiB page the guest read before. The read
/// (first_touch_read) left the page mapped on the host's zero page (KVM's GUP for read of a
/// never-written anonymous page, MADV_NOHUGEPAGE); the write exits on the read-only spte, KVM's
/// GUP for write runs do_wp_page -> wp_page_copy (a zeroed page for the zero pfn), whose
/// mmu-notifier invalidation zaps the spte and flushes TLBs (kvm_flush_remote_tlbs), so the
/// fault is stale and retried (is_page_fault_stale), and the re-executed write is fixed:
/// pf_taken 2 and pf_fixed 1 per event. Timed by the guest's TSC around the write, on the same
/// pages first_touch_read read in the same round, so the two are measured within a second of
/// each other. The model charges the event as two shadow faults and CostModel.hostZeroPageCopy:
/// that parameter is this benchmark minus two first reads (exit + handler each).
extension KVMCalibration {
    static let zeroPageCOWBenchmark = "zero_page_cow_write"
    static let zeroPageCOWMethod =
        "guest write to a 4 KiB page it read before (first_touch_read left it on the host's zero page): KVM's GUP for write copies the zero page (do_wp_page -> wp_page_copy), the mmu-notifier invalidation zaps the spte and flushes, the stale fault is retried and fixed; guest TSC"

    /// The writes of zero_page_cow_write over `pages` pages from `firstPage` of `g`'s data,
    /// each of which the guest has read and not written.
    static func zeroPageCOWSamples(_ g: GuestVM, firstPage: Int, pages: Int) throws(KVMError) -> [Double] {
        try firstTouchSamples(g, firstPage: firstPage, pages: pages, write: true)
    }
}
