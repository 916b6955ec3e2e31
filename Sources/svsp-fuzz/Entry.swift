import Controller
import Foundation

// Built two ways. With `scripts/fuzz` (`swift build --sanitize=fuzzer -Xswiftc -DFUZZING`)
// libFuzzer drives `LLVMFuzzerTestOneInput` and $SVSP_FUZZ_TARGET picks the target.
// In the normal build it replays inputs: `svsp-fuzz TARGET FILE|DIR...` runs each
// through the same target (the tests replay every corpus this way).

#if FUZZING
nonisolated(unsafe) private let fuzzTarget = ProcessInfo.processInfo.environment["SVSP_FUZZ_TARGET"] ?? ""

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ start: UnsafePointer<UInt8>?, _ count: Int) -> CInt {
    FuzzTargets.run(fuzzTarget, UnsafeRawBufferPointer(start: start, count: count))
    return 0
}
#else
@main
struct ReplayCorpus {
    static func main() {
        let args = Array(CommandLine.arguments.dropFirst())
        guard let target = args.first, FuzzTargets.names.contains(target) else {
            FileHandle.standardError.write(Data("usage: svsp-fuzz TARGET FILE|DIR... (targets: \(FuzzTargets.names.joined(separator: ", ")))\n".utf8))
            exit(2)
        }
        var files: [String] = []
        for path in args.dropFirst() {
            var isDir: ObjCBool = false
            guard FileManager.default.fileExists(atPath: path, isDirectory: &isDir) else {
                FileHandle.standardError.write(Data("svsp-fuzz: \(path): no such file or folder\n".utf8))
                exit(2)
            }
            if isDir.boolValue {
                let names = (try? FileManager.default.contentsOfDirectory(atPath: path)) ?? []
                files += names.sorted().map { path + "/" + $0 }
            } else {
                files.append(path)
            }
        }
        for file in files {
            let data = FileManager.default.contents(atPath: file) ?? Data()
            data.withUnsafeBytes { FuzzTargets.run(target, $0) }
        }
        print("svsp-fuzz \(target): \(files.count) input(s) replayed")
    }
}
#endif
