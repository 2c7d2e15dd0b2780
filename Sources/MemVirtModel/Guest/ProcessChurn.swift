import MemVirtCore

/// A page-table-update-heavy guest: a parent process forks children in a loop; each child
/// touches some of the inherited memory (writes break copy-on-write), may exec a fresh image,
/// then exits; the parent then writes its own pages again. Every step is guest-kernel work on
/// page tables (fork write-protects, COW faults copy and INVLPG, exit frees tables, context
/// switches write CR3): the work where shadow paging pays (VMware's RVI study, seed 002).
public struct ProcessChurnSpec: Sendable, Hashable {
    public var iterations: Int
    /// Pages of the parent's heap (all touched before the loop).
    public var parentPages: Int
    /// Random page touches by each child.
    public var childTouches: Int
    /// Fraction of child touches that write (COW breaks).
    public var childWriteRatio: Double
    /// Pages of the image a child execs (0: no exec).
    public var execPages: Int
    /// Pages the parent writes after each child exits.
    public var parentWrites: Int
    public var seed: UInt64
    /// Page size of the parent's heap (fork shares and COW-copies whole pages of this size).
    public var pageSize: PageSize = .size4K

    public init(iterations: Int = 50, parentPages: Int = 256, childTouches: Int = 200, childWriteRatio: Double = 0.5,
                execPages: Int = 64, parentWrites: Int = 32, seed: UInt64 = 1) {
        self.iterations = iterations
        self.parentPages = parentPages
        self.childTouches = childTouches
        self.childWriteRatio = childWriteRatio
        self.execPages = execPages
        self.parentWrites = parentWrites
        self.seed = seed
    }

    public func validate() throws(InputError) {
        if iterations < 1 || parentPages < 1 || childTouches < 0 || execPages < 0 || parentWrites < 0 {
            throw InputError("process churn: counts must be positive")
        }
        if !(childWriteRatio >= 0 && childWriteRatio <= 1) { throw InputError("process churn: write ratio must be in 0...1") }
    }
}

extension Machine {
    /// Runs the fork/exec/exit loop in this machine (which starts in the parent's space).
    public func runProcessChurn(_ spec: ProcessChurnSpec, heapBase: UInt64 = WorkloadSpec.defaultBase.rawValue) throws {
        try spec.validate()
        var rng = SplitMix64(seed: spec.seed)
        let parent = space
        let heapBytes = (UInt64(spec.parentPages) * 4096 + spec.pageSize.offsetMask) & ~spec.pageSize.offsetMask
        try kernel.map(VirtualMemoryArea(start: heapBase, end: heapBase + heapBytes, pageSize: spec.pageSize, writable: true), in: parent)
        for p in 0..<spec.parentPages {
            try step(Access(address: GuestVirtualAddress(heapBase + UInt64(p) * 4096), kind: .write))
        }
        let imageBase = heapBase + (1 << 30)
        for _ in 0..<spec.iterations {
            let child = try kernel.fork(parent)
            switchAddressSpace(to: child)
            for _ in 0..<spec.childTouches {
                let page = rng.bounded(UInt64(spec.parentPages))
                let write = rng.unitDouble() < spec.childWriteRatio
                try step(Access(address: GuestVirtualAddress(heapBase + page * 4096 + rng.bounded(512) * 8), kind: write ? .write : .read))
            }
            if spec.execPages > 0 {
                try kernel.exec(child, areas: [VirtualMemoryArea(start: imageBase, end: imageBase + UInt64(spec.execPages) * 4096, pageSize: .size4K, writable: true)])
                for p in 0..<spec.execPages {
                    try step(Access(address: GuestVirtualAddress(imageBase + UInt64(p) * 4096), kind: .write))
                }
            }
            kernel.exit(child)
            switchAddressSpace(to: parent)
            for _ in 0..<spec.parentWrites {
                let page = rng.bounded(UInt64(spec.parentPages))
                try step(Access(address: GuestVirtualAddress(heapBase + page * 4096), kind: .write))
            }
        }
    }
}
