//! Nested Xen test hosts: Debian's Xen 4.17 booted under QEMU (TCG), its
//! dom0 a busybox initramfs running the project's own `vmlot-provider`
//! with the Xen driver (`make xen-host` builds it; `scripts/xen-host.sh
//! boot` starts one). The provider in dom0 reaches the test's nats-server
//! through QEMU's user-mode network, where 10.0.2.2 is the host's loopback.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::repo_root;

/// What `make xen-host` leaves in `.tools/xen`.
pub const HOST_FILES: [&str; 3] = ["xen", "vmlinuz", "dom0.cpio.gz"];

/// Fails with the command to run when the host image is not built.
pub fn require_host_image() -> Result<()> {
    let dir = repo_root().join(".tools/xen");
    for file in HOST_FILES {
        if !dir.join(file).is_file() {
            bail!("{} missing: run `make xen-host`", dir.join(file).display());
        }
    }
    Ok(())
}

/// How one nested host's provider presents itself to the market.
#[derive(Clone, Debug)]
pub struct XenHostSpec {
    pub name: String,
    pub id: uuid::Uuid,
    /// Price per segment (the provider's `min_price`, nothing per second).
    pub price: String,
}

impl XenHostSpec {
    pub fn new(name: &str, price: &str) -> Self {
        Self {
            name: name.into(),
            id: uuid::Uuid::new_v4(),
            price: price.into(),
        }
    }
}

/// One nested Xen host: a QEMU process (the boot script execs it), SIGKILLed
/// on drop like a machine that loses power.
pub struct XenHost {
    pub spec: XenHostSpec,
    serial: PathBuf,
    child: Option<Child>,
}

impl XenHost {
    /// Boots a host whose provider joins the market at `nats_port` on the
    /// test machine's loopback. The host's serial console (Xen's and
    /// dom0's, the provider's log among it) goes to `<dir>/<name>.serial`.
    pub fn boot(spec: &XenHostSpec, nats_port: u16, creds: &Path, dir: &Path) -> Result<Self> {
        require_host_image()?;
        let serial = dir.join(format!("{}.serial", spec.name));
        let child = Command::new("bash")
            .arg(repo_root().join("scripts/xen-host.sh"))
            .arg("boot")
            .args(["--nats", &format!("nats://10.0.2.2:{nats_port}")])
            .args(["--name", &spec.name])
            .args(["--id", &spec.id.to_string()])
            .arg("--creds")
            .arg(creds)
            .args(
                crate::tls_ca_beside(creds)
                    .map(|ca| vec!["--tls-ca".into(), ca.into_os_string()])
                    .unwrap_or_default(),
            )
            .args(["--price", "0", "--min-price", &spec.price])
            .arg("--serial")
            .arg(&serial)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(
                dir.join(format!("{}.qemu.log", spec.name)),
            )?)
            .spawn()
            .context("starting scripts/xen-host.sh boot")?;
        Ok(Self {
            spec: spec.clone(),
            serial,
            child: Some(child),
        })
    }

    /// The host's serial console so far (Xen, dom0 and the provider's log).
    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// The last `lines` lines of [`XenHost::console`], for failure messages.
    pub fn console_tail(&self, lines: usize) -> String {
        let text = self.console();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// SIGKILL: the whole machine, dom0 and guests, is gone at once.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// True once QEMU has exited (or was killed).
    pub fn exited(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => !matches!(child.try_wait(), Ok(None)),
            None => true,
        }
    }
}

impl Drop for XenHost {
    fn drop(&mut self) {
        self.kill();
    }
}
