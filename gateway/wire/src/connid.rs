//! Connection ids: one 64-bit number that names a client connection across the gateway
//! and its workers.
//!
//! Layout, most significant bits first: core (8 bits) | generation (24 bits) | slot
//! (32 bits). The core bits tell a worker which link reaches the owning core; the
//! generation is bumped each time a slot is reused, so an id kept by a worker after its
//! connection closed fails closed instead of reaching the slot's next client. This module
//! only packs and unpacks bits; it allocates nothing and knows no slab.

use std::fmt;

/// A connection id: core (8 bits, top) | generation (24 bits) | slot (32 bits, low).
#[derive(Copy, Clone, PartialEq, Eq, Hash, Debug, PartialOrd, Ord, Default)]
pub struct ConnId(u64);

const SLOT_BITS: u32 = 32;
const GENERATION_BITS: u32 = 24;
const CORE_SHIFT: u32 = SLOT_BITS + GENERATION_BITS;

impl ConnId {
    /// The largest generation that fits in the id; a slab wraps its generation counter
    /// to 0 after this.
    pub const MAX_GENERATION: u32 = (1 << GENERATION_BITS) - 1;

    /// Packs core, generation and slot. `generation` must be at most
    /// [`ConnId::MAX_GENERATION`]; higher bits are masked off in release builds.
    pub fn new(core: u8, generation: u32, slot: u32) -> ConnId {
        debug_assert!(
            generation <= Self::MAX_GENERATION,
            "generation {generation} does not fit in 24 bits"
        );
        let generation = u64::from(generation & Self::MAX_GENERATION);
        ConnId((u64::from(core) << CORE_SHIFT) | (generation << SLOT_BITS) | u64::from(slot))
    }

    /// The id whose raw 64-bit value is `raw` (as carried in an envelope).
    pub const fn from_raw(raw: u64) -> ConnId {
        ConnId(raw)
    }

    /// The raw 64-bit value.
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// The gateway core that owns the connection.
    pub const fn core(self) -> u8 {
        (self.0 >> CORE_SHIFT) as u8
    }

    /// The generation of the slot when the connection was opened.
    pub const fn generation(self) -> u32 {
        ((self.0 >> SLOT_BITS) as u32) & Self::MAX_GENERATION
    }

    /// The slot in the owning core's connection table.
    pub const fn slot(self) -> u32 {
        self.0 as u32
    }
}

impl fmt::Display for ConnId {
    /// Sixteen hex digits with a `0x` prefix, e.g. `0x0100002a00000007`: core, generation
    /// and slot can be read off the digits (2 | 6 | 8).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#018x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn layout_and_display() {
        let id = ConnId::new(1, 0x2a, 7);
        assert_eq!(id.raw(), 0x0100_002a_0000_0007);
        assert_eq!(id.to_string(), "0x0100002a00000007");
        assert_eq!(ConnId::default().to_string(), "0x0000000000000000");
        let max = ConnId::new(u8::MAX, ConnId::MAX_GENERATION, u32::MAX);
        assert_eq!(max.raw(), u64::MAX);
        assert_eq!(max.core(), 255);
        assert_eq!(max.generation(), ConnId::MAX_GENERATION);
        assert_eq!(max.slot(), u32::MAX);
    }

    #[test]
    #[should_panic(expected = "does not fit")]
    #[cfg(debug_assertions)]
    fn generation_overflow_is_caught() {
        let _ = ConnId::new(0, ConnId::MAX_GENERATION + 1, 0);
    }

    proptest! {
        #[test]
        fn fields_round_trip(core: u8, generation in 0..=ConnId::MAX_GENERATION, slot: u32) {
            let id = ConnId::new(core, generation, slot);
            prop_assert_eq!(id.core(), core);
            prop_assert_eq!(id.generation(), generation);
            prop_assert_eq!(id.slot(), slot);
            prop_assert_eq!(ConnId::from_raw(id.raw()), id);
        }

        #[test]
        fn raw_round_trip(raw: u64) {
            let id = ConnId::from_raw(raw);
            prop_assert_eq!(ConnId::new(id.core(), id.generation(), id.slot()), id);
        }
    }
}
