import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Progress of a batch of reproductions on stderr (never stdout): on a terminal one line
/// rewritten in place ("[2/11] rvi: random reads ... | 0:42 elapsed | ~3:10 left"); otherwise
/// plain lines, one per message.
public final class ProgressLine: @unchecked Sendable {
    public let total: Int
    public let terminal: Bool
    private let write: @Sendable (String) -> Void
    private let clock: @Sendable () -> Double
    private let lock = NSLock()
    private var index = 0
    private var name = ""
    private let start: Double
    private var itemStart: Double
    private var finished: [Double] = []
    private var shown = false

    /// `terminal`: rewrite one line in place (default: whether stderr is a terminal).
    public init(total: Int, terminal: Bool = isatty(2) != 0,
                write: @escaping @Sendable (String) -> Void = { FileHandle.standardError.write(Data($0.utf8)) },
                clock: @escaping @Sendable () -> Double = { Date().timeIntervalSinceReferenceDate }) {
        self.total = total
        self.terminal = terminal
        self.write = write
        self.clock = clock
        start = clock()
        itemStart = start
    }

    /// m:ss or h:mm:ss.
    public static func duration(_ s: Double) -> String {
        let t = Int(max(0, s).rounded())
        return t >= 3600 ? String(format: "%d:%02d:%02d", t / 3600, t / 60 % 60, t % 60) : String(format: "%d:%02d", t / 60, t % 60)
    }

    /// What is left: the mean of finished reproductions for each one not finished, less the
    /// current one's elapsed time (at least zero); nil before the first finishes.
    public func estimateLeft(now: Double) -> Double? {
        guard !finished.isEmpty else { return nil }
        let mean = finished.reduce(0, +) / Double(finished.count)
        let remaining = Double(total - finished.count)
        return max(0, mean * remaining - (now - itemStart))
    }

    /// Reproduction `i` (1-based) named `name` starts.
    public func begin(_ i: Int, _ name: String) {
        lock.lock()
        defer { lock.unlock() }
        index = i
        self.name = name
        itemStart = clock()
        emit(name)
    }

    /// A step of the current reproduction (its case).
    public func update(_ message: String) {
        lock.lock()
        defer { lock.unlock() }
        emit(message)
    }

    /// The current reproduction finished.
    public func end() {
        lock.lock()
        defer { lock.unlock() }
        finished.append(clock() - itemStart)
    }

    /// Clears the in-place line (call before printing anything else to stderr, and at the end).
    public func clear() {
        lock.lock()
        defer { lock.unlock() }
        if terminal && shown { write("\r\u{1B}[2K") }
        shown = false
    }

    /// The text of a progress line (without the terminal's control codes).
    public func text(_ message: String, now: Double) -> String {
        var s = "[\(index)/\(total)] \(message) | \(Self.duration(now - start)) elapsed"
        if let left = estimateLeft(now: now) { s += " | ~\(Self.duration(left)) left" }
        return s
    }

    private func emit(_ message: String) {
        let now = clock()
        let line = text(message, now: now)
        if terminal {
            let width = Self.terminalWidth()
            let cut = line.count > width - 1 ? String(line.prefix(max(width - 2, 10))) + "…" : line
            write("\r\u{1B}[2K" + cut)
            shown = true
        } else {
            write(line + "\n")
        }
    }

    static func terminalWidth() -> Int {
        #if canImport(Glibc)
        var w = winsize()
        if ioctl(2, UInt(TIOCGWINSZ), &w) == 0, w.ws_col > 0 { return Int(w.ws_col) }
        #endif
        return 100
    }
}
