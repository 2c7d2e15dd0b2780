import MemVirtCore

/// Model reproductions of dirty logging and live migration (seed 004 and issue 5).
extension Reproductions {
    static let migration: [any Experiment.Type] = [LogDirty.self, PageGroups.self, MigrationReproduction.self]
}
