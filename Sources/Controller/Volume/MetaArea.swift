import Foundation
import IOEngine

/// The byte range of one LUN that holds a pool's metadata pages, read and written with
/// O_DIRECT through the engine. Counts what it writes, so tests can assert what a commit
/// costs in bytes instead of in time.
public final class MetaArea: @unchecked Sendable {
    public let lun: LUNHandle
    let engine: EngineHandle
    /// Byte offset of page 0 on the LUN.
    public let startBytes: UInt64
    public let pageCount: UInt32
    private let lock = NSLock()
    private var written: UInt64 = 0
    private var writeFault: (@Sendable (_ page: UInt32, _ count: Int) -> Bool)?

    public init(lun: LUNHandle, engine: EngineHandle, startBytes: UInt64, pageCount: UInt32) {
        self.lun = lun
        self.engine = engine
        self.startBytes = startBytes
        self.pageCount = pageCount
    }

    /// Bytes written to the area since it was opened.
    public var bytesWritten: UInt64 { lock.withLock { written } }

    /// A simulated fault for tests: asked before each write (first page, page count);
    /// true fails that write with EIO and writes nothing. Nil (the default) for none.
    public func failWrites(when fault: (@Sendable (_ page: UInt32, _ count: Int) -> Bool)?) { lock.withLock { writeFault = fault } }

    /// Reads `count` pages from `page` into `buffer`.
    func read(page: UInt32, count: Int, into buffer: UnsafeMutableRawPointer) async throws(IOError) {
        precondition(UInt64(page) + UInt64(count) <= UInt64(pageCount), "metadata read past the area")
        let length = count * MetaPage.bytes
        let n = try await engine.read(lun: lun, into: buffer, length: length, offset: offset(page))
        if n != length { throw IOError(code: EIO, operation: .read, lun: lun.path, offset: offset(page)) }
    }

    /// Writes `count` pages at `page` from `buffer`; with `fua`, durable when it returns.
    func write(page: UInt32, count: Int, from buffer: UnsafeRawPointer, fua: Bool) async throws(IOError) {
        precondition(UInt64(page) + UInt64(count) <= UInt64(pageCount), "metadata write past the area")
        let length = count * MetaPage.bytes
        if let fault = lock.withLock({ writeFault }), fault(page, count) {
            throw IOError(code: EIO, operation: .write, lun: lun.path, offset: offset(page))
        }
        let n = try await engine.write(lun: lun, from: buffer, length: length, offset: offset(page), fua: fua)
        if n != length { throw IOError(code: EIO, operation: .write, lun: lun.path, offset: offset(page)) }
        lock.withLock { written += UInt64(length) }
    }

    func flush() async throws(IOError) { try await engine.flush(lun: lun) }

    private func offset(_ page: UInt32) -> UInt64 { startBytes + UInt64(page) * UInt64(MetaPage.bytes) }
}
