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
public struct DataPoint: Sendable, Hashable, Codable {
    public var x: Double
    public var y: Double
    public init(x: Double, y: Double) {
        self.x = x
        self.y = y
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
