//! The boot kit every image boots with: one kernel (Debian's, unpacked by
//! `make deps`) and one initrd (`scripts/build-farm-boot.sh`: busybox and
//! the virtio and ext4 modules, which mount the image's disk and hand the
//! machine to its `/sbin/vmlot-init`), pushed to the store once when the
//! farm starts. Images of every recipe share them, so they cost nothing
//! after the first; a recipe names what goes on its disk.

use std::path::Path;

use vmlot_cas::BlockStore;
use vmlot_schemas::ObjectKind;
use vmlot_schemas::recipe::StoredObject;

use crate::error::FarmError;
use crate::stored::push_stored;

/// The kernel command line of every image: the console the providers
/// record, the disk the initrd mounts as the root, and a reboot a second
/// after a panic (the machine runs with -no-reboot, so a guest whose init
/// died ends as crashed instead of running silently until its budget).
pub const CMDLINE: &str = "console=ttyS0 quiet panic=1 vmlot.root=/dev/vda";

/// The kernel and initrd in the store, and the command line.
#[derive(Clone, Debug)]
pub struct Kit {
    pub kernel: StoredObject,
    pub initrd: StoredObject,
    pub cmdline: String,
}

impl Kit {
    /// Pushes the kit's files (only what the store lacks is sent).
    pub async fn push(store: &BlockStore, kernel: &Path, initrd: &Path) -> Result<Kit, FarmError> {
        for path in [kernel, initrd] {
            if !path.is_file() {
                return Err(FarmError::Kit(format!(
                    "{} is not there (`make farm-boot` builds the kit)",
                    path.display()
                )));
            }
        }
        Ok(Kit {
            kernel: push_stored(store, kernel, ObjectKind::Kernel).await?,
            initrd: push_stored(store, initrd, ObjectKind::Initrd).await?,
            cmdline: CMDLINE.to_string(),
        })
    }
}
