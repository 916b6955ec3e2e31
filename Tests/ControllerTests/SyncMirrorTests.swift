@testable import Controller
import Foundation
import XCTest

/// The sync mirror's rules alone (the layer above the block maps in `VDiskPort`); the
/// end-to-end mirror tests exercise them through real legs and faults.
final class SyncMirrorTests: XCTestCase {
    private func answers(read: Bool = false, result: Int64 = 0, target: UInt8 = 0, failed: UInt8 = 0, busy: UInt8 = 0,
                         tried: UInt8 = 0) -> SyncMirror.Answers
    {
        SyncMirror.Answers(isRead: read, result: result, targetLegs: target, failedLegs: failed, busyLegs: busy, triedLegs: tried)
    }

    func testWritesGoToEveryLegNotFailedAndReadsToTheLeastBusyInSyncLeg() {
        XCTAssertEqual(SyncMirror.writeLegs([.inSync, .copying, .failed]), 0b011)
        XCTAssertEqual(SyncMirror.inSyncLegs([.inSync, .copying, .inSync]), 0b101)
        XCTAssertEqual(SyncMirror.readLeg(inSync: 0b101, outstanding: [5, 0, 2, 0], excluding: 0), 2, "leg 1 is copying, leg 3 absent")
        XCTAssertEqual(SyncMirror.readLeg(inSync: 0b101, outstanding: [5, 0, 2, 0], excluding: 0b100), 0)
        XCTAssertNil(SyncMirror.readLeg(inSync: 0b101, outstanding: [5, 0, 2, 0], excluding: 0b101))
        XCTAssertEqual(SyncMirror.readLeg(inSync: 0b11, outstanding: [1, 1, 0, 0], excluding: 0), 0, "a tie goes to the first")
    }

    func testAFailedPieceIsTheRequestsErrorUnlessALegOfAMirrorFailedAWrite() {
        XCTAssertEqual(SyncMirror.pieceFailure(isRead: true, legCount: 2, busy: false), .requestError)
        XCTAssertEqual(SyncMirror.pieceFailure(isRead: false, legCount: 1, busy: false), .requestError)
        XCTAssertEqual(SyncMirror.pieceFailure(isRead: false, legCount: 2, busy: true), .requestError, "a full queue is back-pressure")
        XCTAssertEqual(SyncMirror.pieceFailure(isRead: false, legCount: 2, busy: false), .legFailed)
    }

    func testAFailedReadIsRetriedOnAnotherInSyncLegAndTheFailedLegRepaired() {
        let eio = -Int64(EIO)
        XCTAssertEqual(SyncMirror.outcome(answers(read: true, result: eio, tried: 0b01), legCount: 2, inSync: 0b11, dirtyLog: true), .retryRead)
        XCTAssertEqual(SyncMirror.outcome(answers(read: true, result: eio, tried: 0b11), legCount: 2, inSync: 0b11, dirtyLog: true), .answer,
                       "no leg left: the error answers")
        XCTAssertEqual(SyncMirror.outcome(answers(read: true, result: eio, tried: 0b01), legCount: 2, inSync: 0b01, dirtyLog: true), .answer,
                       "a copying leg never serves a read")
        XCTAssertEqual(SyncMirror.repairLegs(tried: 0b011, servedBy: 1), 0b001)
    }

    func testALegThatFailsAWriteFailsOverAndTheModeDecidesTheAnswer() {
        let outcome = SyncMirror.outcome(answers(result: -Int64(EIO), target: 0b11, failed: 0b10), legCount: 2, inSync: 0b11, dirtyLog: true)
        XCTAssertEqual(outcome, .failLegs(legs: 0b10, survivors: 0b01))
        XCTAssertEqual(SyncMirror.answerAfterLegFailure(survivors: 0b01, mode: .automaticFailover, recorded: true, success: 4096, error: -5), 4096)
        XCTAssertEqual(SyncMirror.answerAfterLegFailure(survivors: 0b01, mode: .synchronousAlways, recorded: true, success: 4096, error: -5), -5)
        XCTAssertEqual(SyncMirror.answerAfterLegFailure(survivors: 0, mode: .automaticFailover, recorded: true, success: 4096, error: -5), -5)
        XCTAssertEqual(SyncMirror.answerAfterLegFailure(survivors: 0b01, mode: .automaticFailover, recorded: false, success: 4096, error: -5),
                       -Int64(EIO), "a failure the catalog did not record is never acknowledged")
        XCTAssertEqual(SyncMirror.outcome(answers(result: -Int64(EIO), target: 0b1, failed: 0b1), legCount: 1, inSync: 0b1, dirtyLog: false),
                       .answer, "one leg: the error is the answer")
    }

    func testAWriteAFullQueueRefusedOnSomeLegsPinsItsRegionsOrFailsThoseLegsOver() {
        let busy = answers(result: -Int64(EBUSY), target: 0b11, busy: 0b10)
        XCTAssertEqual(SyncMirror.outcome(busy, legCount: 2, inSync: 0b11, dirtyLog: true), .pinDirty(then: .answer))
        XCTAssertEqual(SyncMirror.outcome(busy, legCount: 2, inSync: 0b11, dirtyLog: false), .failLegs(legs: 0b10, survivors: 0b01))
        // Back-pressure never takes the last in-sync leg away: leg 0 (the only in-sync one) was refused.
        let lastInSync = answers(result: -Int64(EBUSY), target: 0b11, busy: 0b01)
        XCTAssertEqual(SyncMirror.outcome(lastInSync, legCount: 2, inSync: 0b01, dirtyLog: false), .answer)
    }
}
