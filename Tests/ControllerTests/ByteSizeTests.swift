import Controller
import XCTest

final class ByteSizeTests: XCTestCase {
    func testParsesUnits() throws {
        XCTAssertEqual(try ByteSize.parse("4096"), 4096)
        XCTAssertEqual(try ByteSize.parse("4k"), 4096)
        XCTAssertEqual(try ByteSize.parse("4K"), 4096)
        XCTAssertEqual(try ByteSize.parse("1M"), 1 << 20)
        XCTAssertEqual(try ByteSize.parse("10G"), 10 << 30)
        XCTAssertEqual(try ByteSize.parse("512KiB"), 512 << 10)
        XCTAssertEqual(try ByteSize.parse("2T"), 2 << 40)
    }

    func testRejectsGarbageWithAReason() {
        for bad in ["", "k", "4x", "-4k", "1.5M", "99999999999999999999", "16777216T"] {
            XCTAssertThrowsError(try ByteSize.parse(bad), "'\(bad)' must not parse") { error in
                XCTAssertTrue("\(error)".contains("'\(bad)'"), "\(error)")
            }
        }
    }

    func testFormatsExactly() {
        XCTAssertEqual(ByteSize.format(4096), "4k")
        XCTAssertEqual(ByteSize.format(1 << 20), "1M")
        XCTAssertEqual(ByteSize.format(3 << 30), "3G")
        XCTAssertEqual(ByteSize.format(1000), "1000")
    }
}
