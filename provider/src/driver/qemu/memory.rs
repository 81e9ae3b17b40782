//! The guest's RAM as a file of its own ([`BootFiles::memory`]): readied
//! before QEMU starts (the file a state was saved beside, checked; or a
//! new empty one), and which way a state was saved, read from its head.
//! The QMP side (`x-ignore-shared`) is in [`super::vm`].
//!
//! [`BootFiles::memory`]: crate::driver::api::BootFiles::memory

use std::io::Read;
use std::path::Path;

use vmlot_cas::qemusave::{HEADER_PREFIX, parse_header};

use crate::driver::api::DriverError;
use crate::driver::host::{io_err, remove_if_exists};

/// Whether `machine_state` was saved with the guest's RAM left out (in a
/// file of its own), from its head.
pub(crate) fn saved_without_ram(machine_state: &Path) -> Result<bool, DriverError> {
    let bad = |why: String| DriverError::Restore(format!("{}: {why}", machine_state.display()));
    let mut head = Vec::with_capacity(HEADER_PREFIX);
    std::fs::File::open(machine_state)
        .and_then(|f| f.take(HEADER_PREFIX as u64).read_to_end(&mut head))
        .map_err(|e| bad(e.to_string()))?;
    let header = parse_header(&head).map_err(|e| bad(format!("not a QEMU save: {e}")))?;
    Ok(header.ignore_shared)
}

/// Readies the guest's RAM file: the one the state was saved beside, of
/// the machine's size (`saved_beside`), or else a new empty one (a boot,
/// or a state that brings its RAM along).
pub(crate) fn prepare_memory(memory: &Path, memory_mib: u32, saved_beside: bool) -> Result<(), DriverError> {
    let size = u64::from(memory_mib) << 20;
    if saved_beside {
        return match std::fs::metadata(memory) {
            Ok(m) if m.is_file() && m.len() == size => Ok(()),
            Ok(m) => Err(DriverError::Restore(format!(
                "memory file {} holds {} bytes, the machine {size}",
                memory.display(),
                m.len()
            ))),
            Err(e) => Err(DriverError::Restore(format!(
                "memory file {}: {e}",
                memory.display()
            ))),
        };
    }
    remove_if_exists(memory)?;
    std::fs::File::create(memory)
        .and_then(|f| f.set_len(size))
        .map_err(|e| io_err("create", memory, e))
}
