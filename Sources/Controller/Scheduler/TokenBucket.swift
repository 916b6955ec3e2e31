/// A token bucket: `ratePerSecond` tokens accrue up to `burst`. A take succeeds while
/// the balance is positive and may leave it negative (a debt), so requests larger
/// than the burst still pass and the long-run rate is exactly the configured one.
public struct TokenBucket: Sendable, Equatable {
    public private(set) var ratePerSecond: Double
    public private(set) var burst: Double
    public private(set) var tokens: Double
    private var lastNs: UInt64

    public init(ratePerSecond: Double, burst: Double, nowNs: UInt64) {
        precondition(ratePerSecond > 0 && burst > 0, "token bucket needs a positive rate and burst")
        self.ratePerSecond = ratePerSecond
        self.burst = burst
        tokens = burst
        lastNs = nowNs
    }

    /// A bucket holding `burstSeconds` worth of tokens, at least `minimumBurst`.
    public init(ratePerSecond: Double, burstSeconds: Double, minimumBurst: Double, nowNs: UInt64) {
        self.init(ratePerSecond: ratePerSecond, burst: max(ratePerSecond * burstSeconds, minimumBurst), nowNs: nowNs)
    }

    public mutating func refill(nowNs: UInt64) {
        guard nowNs > lastNs else { return }
        tokens = min(burst, tokens + Double(nowNs - lastNs) * ratePerSecond / 1e9)
        lastNs = nowNs
    }

    /// Takes `amount` if the balance is positive; false (nothing taken) otherwise.
    public mutating func take(_ amount: Double, nowNs: UInt64) -> Bool {
        refill(nowNs: nowNs)
        guard tokens > 0 else { return false }
        tokens -= amount
        return true
    }

    /// Nanoseconds until a take can succeed (0 when it can now).
    public func nanosUntilAvailable(nowNs: UInt64) -> UInt64 {
        let elapsed = nowNs > lastNs ? Double(nowNs - lastNs) : 0
        let balance = min(burst, tokens + elapsed * ratePerSecond / 1e9)
        if balance > 0 { return 0 }
        return UInt64(((-balance) / ratePerSecond * 1e9).rounded(.up)) + 1
    }

    /// Changes the rate without losing the balance (e.g. `mirror set-rate` while a copy runs).
    public mutating func setRate(_ ratePerSecond: Double, burst: Double, nowNs: UInt64) {
        precondition(ratePerSecond > 0 && burst > 0)
        refill(nowNs: nowNs)
        self.ratePerSecond = ratePerSecond
        self.burst = burst
        tokens = min(tokens, burst)
    }
}

/// Paces bytes onto an inter-domain link at the link profile's bandwidth.
public struct LinkPacer: Sendable {
    private var bucket: TokenBucket

    public init(profile: LinkProfile, nowNs: UInt64) {
        // 20 ms of bandwidth as burst, at least 64 KiB, so pacing is smooth but not chatty.
        bucket = TokenBucket(ratePerSecond: profile.bandwidthBytesPerSecond, burstSeconds: 0.02,
                             minimumBurst: 65536, nowNs: nowNs)
    }

    /// Returns 0 when `bytes` may go now (and accounts them), else nanoseconds to wait before asking again.
    public mutating func reserve(bytes: Int, nowNs: UInt64) -> UInt64 {
        if bucket.take(Double(bytes), nowNs: nowNs) { return 0 }
        return bucket.nanosUntilAvailable(nowNs: nowNs)
    }

    public var bytesPerSecond: Double { bucket.ratePerSecond }
}
