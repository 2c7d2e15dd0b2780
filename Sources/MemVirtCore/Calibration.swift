/// One cost measured on a real host by `memvirt kvm calibrate`: the hand-off between the KVM
/// engine (which measures) and machine profiles (which the model reads). Neither engine knows
/// the other; both speak this.
public struct CalibratedCost: Sendable, Hashable, Codable {
    /// The `CostModel` parameter this measurement sets, by its Swift property name
    /// (for instance `vmExitRoundTrip`, `shadowFaultHandler`, `instructionEmulation`).
    public var parameter: String
    /// Median, 10th and 90th percentile of the samples, in nanoseconds of wall time on the host
    /// (a profile turns them into cycles at its own clock).
    public var medianNanos: Double
    public var p10Nanos: Double
    public var p90Nanos: Double
    /// Samples taken after warm-up.
    public var samples: Int
    /// How it was measured, one line (the guest operation, what was subtracted, the KVM counter
    /// that confirmed each sample took the intended path).
    public var method: String
    /// Where the host ran at two speeds during the calibration (kvm_pvm's host is a VM whose
    /// exits and emulated CPL0 were ~1.4x slower in some rounds, its native loop not): the
    /// parameter in the slow rounds (`medianNanos` is at the host's base speed), and the
    /// fraction of rounds that were slow. nil where the rounds showed one speed.
    public var slowStateNanos: Double? = nil
    public var slowRoundFraction: Double? = nil

    /// The expected cost over the calibration's mix of host speeds: what a long run on this
    /// host pays per event on average (the base-speed median where the host showed one speed).
    public var expectedNanos: Double {
        guard let s = slowStateNanos, let f = slowRoundFraction else { return medianNanos }
        return medianNanos * (1 - f) + s * f
    }

    public init(parameter: String, medianNanos: Double, p10Nanos: Double, p90Nanos: Double, samples: Int, method: String) {
        self.parameter = parameter
        self.medianNanos = medianNanos
        self.p10Nanos = p10Nanos
        self.p90Nanos = p90Nanos
        self.samples = samples
        self.method = method
    }

    /// Median, p10 and p90 of `nanos` (nearest-rank); `nil` for no samples.
    public static func summarize(parameter: String, nanos: [Double], method: String) -> CalibratedCost? {
        guard !nanos.isEmpty else { return nil }
        let s = nanos.sorted()
        func rank(_ q: Double) -> Double { s[min(s.count - 1, max(0, Int((q * Double(s.count)).rounded(.up)) - 1))] }
        return CalibratedCost(parameter: parameter, medianNanos: rank(0.5), p10Nanos: rank(0.1), p90Nanos: rank(0.9), samples: s.count, method: method)
    }
}

/// A parameter a calibration could only bound: derived as a difference of measurements, its
/// point estimate is below their resolution (twice the standard error of the difference).
public struct CalibratedBound: Sendable, Hashable {
    public var parameter: String
    /// The point estimate, clamped at 0: what the profile charges.
    public var estimateNanos: Double
    /// estimate + resolution: the largest value the measurements allow.
    public var upperNanos: Double
    public var resolutionNanos: Double
    public var samples: Int
    public var method: String
    public init(parameter: String, estimateNanos: Double, upperNanos: Double, resolutionNanos: Double, samples: Int, method: String) {
        self.parameter = parameter
        self.estimateNanos = estimateNanos
        self.upperNanos = upperNanos
        self.resolutionNanos = resolutionNanos
        self.samples = samples
        self.method = method
    }
}
