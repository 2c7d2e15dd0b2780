#if canImport(Glibc)
import Glibc
nonisolated(unsafe) let stderrStream = Glibc.stderr!
#elseif canImport(Darwin)
import Darwin
nonisolated(unsafe) let stderrStream = Darwin.stderr
#endif
