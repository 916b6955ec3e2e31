import Glibc
import Synchronization

#if SANITIZE_THREAD
/// The lock of the data path as ThreadSanitizer builds see it (`scripts/sanitize thread`
/// compiles with -DSANITIZE_THREAD): a pthread mutex, which TSan tracks, in place of
/// `Synchronization.Mutex`, whose futex-based lock it cannot see (every access under
/// it would be reported as a race). Same `withLock` as Mutex's, for the call sites.
final class DataPathMutex<Value>: @unchecked Sendable {
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    // The value lives in its own allocation, reached through a pointer: TSan checks those
    // accesses against the pthread mutex, while an empty `Value` (the scheduler's `()`)
    // stored inline would share an address with the next field and look like a race.
    private let value = UnsafeMutablePointer<Value>.allocate(capacity: 1)

    init(_ initial: Value) {
        value.initialize(to: initial)
        pthread_mutex_init(mutex, nil)
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
        value.deinitialize(count: 1)
        value.deallocate()
    }

    func withLock<Result>(_ body: (inout Value) throws -> Result) rethrows -> Result {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body(&value.pointee)
    }
}
#else
/// The lock of the data path: `Synchronization.Mutex` (see the SANITIZE_THREAD variant).
typealias DataPathMutex<Value> = Mutex<Value>
#endif
