import Foundation
import MemVirtCore
import MemVirtReport

extension SweepMerge {
    /// `memvirt report DIR` for a sweep's result folder: one section named after the folder,
    /// with the merged tables and the charts along the sweep's axes; nil for a folder that holds
    /// no sweep results (another reader, or an error, takes it then).
    public static let reportReader: ReportLoader.DirectoryReader = { directory in
        let names = (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []
        guard names.contains(where: { $0.hasSuffix(".json") }) else { return nil }
        let m: SweepMerge
        do { m = try SweepMerge(directory: directory) } catch { return nil }
        let name = "sweep-" + ((directory as NSString).standardizingPath as NSString).lastPathComponent
        let axes = m.axes.map { "\($0) (\(m.axisValues[$0]?.count ?? 0) values)" }.joined(separator: ", ")
        return [ReportSection(name: name, engine: "model", title: "Sweep of \(m.rows.count) points over \(axes)",
                              figures: m.figures(), tables: m.tables,
                              notes: ["One row per point with every counter: \(name)/points.csv."], sources: [directory])]
    }
}
