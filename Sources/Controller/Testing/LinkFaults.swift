import NIOConcurrencyHelpers
import NIOCore

/// Seeded faults on the replication link, from a fault plan's `link_rules` (tests and
/// drills only). They act on the bytes this daemon receives on every replication
/// connection, below TLS, as a bad network would:
/// - `drop`: the connection is closed (a cut link; the sender resumes after reconnecting);
/// - `corrupt`: one seeded bit of the received bytes flips (TLS refuses the record and the
///   connection ends, as it must: nothing corrupted reaches the protocol);
/// - `delay`: this read waits `delay_ms`; reads that arrive meanwhile wait behind it and are
///   released with it (order kept), later ones pass unless a rule fires again;
/// - `reorder` (accepted connections only): the receiving worker's next message waits
///   `delay_ms` before it is applied (as behind a slow disk) and the connection is cut 300 ms
///   later; the peer reconnects and sends again while that apply still waits (a reorder
///   across reconnects: nothing of the new connection may be applied before it ends).
/// A rule arms once a connection has received `after_bytes`; then each read triggers it with
/// `probability`, at most `count` times over the daemon's life. One generator per rule,
/// seeded by the plan's seed.
public final class LinkFaults: Sendable {
    enum Action: Equatable {
        case drop
        case corrupt(bit: Int)
        case delay(ms: Int)
        case reorder(ms: Int)
    }

    private struct Armed {
        let rule: FaultPlan.LinkRule
        var state: UInt64
        var fired = 0
    }

    private let armed: NIOLockedValueBox<[Armed]>
    /// The log line of each fault that fired (the daemon's log; tests read it).
    let report: @Sendable (String) -> Void

    init(rules: [FaultPlan.LinkRule], seed: UInt64, report: @escaping @Sendable (String) -> Void) {
        armed = NIOLockedValueBox(rules.enumerated().map { Armed(rule: $0.element, state: seed &+ UInt64($0.offset + 101) &* 0x9E37_79B9_7F4A_7C15) })
        self.report = report
    }

    /// What to do with a read of `length` bytes on a connection that had received `before`.
    func action(before: Int, length: Int, accepted: Bool) -> Action? {
        armed.withLockedValue { rules in
            for i in rules.indices {
                let r = rules[i].rule
                if r.action == "reorder", !accepted { continue } // only a receiving worker can hold
                guard before + length > r.afterBytes, r.count.map({ rules[i].fired < $0 }) ?? true else { continue }
                guard Double(SplitMix.next(&rules[i].state) >> 11) / Double(1 << 53) < r.probability else { continue }
                rules[i].fired += 1
                switch r.action {
                case "drop": return .drop
                case "delay": return .delay(ms: r.delayMs ?? 0)
                case "reorder": return .reorder(ms: r.delayMs ?? 0)
                default: return .corrupt(bit: Int(SplitMix.next(&rules[i].state) % UInt64(length * 8)))
                }
            }
            return nil
        }
    }
}

/// The first handler of a replication connection's pipeline when a plan has link rules.
final class LinkFaultHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    private let faults: LinkFaults
    /// Whether this daemon accepted the connection (its worker applies what arrives).
    private let accepted: Bool
    private var received = 0
    /// Reads held back by a delay (and every read after them, to keep the order).
    private var held: [ByteBuffer] = []
    private var releasing = false
    /// The pending release of `held`; cancelled when the connection ends first.
    private var release: Scheduled<Void>?

    init(_ faults: LinkFaults, accepted: Bool) {
        self.faults = faults
        self.accepted = accepted
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = unwrapInboundIn(data)
        let length = bytes.readableBytes
        guard length > 0 else { return }
        let action = faults.action(before: received, length: length, accepted: accepted)
        received += length
        let peer = context.remoteAddress.map { "\($0)" } ?? "?"
        switch action {
        case .drop:
            faults.report("fault plan: replication link from \(peer) dropped after \(received) bytes")
            context.close(promise: nil)
            return
        case .corrupt(let bit):
            let at = bytes.readerIndex + bit / 8
            bytes.setInteger(bytes.getInteger(at: at, as: UInt8.self)! ^ (1 << UInt8(bit % 8)), at: at)
            faults.report("fault plan: flipped bit \(bit % 8) of byte \(received - length + bit / 8) received from \(peer)")
        case .delay(let ms):
            faults.report("fault plan: replication link from \(peer) held \(ms) ms")
            held.append(bytes)
            if !releasing {
                releasing = true
                let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
                release = context.eventLoop.scheduleTask(in: .milliseconds(Int64(ms))) { bound.value.0.releaseHeld(bound.value.1) }
            }
            return
        case .reorder(let ms):
            faults.report("fault plan: replication link from \(peer) cut after \(received) bytes, the apply of its next frame held \(ms) ms behind the reconnect")
            context.fireUserInboundEventTriggered(PeerSession.HoldWork(ms: ms))
            let channel = context.channel
            context.eventLoop.scheduleTask(in: .milliseconds(300)) { channel.close(promise: nil) }
        case nil:
            break
        }
        if releasing {
            held.append(bytes)
        } else {
            context.fireChannelRead(wrapInboundOut(bytes))
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        dropHeld() // a cut link delivers nothing more
        context.fireChannelInactive()
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        dropHeld() // the context must not be used after this
    }

    private func dropHeld() {
        release?.cancel()
        release = nil
        releasing = false
        held.removeAll()
    }

    private func releaseHeld(_ context: ChannelHandlerContext) {
        release = nil
        releasing = false
        let now = held
        held.removeAll()
        for bytes in now { context.fireChannelRead(wrapInboundOut(bytes)) }
        context.fireChannelReadComplete()
    }
}

/// splitmix64: the fault plans' seeded generator.
enum SplitMix {
    static func next(_ state: inout UInt64) -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
