import IOEngine

/// What an open pool has at run time: its LUNs (nil = missing or foreign) and, when its
/// array profile is known, the pool's scheduler and each LUN's slot in it.
struct PoolRuntime: Sendable {
    let luns: [LUNBox?]
    let scheduler: IOScheduler?
    /// The scheduler's index of each LUN, nil for a missing one (empty without a scheduler).
    let slots: [Int?]

    init(luns: [LUNBox?], engine: EngineHandle, array: ArrayProfile?, backgroundSharePercent: Int, faults: SchedulerFaults? = nil,
         onLUNEvent: (@Sendable (String) -> Void)? = nil)
    {
        self.luns = luns
        guard let array else {
            scheduler = nil
            slots = []
            return
        }
        let scheduler = IOScheduler(engine: engine, profile: array, backgroundSharePercent: backgroundSharePercent,
                                    capacity: TestKnobs.schedulerCapacity ?? 1024)
        scheduler.faults = faults
        scheduler.onLUNEvent = onLUNEvent
        slots = luns.map { box in box.map { scheduler.addLUN($0.handle) } }
        faults?.lunIndexOfSlot = slots.enumerated().compactMap { $0.element == nil ? nil : $0.offset }
        self.scheduler = scheduler
    }

    var isHealthy: Bool { luns.allSatisfy { $0 != nil } }
    var firstLUN: LUNHandle? { luns.first??.handle }
}
