import CIOCore
import Glibc

/// One-shot sink that resumes a continuation: the control plane's convenience
/// path (it allocates per call; the hot path uses `CompletionSink` subclasses).
public final class ContinuationSink: CompletionSink, @unchecked Sendable {
    let continuation: CheckedContinuation<Int64, Never>
    public init(_ continuation: CheckedContinuation<Int64, Never>) { self.continuation = continuation }
    override public func ioCompleted(cookie: UInt64, result: Int64) { continuation.resume(returning: result) }
}

extension EngineHandle {
    /// Reads `length` bytes at `offset` into `buffer`; returns the bytes read.
    public func read(lun: LUNHandle, into buffer: UnsafeMutableRawPointer, length: Int, offset: UInt64)
        async throws(IOError) -> Int
    {
        let result = await run(.read, lun: lun, offset: offset) { sink throws(IOError) in
            try prepRead(lun: lun, buffer: buffer, length: length, offset: offset, sink: sink, cookie: 0)
        }
        if result < 0 { throw IOError(result: result, operation: .read, lun: lun.path, offset: offset) }
        return Int(result)
    }

    /// Writes `length` bytes at `offset` from `buffer`; returns the bytes written.
    public func write(lun: LUNHandle, from buffer: UnsafeRawPointer, length: Int, offset: UInt64, fua: Bool = false)
        async throws(IOError) -> Int
    {
        let result = await run(.write, lun: lun, offset: offset) { sink throws(IOError) in
            try prepWrite(lun: lun, buffer: buffer, length: length, offset: offset, fua: fua, sink: sink, cookie: 0)
        }
        if result < 0 { throw IOError(result: result, operation: .write, lun: lun.path, offset: offset) }
        return Int(result)
    }

    public func flush(lun: LUNHandle) async throws(IOError) {
        let result = await run(.flush, lun: lun, offset: nil) { sink throws(IOError) in
            try prepFlush(lun: lun, sink: sink, cookie: 0)
        }
        if result < 0 { throw IOError(result: result, operation: .flush, lun: lun.path) }
    }

    /// Preps with a fresh sink, submits, and awaits the result (a prep error becomes -errno).
    /// A full queue (EBUSY) is waited out; every other prep error is returned at once.
    private func run(_ op: IOOperation, lun: LUNHandle, offset: UInt64?,
                     prep: (CompletionSink) throws(IOError) -> Void) async -> Int64
    {
        while true {
            var prepError: IOError?
            let result = await withCheckedContinuation { (continuation: CheckedContinuation<Int64, Never>) in
                let sink = ContinuationSink(continuation)
                do throws(IOError) {
                    try prep(sink)
                    submit()
                } catch {
                    prepError = error
                    continuation.resume(returning: -Int64(error.code))
                }
            }
            if let prepError, prepError.code == EBUSY {
                try? await Task.sleep(nanoseconds: 50_000)
                continue
            }
            return result
        }
    }
}
