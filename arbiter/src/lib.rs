//! The test-and-set arbiter that prevents split brain.
