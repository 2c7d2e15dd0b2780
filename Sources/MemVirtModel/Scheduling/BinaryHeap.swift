/// A binary min-heap over a preallocated array: the event queue of the discrete-event
/// simulation and the host's queue of writeback completions (swift-collections' Heap is not a
/// dependency of MemVirt; this is the textbook sift-up / sift-down).
public struct BinaryHeap<Element: Comparable>: Sendable where Element: Sendable {
    public private(set) var storage: [Element] = []
    public init() {}
    public var isEmpty: Bool { storage.isEmpty }
    public var count: Int { storage.count }
    public var min: Element? { storage.first }

    public mutating func insert(_ e: Element) {
        storage.append(e)
        var i = storage.count - 1
        while i > 0 {
            let parent = (i - 1) / 2
            if storage[i] < storage[parent] { storage.swapAt(i, parent); i = parent } else { break }
        }
    }

    @discardableResult
    public mutating func popMin() -> Element? {
        guard !storage.isEmpty else { return nil }
        let top = storage[0]
        let last = storage.removeLast()
        if !storage.isEmpty {
            storage[0] = last
            var i = 0
            let n = storage.count
            while true {
                let l = 2 * i + 1, r = l + 1
                var m = i
                if l < n && storage[l] < storage[m] { m = l }
                if r < n && storage[r] < storage[m] { m = r }
                if m == i { break }
                storage.swapAt(i, m)
                i = m
            }
        }
        return top
    }

    public mutating func removeAll() { storage.removeAll(keepingCapacity: true) }
}
