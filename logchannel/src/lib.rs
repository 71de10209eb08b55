//! The record/replay log of twinvm: entries, framing, transport (filled in by the record/replay issue).
