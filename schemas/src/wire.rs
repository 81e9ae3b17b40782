//! The wire format's version: every message carries it, and decoders
//! refuse another. Its own module so every layer can use it without
//! reaching up to the crate root.

/// Version of the wire format this crate speaks; decoders refuse others.
pub const WIRE_VERSION: u32 = 1;
