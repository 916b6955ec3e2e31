/// Constants of the NBD protocol (fixed newstyle negotiation, simple and structured
/// replies, the base:allocation meta context), as the protocol document names them.
enum NBD {
    static let initMagic: UInt64 = 0x4E42_444D_4147_4943 // "NBDMAGIC"
    static let optMagic: UInt64 = 0x4948_4156_454F_5054 // "IHAVEOPT"
    static let optReplyMagic: UInt64 = 0x0003_E889_0455_65A9
    static let requestMagic: UInt32 = 0x2560_9513
    static let simpleReplyMagic: UInt32 = 0x6744_6698
    static let structuredReplyMagic: UInt32 = 0x668E_33EF

    // Handshake flags (server) and client flags.
    static let flagFixedNewstyle: UInt16 = 1 << 0
    static let flagNoZeroes: UInt16 = 1 << 1
    static let clientFlagNoZeroes: UInt32 = 1 << 1

    // Options.
    static let optExportName: UInt32 = 1
    static let optAbort: UInt32 = 2
    static let optList: UInt32 = 3
    static let optInfo: UInt32 = 6
    static let optGo: UInt32 = 7
    static let optStructuredReply: UInt32 = 8
    static let optListMetaContext: UInt32 = 9
    static let optSetMetaContext: UInt32 = 10

    // Option replies.
    static let repAck: UInt32 = 1
    static let repServer: UInt32 = 2
    static let repInfo: UInt32 = 3
    static let repMetaContext: UInt32 = 4
    static let repErrUnsup: UInt32 = 0x8000_0001
    static let repErrInvalid: UInt32 = 0x8000_0003
    static let repErrUnknown: UInt32 = 0x8000_0006

    // Info types.
    static let infoExport: UInt16 = 0
    static let infoBlockSize: UInt16 = 3

    // Transmission flags.
    static let tflagHasFlags: UInt16 = 1 << 0
    static let tflagReadOnly: UInt16 = 1 << 1
    static let tflagSendFlush: UInt16 = 1 << 2
    static let tflagSendFUA: UInt16 = 1 << 3
    static let tflagSendTrim: UInt16 = 1 << 5
    static let tflagSendWriteZeroes: UInt16 = 1 << 6
    static let tflagCanMultiConn: UInt16 = 1 << 8

    // Commands and command flags.
    static let cmdRead: UInt16 = 0
    static let cmdWrite: UInt16 = 1
    static let cmdDisc: UInt16 = 2
    static let cmdFlush: UInt16 = 3
    static let cmdTrim: UInt16 = 4
    static let cmdWriteZeroes: UInt16 = 6
    static let cmdBlockStatus: UInt16 = 7
    static let cmdFlagFUA: UInt16 = 1 << 0
    static let cmdFlagReqOne: UInt16 = 1 << 3

    // Structured reply chunks.
    static let replyFlagDone: UInt16 = 1 << 0
    static let replyTypeNone: UInt16 = 0
    static let replyTypeOffsetData: UInt16 = 1
    static let replyTypeBlockStatus: UInt16 = 5
    static let replyTypeError: UInt16 = (1 << 15) | 1

    // The one meta context we serve, and its status bits.
    static let baseAllocation = "base:allocation"
    static let baseAllocationId: UInt32 = 1
    static let stateHole: UInt32 = 1 << 0
    static let stateZero: UInt32 = 1 << 1

    // Errors on the wire.
    static let ePerm: UInt32 = 1
    static let eIO: UInt32 = 5
    static let eInval: UInt32 = 22
    static let eNoSpc: UInt32 = 28
    static let eOverflow: UInt32 = 75

    /// Largest request we accept (and advertise): a peer never makes us allocate more.
    static let maxPayload = 1 << 20
    /// Largest option we read during negotiation.
    static let maxOptionBytes = 64 << 10
}
