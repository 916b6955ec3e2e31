import Foundation

/// A FIFO semaphore for tasks: `acquire` waits (without blocking a thread) while all
/// `permits` are taken. With one permit it serializes metadata mutations (read,
/// change, commit: management commands, thin allocations, leg failures, resync);
/// with more it bounds concurrent mirror copies.
final class AsyncSemaphore: @unchecked Sendable {
    private let lock = NSLock()
    private var free: Int
    private var waiters: [CheckedContinuation<Void, Never>] = []

    init(permits: Int) { free = permits }

    func acquire() async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            lock.lock()
            if free > 0 {
                free -= 1
                lock.unlock()
                c.resume()
            } else {
                waiters.append(c)
                lock.unlock()
            }
        }
    }

    func release() {
        lock.lock()
        if waiters.isEmpty {
            free += 1
            lock.unlock()
        } else {
            let next = waiters.removeFirst()
            lock.unlock()
            next.resume()
        }
    }
}
