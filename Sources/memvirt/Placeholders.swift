import ArgumentParser
struct BenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "bench", abstract: "Simulator speed.")
}
struct ReproduceCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "reproduce", abstract: "Seed reproductions.")
}
