import Foundation
import XCTest

/// The appliance install: scripts/build-release makes the .deb (release build, static Swift
/// runtime), scripts/test-install installs it with apt into a minimal Debian root made by
/// debootstrap (cached) and runs the daemon there, with no Swift toolchain in the root.
final class InstallTests: XCTestCase {
    static let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().path

    func testTheDebInstallsIntoAMinimalDebianRootAndServesThere() throws {
        guard getuid() == 0 else { throw XCTSkip("needs root: debootstrap, chroot and bind mounts") }
        for tool in ["/usr/sbin/debootstrap", "/usr/bin/systemd-analyze", "/usr/bin/dpkg-shlibdeps"] {
            guard FileManager.default.isExecutableFile(atPath: tool) else {
                throw XCTSkip("\(tool) is missing: scripts/install-deps.sh installs it")
            }
        }
        let (status, text) = try runCapturing(Self.repository + "/scripts/test-install", [])
        XCTAssertEqual(status, 0, "scripts/test-install failed:\n\(text.suffix(4000))")
        // What the root ran: the release binary names its commit; the daemon served NBD there.
        XCTAssertTrue(text.range(of: #"svsp-ctl \d+\.\d+\.\d+ \(commit [0-9a-f]{12}"#, options: .regularExpression) != nil,
                      "no release version line:\n\(text.suffix(4000))")
        XCTAssertTrue(text.contains("Depends: libaio1"), text)
        XCTAssertTrue(text.contains("export=\"vd-0\""), text)
        XCTAssertTrue(text.contains("4 MiB written with nbdcopy and read back equal"), text)
        XCTAssertTrue(text.contains("serve stopped cleanly"), text)
        XCTAssertTrue(text.hasSuffix("test-install: passed\n"), String(text.suffix(2000)))
    }
}
