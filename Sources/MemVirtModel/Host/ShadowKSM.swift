import MemVirtCore

/// KSM under shadow paging (mm/ksm.c as KVM sees it through mmu notifiers): guest frames whose
/// host pages hold equal content are merged onto one read-only KSM page; a guest write to a
/// merged frame is a copy-on-write break in the host.
///
/// Merging (ksmd's `try_to_merge_one_page`: `write_protect_page`, then `replace_page`) runs
/// the mmu-notifier invalidation on every merged frame: KVM's `kvm_unmap_gfn_range` zaps its
/// shadow entries through the rmap and the TLBs are flushed. A later read maps the KSM page
/// read-only. A later write faults into KVM, whose `hva_to_pfn` asks for the page writable
/// (get_user_pages with FOLL_WRITE -> `do_wp_page` -> `wp_page_copy`): the host copies the
/// page, and the copy's own invalidation makes the waiting KVM fault stale
/// (`is_page_fault_stale`): RET_PF_RETRY, the guest re-executes the write, and the second fault
/// maps the private copy writable (`pf_fixed`). So a break costs two exits and two
/// `pf_taken`, one `pf_fixed`, one host minor fault, and `HostCosts.pageCopy`.
///
/// Groups follow KSM's stable tree: pages of equal content merge onto one KSM page, at most
/// `maxPageSharing` mappings on one (`max_page_sharing`, default 256: a larger group makes
/// several KSM pages, each needing two mappings); with `useZeroPages` empty pages are not
/// merged with each other but mapped on the zero page (`ksm_zero_pages`).
///
/// Limits (not needed by the validate case, which only writes merged pages): the guest
/// kernel's own stores (`ShadowGuestMemory`) to a merged frame are not broken first, and the
/// shadow MMU's host-frame -> gfn map keeps one gfn per KSM page, so read mappings of one KSM
/// page from several gfns keep their rmap entries until those gfns are remapped.
public final class ShadowKSM {
    public struct Stats: Sendable, Equatable {
        /// KSM pages made (pages_shared) and mappings of them beyond the first (pages_sharing).
        public var pagesShared: UInt64 = 0
        public var pagesSharing: UInt64 = 0
        /// Merged frames that had a present shadow entry zapped.
        public var zappedMappings: UInt64 = 0
        /// Copy-on-write breaks (guest writes to merged frames).
        public var cowBreaks: UInt64 = 0
    }

    public let costs: HostCosts
    public let maxPageSharing: Int
    public private(set) var stats = Stats()
    /// gfn -> KSM page (host frame) it is mapped on.
    var shared: [UInt64: UInt64] = [:]
    /// KSM page -> mappings left.
    var sharers: [UInt64: Int] = [:]

    public init(costs: HostCosts, maxPageSharing: Int = 256) throws(InputError) {
        guard maxPageSharing >= 2 else { throw InputError("KSM max_page_sharing \(maxPageSharing): at least 2") }
        self.costs = costs
        self.maxPageSharing = maxPageSharing
    }

    @inline(__always) func isShared(_ gfn: UInt64) -> Bool { !shared.isEmpty && shared[gfn] != nil }
    /// Whether guest frame `gfn` is mapped on a KSM page now.
    public func isMerged(gfn: UInt64) -> Bool { isShared(gfn) }

    /// Merges the backed frames among `gfns` by content (ksmd's full scan, with the checksum
    /// stable: the frames are not written meanwhile). Returns the frames merged.
    @discardableResult
    public func merge(gfns: [UInt64], mode: ShadowPaging, cpu: ModelCPU) -> Int {
        // Group by content: a hash, confirmed word by word against the group's first page (memcmp).
        var groups: [UInt64: [[UInt64]]] = [:]
        var order: [UInt64] = []
        for g in gfns where shared[g] == nil {
            guard let page = mode.backedPage(g) else { continue }
            var h: UInt64 = FNV1a.offsetBasis
            mode.host.hash(page, bytes: 4096, into: &h)
            if groups[h] == nil { order.append(h) }
            var placed = false
            for i in groups[h, default: []].indices {
                if let first = groups[h]![i].first, let fp = mode.backedPage(first), Self.equal(mode.host, fp, page) {
                    groups[h]![i].append(g)
                    placed = true
                    break
                }
            }
            if !placed { groups[h, default: []].append([g]) }
        }
        var merged = 0
        for h in order {
            for group in groups[h]! where group.count >= 2 {
                // Chunks of at most maxPageSharing mappings; a lone leftover does not merge.
                var start = 0
                while group.count - start >= 2 {
                    let chunk = Array(group[start..<min(group.count, start + maxPageSharing)])
                    start += chunk.count
                    let ksmPage = mode.backedPage(chunk[0])!
                    stats.pagesShared += 1
                    stats.pagesSharing += UInt64(chunk.count - 1)
                    sharers[ksmPage] = chunk.count
                    for g in chunk {
                        // write_protect_page / replace_page: the invalidation zaps g's sptes.
                        if mode.remap(gfn: g, to: ksmPage, freeOld: g != chunk[0], cpu: cpu) { stats.zappedMappings += 1 }
                        shared[g] = ksmPage
                        merged += 1
                    }
                }
            }
        }
        return merged
    }

    static func equal(_ m: PhysicalMemory, _ a: UInt64, _ b: UInt64) -> Bool {
        if a == b { return true }
        for w in stride(from: UInt64(0), to: 4096, by: 8) where m.read64(a + w) != m.read64(b + w) { return false }
        return true
    }

    /// A guest write to merged `gfn`: the host's copy-on-write (wp_page_copy) gives it a private
    /// copy; the copy's invalidation zaps its sptes. The caller retries the fault.
    func breakCOW(_ gfn: UInt64, mode: ShadowPaging, cpu: ModelCPU) {
        guard let ksmPage = shared.removeValue(forKey: gfn) else { return }
        guard let frame = mode.hostFrames.allocate(.size4K) else { preconditionFailure("host memory exhausted") }
        mode.host.copy(from: ksmPage, to: frame, bytes: 4096)
        stats.cowBreaks += 1
        cpu.ledger.charge(.hostFaults, costs.pageCopy)
        mode.hostFaults &+= 1
        _ = mode.remap(gfn: gfn, to: frame, freeOld: false, cpu: cpu)
        let left = (sharers[ksmPage] ?? 1) - 1
        if left == 0 {
            sharers[ksmPage] = nil
            mode.hostFrames.free(ksmPage, .size4K)
        } else {
            sharers[ksmPage] = left
        }
    }
}

extension ShadowPaging {
    /// Points `gfn` at host page `page` (KSM's replace_page, a COW break's new page): the
    /// mmu-notifier invalidation zaps its leaf sptes (kvm_unmap_gfn_range) and flushes when one
    /// was present. `freeOld`: the page it leaves is freed. Returns whether an spte was zapped.
    func remap(gfn: UInt64, to page: UInt64, freeOld: Bool, cpu: ModelCPU) -> Bool {
        let zapped = zapLeafMappings(of: gfn, cpu: cpu)
        let old = p2m.read64(gfn << 3)
        p2m.write64(gfn << 3, page)
        if old != 0 && old != page && freeOld {
            gfnOfHost[old >> 12] = nil
            hostFrames.free(old, .size4K)
        }
        return zapped
    }

    /// The host page backing guest frame `gfn`, nil if none yet (set-up code that fills guest
    /// memory as the guest would).
    public func hostPage(gfn: UInt64) -> UInt64? { backedPage(gfn) }

    /// Puts guest RAM under `ksm` (nil: none).
    public func attach(ksm: ShadowKSM?) {
        ksmState = ksm
    }
}
