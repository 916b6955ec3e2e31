/// A host connection's claim on the PiT it reads (an async destination's export): while
/// it lives the PiT is not retired, so the image the host started reading stays whole.
/// Released when the connection's port goes.
public final class PiTReaderPin: Sendable {
    let pit: String
    private let domain: Domain

    init(domain: Domain, pit: String) {
        self.domain = domain
        self.pit = pit
        domain.pinForReaders(pit)
    }

    deinit { domain.unpinForReaders(pit) }
}
