import Controller
import IOEngine

/// Where a benchmark's requests go: straight to the engine, or through the scheduler.
protocol BenchTarget {
    func prepRead(buffer: UnsafeMutableRawPointer, length: Int, offset: UInt64, sink: CompletionSink, cookie: UInt64) throws(IOError)
    func prepWrite(buffer: UnsafeMutableRawPointer, length: Int, offset: UInt64, sink: CompletionSink, cookie: UInt64) throws(IOError)
    func submit()
}

struct EngineTarget: BenchTarget {
    let engine: EngineHandle
    let lun: LUNHandle

    @inline(__always)
    func prepRead(buffer: UnsafeMutableRawPointer, length: Int, offset: UInt64, sink: CompletionSink, cookie: UInt64) throws(IOError) {
        try engine.prepRead(lun: lun, buffer: buffer, length: length, offset: offset, sink: sink, cookie: cookie)
    }

    @inline(__always)
    func prepWrite(buffer: UnsafeMutableRawPointer, length: Int, offset: UInt64, sink: CompletionSink, cookie: UInt64) throws(IOError) {
        try engine.prepWrite(lun: lun, buffer: buffer, length: length, offset: offset, sink: sink, cookie: cookie)
    }

    func submit() { engine.submit() }
}

struct SchedulerTarget: BenchTarget {
    let scheduler: IOScheduler
    let lun: Int

    @inline(__always)
    func prepRead(buffer: UnsafeMutableRawPointer, length: Int, offset: UInt64, sink: CompletionSink, cookie: UInt64) throws(IOError) {
        try scheduler.submit(.read, lun: lun, buffer: buffer, length: length, offset: offset, sink: sink, cookie: cookie)
    }

    @inline(__always)
    func prepWrite(buffer: UnsafeMutableRawPointer, length: Int, offset: UInt64, sink: CompletionSink, cookie: UInt64) throws(IOError) {
        try scheduler.submit(.write, lun: lun, buffer: buffer, length: length, offset: offset, sink: sink, cookie: cookie)
    }

    func submit() { scheduler.kick() }
}

/// A vdisk through its data port (the Controller data API, no front end).
struct VDiskTarget: BenchTarget {
    let port: VDiskPort

    @inline(__always)
    func prepRead(buffer: UnsafeMutableRawPointer, length: Int, offset: UInt64, sink: CompletionSink, cookie: UInt64) throws(IOError) {
        try port.submit(.read, offset: offset, length: length, buffer: buffer, sink: sink, cookie: cookie)
    }

    @inline(__always)
    func prepWrite(buffer: UnsafeMutableRawPointer, length: Int, offset: UInt64, sink: CompletionSink, cookie: UInt64) throws(IOError) {
        try port.submit(.write, offset: offset, length: length, buffer: buffer, sink: sink, cookie: cookie)
    }

    func submit() {} // the port hands each request to its schedulers, which submit at once
}
