import Controller
import XCTest

/// Token buckets and the link pacer against an injected clock.
final class TokenBucketTests: XCTestCase {
    func testRateAndBurstWithInjectedClock() {
        let clock = ManualClock()
        var bucket = TokenBucket(ratePerSecond: 1000, burst: 10, nowNs: clock.nowNs())
        var taken = 0
        while bucket.take(1, nowNs: clock.nowNs()) { taken += 1 }
        XCTAssertEqual(taken, 10, "a full bucket gives its burst, then stops")
        XCTAssertEqual(bucket.nanosUntilAvailable(nowNs: clock.nowNs()), 1, "balance is exactly 0: one tick away")
        clock.advance(byNs: 5_000_000) // 5 ms at 1000/s = 5 tokens
        taken = 0
        while bucket.take(1, nowNs: clock.nowNs()) { taken += 1 }
        XCTAssertEqual(taken, 5)
        clock.advance(byNs: 1_000_000_000) // a long pause refills only to the burst
        taken = 0
        while bucket.take(1, nowNs: clock.nowNs()) { taken += 1 }
        XCTAssertEqual(taken, 10)
    }

    func testLargeTakesGoIntoDebtSoTheLongRunRateHolds() {
        let clock = ManualClock()
        var bucket = TokenBucket(ratePerSecond: 1_000_000, burst: 65536, nowNs: clock.nowNs()) // 1 MB/s
        var sent = 0.0
        // One second of 256 KiB requests, each larger than the burst.
        let end = clock.nowNs() + 1_000_000_000
        while clock.nowNs() < end {
            if bucket.take(262_144, nowNs: clock.nowNs()) { sent += 262_144 } else {
                clock.advance(byNs: bucket.nanosUntilAvailable(nowNs: clock.nowNs()))
            }
        }
        XCTAssertEqual(sent, 1_000_000 + 65536, accuracy: 262_144, "one second at 1 MB/s plus the initial burst")
    }

    func testSetRateKeepsTheBalance() {
        let clock = ManualClock()
        var bucket = TokenBucket(ratePerSecond: 100, burst: 100, nowNs: clock.nowNs())
        XCTAssertTrue(bucket.take(150, nowNs: clock.nowNs()), "a positive balance lets a larger take through")
        XCTAssertEqual(bucket.tokens, -50)
        bucket.setRate(1000, burst: 50, nowNs: clock.nowNs())
        XCTAssertFalse(bucket.take(1, nowNs: clock.nowNs()), "the debt survives the rate change")
        clock.advance(byNs: 50_000_000) // 50 ms at the new 1000/s repays it exactly
        XCTAssertFalse(bucket.take(1, nowNs: clock.nowNs()))
        XCTAssertEqual(bucket.nanosUntilAvailable(nowNs: clock.nowNs()), 1)
        clock.advance(byNs: 1_000_000)
        XCTAssertTrue(bucket.take(1, nowNs: clock.nowNs()))
    }

    func testLinkPacerHoldsTheLinkRate() {
        let clock = ManualClock()
        var link = LinkProfile(name: "t3")
        link.bandwidthBytesPerSecond = 45e6 / 8
        var pacer = LinkPacer(profile: link, nowNs: clock.nowNs())
        var sent = 0
        let start = clock.nowNs()
        while clock.nowNs() - start < 2_000_000_000 {
            let wait = pacer.reserve(bytes: 65536, nowNs: clock.nowNs())
            if wait == 0 { sent += 65536 } else { clock.advance(byNs: wait) }
        }
        let rate = Double(sent) / 2
        XCTAssertEqual(rate, 45e6 / 8, accuracy: 45e6 / 8 * 0.05, "paced within 5% of 45 Mbit/s")
    }
}
