import Controller
import XCTest

/// The range lock's rule and its order, against the table in `RangeLock` and a brute-force model.
final class RangeLockTests: XCTestCase {
    private func release(_ lock: inout RangeLock, _ h: RangeLock.Holder) -> [RangeLock.Holder] {
        var granted: [RangeLock.Holder] = []
        lock.release(h, into: &granted)
        return granted
    }

    func testHostReadsAndWritesNeverWaitForEachOther() {
        var lock = RangeLock(slots: 8)
        XCTAssertTrue(lock.acquire(slot: 0, .write, 0..<4096))
        XCTAssertTrue(lock.acquire(slot: 1, .write, 0..<4096))
        XCTAssertTrue(lock.acquire(slot: 2, .read, 0..<8192))
        XCTAssertEqual(release(&lock, .slot(0)), [])
    }

    func testACopierWaitsForWritesNotReadsAndLaterWritesQueueBehindIt() {
        var lock = RangeLock(slots: 8)
        XCTAssertTrue(lock.acquire(slot: 0, .write, 0..<4096))
        XCTAssertTrue(lock.acquire(slot: 1, .read, 0..<4096))
        let copier = lock.acquireCopier(0..<(1 << 20))
        XCTAssertFalse(copier.granted, "a host write is in flight in its range")
        XCTAssertFalse(lock.acquire(slot: 2, .write, 8192..<12288), "a later write waits behind the copier")
        XCTAssertTrue(lock.acquire(slot: 3, .write, 2 << 20..<(2 << 20) + 4096), "outside its range: goes")
        XCTAssertTrue(lock.acquire(slot: 4, .read, 8192..<12288), "reads never wait for a copier")
        XCTAssertEqual(release(&lock, .slot(1)), [], "a read was never in its way")
        XCTAssertEqual(release(&lock, .slot(0)), [.copier(copier.token)])
        XCTAssertEqual(release(&lock, .copier(copier.token)), [.slot(2)])
    }

    func testATrimWaitsForReadsAndWritesAndHoldsBoth() {
        var lock = RangeLock(slots: 8)
        XCTAssertTrue(lock.acquire(slot: 0, .read, 0..<4096))
        XCTAssertFalse(lock.acquire(slot: 1, .trim, 0..<(1 << 20)))
        XCTAssertFalse(lock.acquire(slot: 2, .read, 4096..<8192))
        XCTAssertEqual(release(&lock, .slot(0)), [.slot(1)])
        XCTAssertEqual(release(&lock, .slot(1)), [.slot(2)])
        XCTAssertEqual(lock.count, 1)
    }

    func testOverlappingCopiersTakeTurns() {
        var lock = RangeLock(slots: 2)
        let a = lock.acquireCopier(0..<100), b = lock.acquireCopier(50..<150), c = lock.acquireCopier(200..<300)
        XCTAssertTrue(a.granted)
        XCTAssertFalse(b.granted)
        XCTAssertTrue(c.granted)
        XCTAssertEqual(release(&lock, .copier(a.token)), [.copier(b.token)])
    }

    /// Random arrivals and releases: no two granted entries ever conflict, and every entry
    /// is granted exactly when nothing conflicting that came before it is left.
    func testRandomTrafficKeepsTheRuleAndTheOrder() {
        var rng = SystemRandomNumberGenerator()
        let kinds: [RangeLock.Kind] = [.read, .write, .write, .read, .copier, .trim]
        for _ in 0..<50 {
            var lock = RangeLock(slots: 32)
            // Model: entries in arrival order; granted iff no earlier present entry conflicts.
            var model: [(holder: RangeLock.Holder, kind: RangeLock.Kind, range: Range<UInt64>, granted: Bool)] = []
            var freeSlots = Array(0..<32)
            for _ in 0..<400 {
                if !model.isEmpty, Bool.random(using: &rng) {
                    let grantedOnes = model.indices.filter { model[$0].granted }
                    guard let i = grantedOnes.randomElement(using: &rng) else { continue }
                    let gone = model.remove(at: i)
                    if case .slot(let s) = gone.holder { freeSlots.append(s) }
                    let woke = release(&lock, gone.holder)
                    var expected: [RangeLock.Holder] = []
                    for j in model.indices where !model[j].granted {
                        let blocked = model[..<j].contains { RangeLock.conflicts($0.kind, model[j].kind) && $0.range.overlaps(model[j].range) }
                        if !blocked { model[j].granted = true; expected.append(model[j].holder) }
                    }
                    XCTAssertEqual(Set(woke.map { "\($0)" }), Set(expected.map { "\($0)" }))
                } else {
                    let kind = kinds.randomElement(using: &rng)!
                    let start = UInt64.random(in: 0..<64, using: &rng), len = UInt64.random(in: 1...16, using: &rng)
                    let range = start..<(start + len)
                    let granted: Bool, holder: RangeLock.Holder
                    if kind == .copier {
                        let c = lock.acquireCopier(range)
                        (granted, holder) = (c.granted, .copier(c.token))
                    } else {
                        guard let s = freeSlots.popLast() else { continue }
                        (granted, holder) = (lock.acquire(slot: s, kind, range), .slot(s))
                    }
                    let blocked = model.contains { RangeLock.conflicts($0.kind, kind) && $0.range.overlaps(range) }
                    XCTAssertEqual(granted, !blocked, "\(kind) \(range)")
                    model.append((holder, kind, range, granted))
                }
                let held = model.filter(\.granted)
                for (i, a) in held.enumerated() {
                    for b in held[(i + 1)...] {
                        XCTAssertFalse(RangeLock.conflicts(a.kind, b.kind) && a.range.overlaps(b.range), "\(a) and \(b) both granted")
                    }
                }
            }
        }
    }
}
