import MemVirtCore

/// Kernel samepage merging (mm/ksm.c, Documentation/admin-guide/mm/ksm.rst), as ksmd does it:
/// every wake-up it looks at `pages_to_scan` pages; a page whose checksum changed since the
/// last look is volatile and skipped; otherwise it is searched in the stable tree (pages
/// already shared), then in the unstable tree (candidates of this pass, rebuilt every full
/// pass); equal content (hash, then a full comparison) is merged into one write-protected
/// frame, and the next write to it breaks the share with a copy-on-write fault.
///
/// `pages_shared`: KSM frames in use; `pages_sharing`: further mappings of them (the frames
/// saved). KSM frames are not swapped here (Linux can swap them since 2.6.33).
struct KSMState {
    /// Content hash -> KSM frames with that hash.
    var stable: [UInt64: [UInt32]] = [:]
    /// KSM frame -> its content hash.
    var hashOf: [UInt32: UInt64] = [:]
    /// Content hash -> a candidate page (owner, gfn) seen in this pass.
    var unstable: [UInt64: (Int, Int)] = [:]
    /// Per owner, per guest frame: the content hash at the last look (0: never looked).
    var lastHash: [[UInt64]] = []
    var cursorOwner = 0
    var cursorGfn = 0
    var pagesShared: UInt64 = 0
    var pagesSharing: UInt64 = 0
    var fullScans: UInt64 = 0
    var pagesScanned: UInt64 = 0
    var merges: UInt64 = 0
    var cycles: Double = 0
}

/// What KSM has done so far.
public struct KSMStats: Sendable, Equatable {
    public var pagesShared: UInt64
    public var pagesSharing: UInt64
    public var fullScans: UInt64
    public var pagesScanned: UInt64
    public var merges: UInt64
    /// ksmd's own CPU time, cycles (a host thread, not a vCPU).
    public var cycles: Double
}

extension HostMemory {
    public var ksmStats: KSMStats {
        KSMStats(pagesShared: ksm.pagesShared, pagesSharing: ksm.pagesSharing, fullScans: ksm.fullScans,
                 pagesScanned: ksm.pagesScanned, merges: ksm.merges, cycles: ksm.cycles)
    }

    func framesEqual(_ a: UInt32, _ b: UInt32) -> Bool {
        let x = UInt64(a) << 12, y = UInt64(b) << 12
        var i: UInt64 = 0
        while i < 4096 {
            if memory.read64(x + i) != memory.read64(y + i) { return false }
            i += 8
        }
        return true
    }

    func frameHash(_ n: UInt32) -> UInt64 {
        var h: UInt64 = FNV1a.offsetBasis
        memory.hash(UInt64(n) << 12, bytes: 4096, into: &h)
        return h == 0 ? 1 : h
    }

    /// One ksmd wake-up: looks at up to `pages` resident pages (default pages_to_scan).
    public func ksmScan(pages: Int? = nil) {
        let quota = pages ?? costs.ksmPagesToScan
        while ksm.lastHash.count < owners.count { ksm.lastHash.append(Array(repeating: 0, count: owners[ksm.lastHash.count].pages.count)) }
        guard !owners.isEmpty else { return }
        let total = owners.reduce(0) { $0 + $1.pages.count }
        var looked = 0
        var stepped = 0
        while looked < quota && stepped < total {
            stepped += 1
            if ksm.cursorGfn >= owners[ksm.cursorOwner].pages.count {
                ksm.cursorGfn = 0
                ksm.cursorOwner += 1
                if ksm.cursorOwner >= owners.count {
                    ksm.cursorOwner = 0
                    ksm.fullScans += 1
                    ksm.unstable.removeAll(keepingCapacity: true)
                }
            }
            let o = ksm.cursorOwner, g = ksm.cursorGfn
            ksm.cursorGfn += 1
            let p = owners[o].pages[g]
            guard p.state == .resident, info[Int(p.frame)].state == .inUse else { continue }
            looked += 1
            ksm.pagesScanned += 1
            ksm.cycles += costs.ksmScanPerPage
            let h = frameHash(p.frame)
            if ksm.lastHash[o][g] != h {
                ksm.lastHash[o][g] = h
                continue  // volatile: changed since the last look
            }
            if let candidates = ksm.stable[h], let k = candidates.first(where: { framesEqual($0, p.frame) }) {
                share(owner: o, gfn: g, into: k)
                continue
            }
            if let (o2, g2) = ksm.unstable[h], (o2, g2) != (o, g) {
                let q = owners[o2].pages[g2]
                if q.state == .resident, info[Int(q.frame)].state == .inUse, framesEqual(q.frame, p.frame) {
                    ksm.unstable[h] = nil
                    // The tree page becomes the KSM page; both mappings are write-protected.
                    let k = q.frame
                    ksm.cycles += costs.ksmMerge + costs.remoteFlushInitiator
                    if q.mapped { owners[o2].mapper.zap(gfn: UInt64(g2)) }
                    if q.slot >= 0 { store.release(q.slot) }
                    owners[o2].pages[g2] = Page(frame: k, slot: -1, state: .ksm, mapped: false, dirty: false)
                    info[Int(k)].state = .ksm
                    info[Int(k)].owner = -1
                    info[Int(k)].sharers = 1
                    ksm.stable[h, default: []].append(k)
                    ksm.hashOf[k] = h
                    ksm.pagesShared += 1
                    share(owner: o, gfn: g, into: k)
                    continue
                }
            }
            ksm.unstable[h] = (o, g)
        }
    }

    /// Maps page (o, g) onto KSM frame `k` and frees its own frame.
    func share(owner o: Int, gfn g: Int, into k: UInt32) {
        let p = owners[o].pages[g]
        ksm.cycles += costs.ksmMerge + costs.remoteFlushInitiator
        if p.mapped { owners[o].mapper.zap(gfn: UInt64(g)) }
        if p.slot >= 0 { store.release(p.slot) }
        releaseFrame(p.frame)
        owners[o].pages[g] = Page(frame: k, slot: -1, state: .ksm, mapped: false, dirty: false)
        info[Int(k)].sharers += 1
        ksm.pagesSharing += 1
        ksm.merges += 1
    }

    /// A mapping of KSM frame `k` went away (copy-on-write break).
    func ksmUnshare(frame k: UInt32) {
        precondition(info[Int(k)].state == .ksm && info[Int(k)].sharers > 0)
        info[Int(k)].sharers -= 1
        if info[Int(k)].sharers >= 1 {
            ksm.pagesSharing -= 1
        } else {
            ksm.pagesShared -= 1
            if let h = ksm.hashOf.removeValue(forKey: k) {
                ksm.stable[h]?.removeAll { $0 == k }
                if ksm.stable[h]?.isEmpty == true { ksm.stable[h] = nil }
            }
            releaseFrame(k)
        }
    }
}
