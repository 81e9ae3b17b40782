//! The header of the synthetic driver's machine state (test machinery,
//! compiled only with the `synthetic` feature): the provider's synthetic
//! driver writes it, the broker's result checks read it, so its layout is
//! written once, here, beside the real hypervisors' parsers.
//!
//! Block 0 of the state: magic `VMLOTSYN`, a `u32` version, the state's
//! size in KiB, the boot seed, the segments completed, a SHA-1 chain
//! digest over every change, and the SHA-1 of the rest of the state (what
//! a restore checks, as a hypervisor's load fails on a state it cannot
//! read); little-endian; the rest of the 4 KiB block is zero.

/// The block the header fills.
pub const HEADER_BLOCK: usize = 4096;
pub const MAGIC: &[u8; 8] = b"VMLOTSYN";
pub const VERSION: u32 = 3;
/// Bytes of the header that carry something.
pub const HEADER_LEN: usize = 72;

/// Block 0 of a synthetic machine state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyntheticHeader {
    pub seed: u64,
    /// Segments completed.
    pub counter: u64,
    /// Chained over every change: equal digests, equal states.
    pub digest: [u8; 20],
    pub state_kib: u32,
    /// SHA-1 of every byte after the header block.
    pub data: [u8; 20],
}

impl SyntheticHeader {
    /// The whole header block.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_BLOCK];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.state_kib.to_le_bytes());
        b[16..24].copy_from_slice(&self.seed.to_le_bytes());
        b[24..32].copy_from_slice(&self.counter.to_le_bytes());
        b[32..52].copy_from_slice(&self.digest);
        b[52..72].copy_from_slice(&self.data);
        b
    }

    /// The header at the start of `b`, if it is one.
    pub fn decode(b: &[u8]) -> Option<SyntheticHeader> {
        if b.len() < HEADER_LEN || &b[0..8] != MAGIC || b[8..12] != VERSION.to_le_bytes() {
            return None;
        }
        Some(SyntheticHeader {
            state_kib: u32::from_le_bytes(b[12..16].try_into().ok()?),
            seed: u64::from_le_bytes(b[16..24].try_into().ok()?),
            counter: u64::from_le_bytes(b[24..32].try_into().ok()?),
            digest: b[32..52].try_into().ok()?,
            data: b[52..72].try_into().ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_what_is_not_one() {
        let h = SyntheticHeader {
            seed: 7,
            counter: 3,
            digest: [9; 20],
            state_kib: 64,
            data: [5; 20],
        };
        let b = h.encode();
        assert_eq!(b.len(), HEADER_BLOCK);
        assert_eq!(SyntheticHeader::decode(&b), Some(h));
        assert_eq!(SyntheticHeader::decode(&b[..HEADER_LEN - 1]), None);
        let mut other = b.clone();
        other[8] = 2; // the version before
        assert_eq!(SyntheticHeader::decode(&other), None);
        assert_eq!(SyntheticHeader::decode(b"QEVM\0\0\0\x03 and more"), None);
    }
}
