//! The twinvm VMM.
