// swift-tools-version: 6.0
import PackageDescription

let package = Package(
    name: "svsp",
    platforms: [.macOS(.v14)],
    products: [
        .executable(name: "svsp-ctl", targets: ["svsp-ctl"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift", from: "0.1.0"),
        .package(url: "https://github.com/jpsim/Yams", from: "5.0.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.5.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.0.0"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.60.0"),
        .package(url: "https://github.com/apple/swift-nio-ssl", from: "2.37.0"),
    ],
    targets: [
        // C core: libaio (no .pc file in Debian, linked by name) and ISA-L.
        .target(
            name: "CIOCore",
            cSettings: [
                .define("_GNU_SOURCE"),
                .unsafeFlags(["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"]),
            ],
            linkerSettings: [.linkedLibrary("aio"), .linkedLibrary("isal"), .linkedLibrary("pthread")]
        ),
        .target(name: "IOEngine", dependencies: ["CIOCore"]),
        .target(
            name: "Controller",
            dependencies: [
                "IOEngine",
                .product(name: "Yams", package: "Yams"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"), // the replication link: TLS with a pre-shared key
            ]
        ),
        .executableTarget(
            name: "svsp-ctl",
            dependencies: [
                "Controller",
                "IOEngine",
                "CIOCore", // only for `bench crc`, which compares against ISA-L called from C
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Histogram", package: "hdrhistogram-swift"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // Fuzz targets (scripts/fuzz builds them with libFuzzer; the normal build replays corpora).
        .executableTarget(name: "svsp-fuzz", dependencies: ["Controller"]),
        .testTarget(name: "CIOCoreTests", dependencies: ["CIOCore"]),
        .testTarget(name: "IOEngineTests", dependencies: ["IOEngine", "CIOCore"]),
        .testTarget(name: "ControllerTests", dependencies: ["Controller", "IOEngine"]),
        .testTarget(name: "EndToEndTests", dependencies: ["svsp-ctl", "svsp-fuzz"]),
    ],
    swiftLanguageModes: [.v6]
)
