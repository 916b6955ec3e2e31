import Foundation
import Synchronization

/// Time in nanoseconds, injectable so token buckets and queues test deterministically.
public protocol NanoClock: Sendable {
    func nowNs() -> UInt64
}

/// CLOCK_MONOTONIC.
public struct MonotonicClock: NanoClock {
    public init() {}
    public func nowNs() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
    }
}

/// A clock that moves only when told (tests).
public final class ManualClock: NanoClock {
    private let now: Atomic<UInt64>
    public init(startNs: UInt64 = 1_000_000_000) { now = Atomic(startNs) }
    public func nowNs() -> UInt64 { now.load(ordering: .acquiring) }
    public func advance(byNs delta: UInt64) { now.add(delta, ordering: .releasing) }
}
