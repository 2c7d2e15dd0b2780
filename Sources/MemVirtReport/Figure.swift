/// The data a reproduction is about, beside its tables: named axes with units, series of
/// points, and the reference points it reproduces (a seed's number, a paper's figure, QEMU's
/// measurement). Renderers (SVG charts in the HTML report, CSV) read these; experiments and
/// sweeps only fill them in.
public struct Axis: Sendable, Hashable, Codable {
    public enum Scale: String, Sendable, Hashable, Codable { case linear, log }
    public var label: String
    /// The unit as people write it ("cycles", "MiB", "ms", "%"); empty for counts.
    public var unit: String
    public var scale: Scale
    public init(_ label: String, unit: String = "", scale: Scale = .linear) {
        self.label = label
        self.unit = unit
        self.scale = scale
    }
}

/// One point of a series; `x` is numeric, or the index of a category for bar charts.
/// `low`/`high`: the range of `y` over repeated runs (set when `memvirt report` merges runs;
/// drawn as a whisker), absent for a single run.
public struct DataPoint: Sendable, Hashable, Codable {
    public var x: Double
    public var y: Double
    public var low: Double?
    public var high: Double?
    public init(x: Double, y: Double, low: Double? = nil, high: Double? = nil) {
        self.x = x
        self.y = y
        self.low = low
        self.high = high
    }
}

/// One named line, bar group member or stack layer.
public struct Series: Sendable, Hashable, Codable {
    public var name: String
    public var points: [DataPoint]
    public init(name: String, points: [DataPoint]) {
        self.name = name
        self.points = points
    }
}

/// A number the reproduction is compared with, drawn in a distinct style; `source` goes into
/// the caption.
public struct ReferencePoint: Sendable, Hashable, Codable {
    public var label: String
    public var x: Double
    public var y: Double
    public var source: String
    public init(label: String, x: Double, y: Double, source: String) {
        self.label = label
        self.x = x
        self.y = y
        self.source = source
    }
}

/// One chart's worth of data.
public struct Figure: Sendable, Hashable, Codable {
    public enum Kind: String, Sendable, Hashable, Codable { case line, groupedBar, stackedBar, scatter, heatmap }
    /// Stable within a report (used for file names and anchors): lowercase, digits and '-'.
    public var id: String
    public var title: String
    public var kind: Kind
    public var x: Axis
    public var y: Axis
    public var series: [Series]
    /// Category names for bar charts and heatmap rows/columns (x indexes them).
    public var categories: [String]
    public var references: [ReferencePoint]
    public var caption: String
    public init(id: String, title: String, kind: Kind, x: Axis, y: Axis, series: [Series], categories: [String] = [],
                references: [ReferencePoint] = [], caption: String = "") {
        self.id = id
        self.title = title
        self.kind = kind
        self.x = x
        self.y = y
        self.series = series
        self.categories = categories
        self.references = references
        self.caption = caption
    }
}

/// The finding of a reproduction in one sentence, with its number beside the seed's or the
/// target's, as data: the report's summary table is built from these.
public struct Headline: Sendable, Hashable, Codable {
    /// One sentence stating the finding with its number.
    public var text: String
    /// What `value` measures ("APF work ratio"), for the summary table.
    public var metric: String
    public var value: Double
    public var unit: String
    /// The seed's, paper's or closed form's number, when there is one.
    public var target: Double?
    /// Where `target` comes from ("seed 001, KVM Forum 2010").
    public var targetSource: String
    /// Whether the target is met (the reproduction's own criterion), nil when there is no target.
    public var met: Bool?
    /// Runs merged into this headline (1 for a single run); `low`/`high` their range.
    public var runs: Int
    public var low: Double?
    public var high: Double?
    public init(text: String, metric: String, value: Double, unit: String = "", target: Double? = nil, targetSource: String = "",
                met: Bool? = nil, runs: Int = 1, low: Double? = nil, high: Double? = nil) {
        self.text = text
        self.metric = metric
        self.value = value
        self.unit = unit
        self.target = target
        self.targetSource = targetSource
        self.met = met
        self.runs = runs
        self.low = low
        self.high = high
    }
}
