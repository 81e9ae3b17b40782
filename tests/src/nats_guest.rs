//! A [`NatsServer`] whose `nats-server` runs inside a QEMU guest (issue 16
//! step 4, the power cut): the NATS guest of `scripts/build-nats-guest.sh`
//! (`make nats-guest`: a Debian kernel, busybox, the static nats-server)
//! boots with its JetStream store on a virtio disk, a sparse ext4 file in
//! the server's temp directory that the harness makes and fills before the
//! first boot (the guest never formats it): the configuration
//! [`NatsServer::configure`] writes for a host server, with the deployment's
//! operator, accounts, TLS and `sync_interval: always`, its file paths
//! rewritten to the disk's. QEMU's user network forwards the server's
//! loopback port to the guest's 4222, so clients see an ordinary server
//! (the deployment's certificate names 127.0.0.1).
//!
//! [`NatsServer::kill`] SIGKILLs QEMU: a power cut, no clean shutdown,
//! whatever the guest had not written to its disk is lost; the disk file
//! stays. [`NatsServer::restart`] boots the guest again on the same disk
//! and port. The guest's console (the kernel's, the init's, nats-server's
//! log) is the server's [`NatsServer::log`], appended to across boots.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use vmlot_identity::Deployment;

use crate::{Auth, Fsync, NatsServer, free_port, repo_root};

/// Where `make nats-guest` puts the guest's kernel and initramfs.
pub const GUEST_DIR: &str = ".tools/nats-guest";

/// The port nats-server listens on inside the guest.
const GUEST_PORT: u16 = 4222;

/// Where the guest mounts its disk (guest/nats-init).
const MOUNT: &str = "/mnt/nats";

/// The disk file's size (sparse: only what the file system and the store
/// write takes room on the host).
const DISK_BYTES: u64 = 512 << 20;

/// Guest memory, MiB.
const MEMORY_MIB: u32 = 512;

/// How long a boot may take at least, whatever a caller allows: the
/// kernel and nats-server under TCG on a busy two-core machine.
const BOOT_LIMIT: Duration = Duration::from_secs(120);

/// What nats-server logs once it accepts clients.
const READY: &str = "Server is ready";

/// How the guest init says it gave up (guest/nats-init).
const FAILED: &str = "nats-guest: FAILED";

const SETUP: &str = "run `make deps nats-guest` in the repository root";

/// The NATS guest's kernel and initramfs.
pub fn guest_files() -> Result<(PathBuf, PathBuf)> {
    let dir = repo_root().join(GUEST_DIR);
    let (kernel, initrd) = (dir.join("vmlinuz"), dir.join("initrd.cpio.gz"));
    for file in [&kernel, &initrd] {
        if !file.is_file() {
            bail!("NATS guest {} missing: {SETUP}", file.display());
        }
    }
    Ok((kernel, initrd))
}

/// `qemu-system-x86_64`: the project's `.tools/bin` one, else the one on `PATH`.
fn qemu_binary() -> PathBuf {
    let local = repo_root().join(".tools/bin/qemu-system-x86_64");
    if local.exists() {
        local
    } else {
        PathBuf::from("qemu-system-x86_64")
    }
}

/// `mkfs.ext4` (e2fsprogs), which often lives outside a user's `PATH`.
fn mkfs_binary() -> PathBuf {
    ["/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("mkfs.ext4"))
}

/// How a [`NatsServer`] in a guest is booted; kept by the server so that
/// [`NatsServer::restart`] boots it again.
pub(crate) struct Guest {
    kernel: PathBuf,
    initrd: PathBuf,
    /// The virtio disk: the store, the configuration, the TLS files.
    disk: PathBuf,
    /// QEMU's own messages (the guest's console is the server's log).
    qemu_log: PathBuf,
    /// The console log's length when the current boot started: readiness
    /// is read from what follows.
    boot_offset: u64,
    /// Boots so far.
    boots: u32,
}

impl NatsServer {
    /// Starts a standalone server (`sync_interval: always`, the
    /// deployment's authentication and TLS, as [`NatsServer::start`]) in a
    /// fresh QEMU guest with its store on a new virtio disk; its URL is a
    /// loopback port QEMU forwards to the guest.
    pub fn start_in_guest() -> Result<Self> {
        let (kernel, initrd) = guest_files()?;
        let temp = tempfile::Builder::new().prefix("vmlot-nats-guest-").tempdir()?;
        let dir = temp.path().to_path_buf();
        let deployment = Deployment::create(&dir.join("deploy"))?;
        let mut server = Self::configure(
            &dir,
            "n1",
            free_port(),
            None,
            Fsync::Always,
            &deployment,
            Auth::Secured,
        )?;
        server._temp = Some(temp);
        // The host store configure made stays empty: the store is on the disk.
        let _ = std::fs::remove_dir(dir.join("n1-store"));
        let contents = dir.join("disk-contents");
        let host_config = std::fs::read_to_string(&server.config)?;
        let guest_config = guest_config(&host_config, server.port, &contents)?;
        std::fs::write(contents.join("nats.conf"), &guest_config)?;
        std::fs::create_dir_all(contents.join("store"))?;
        // The host-side copy, for whoever reads the server's directory.
        server.config = dir.join("n1-guest.conf");
        std::fs::write(&server.config, &guest_config)?;
        let disk = dir.join("nats-disk.img");
        make_disk(&disk, &contents)?;
        std::fs::remove_dir_all(&contents)?;
        server.guest = Some(Guest {
            kernel,
            initrd,
            disk,
            qemu_log: dir.join("n1-qemu.log"),
            boot_offset: 0,
            boots: 0,
        });
        server.spawn()?;
        server.wait_ready(BOOT_LIMIT)?;
        Ok(server)
    }

    /// The guest's disk file, for a server started by
    /// [`NatsServer::start_in_guest`].
    pub fn guest_disk(&self) -> Option<&Path> {
        self.guest.as_ref().map(|g| g.disk.as_path())
    }

    /// How many times the guest has booted (the first start included).
    pub fn guest_boots(&self) -> u32 {
        self.guest.as_ref().map_or(0, |g| g.boots)
    }
}

/// `host` (a host server's configuration from [`NatsServer::configure`])
/// for the guest: listening on all of the guest's addresses, its store and
/// every file it names (the TLS certificate and key) on the disk, copied
/// into `contents` (the disk's future root). Fails if the configuration is
/// not the shape expected, or if a host path would be left in it.
fn guest_config(host: &str, host_port: u16, contents: &Path) -> Result<String> {
    std::fs::create_dir_all(contents.join("files"))?;
    let mut out = String::new();
    let (mut listen, mut store, mut sync) = (false, false, false);
    for line in host.lines() {
        let trimmed = line.trim_start();
        let indent = &line[..line.len() - trimmed.len()];
        if trimmed == format!("listen: 127.0.0.1:{host_port}") {
            out.push_str(&format!("{indent}listen: 0.0.0.0:{GUEST_PORT}\n"));
            listen = true;
        } else if trimmed.starts_with("store_dir:") {
            out.push_str(&format!("{indent}store_dir: \"{MOUNT}/store\"\n"));
            store = true;
        } else if let Some((key, path)) = quoted_file(trimmed) {
            let source = Path::new(path);
            let name = source
                .file_name()
                .with_context(|| format!("{key} names no file: {path}"))?;
            std::fs::copy(source, contents.join("files").join(name))
                .with_context(|| format!("copying {key} {path} onto the guest's disk"))?;
            out.push_str(&format!(
                "{indent}{key}: \"{MOUNT}/files/{}\"\n",
                name.to_string_lossy()
            ));
        } else {
            sync |= trimmed == "sync_interval: always";
            out.push_str(line);
            out.push('\n');
        }
    }
    if !(listen && store && sync) {
        bail!(
            "the server configuration is not as expected (listen {listen}, store_dir {store}, \
             sync_interval: always {sync}):\n{host}"
        );
    }
    // Every host path is gone (the JWTs and keys in the text are not paths).
    if let Some(line) = out
        .lines()
        .find(|l| l.contains("\"/") && !l.contains(&format!("\"{MOUNT}/")))
    {
        bail!("a host path left in the guest's configuration: {line}");
    }
    Ok(out)
}

/// `key: "/path"` for a key naming a file (`cert_file`, `key_file`, `ca_file`).
fn quoted_file(line: &str) -> Option<(&str, &str)> {
    let (key, value) = line.split_once(':')?;
    if !key.ends_with("_file") {
        return None;
    }
    let path = value.trim().strip_prefix('"')?.strip_suffix('"')?;
    path.starts_with('/').then_some((key, path))
}

/// A sparse file of [`DISK_BYTES`] holding an ext4 file system made from
/// `contents` (`mkfs.ext4 -d`: no mount, no root needed).
fn make_disk(disk: &Path, contents: &Path) -> Result<()> {
    std::fs::File::create(disk)?.set_len(DISK_BYTES)?;
    let out = Command::new(mkfs_binary())
        .args(["-F", "-q", "-L", "nats", "-d"])
        .arg(contents)
        .arg(disk)
        .output()
        .context("running mkfs.ext4 (e2fsprogs)")?;
    if !out.status.success() {
        bail!(
            "mkfs.ext4 -d {} {}: {}\n{}",
            contents.display(),
            disk.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Boots `server`'s guest (QEMU as the server's child process).
pub(crate) fn spawn(server: &mut NatsServer) -> Result<()> {
    let console = server.dir.join(format!("{}.log", server.name));
    let offset = std::fs::metadata(&console).map_or(0, |m| m.len());
    let guest = server.guest.as_mut().context("not a guest server")?;
    let qemu_log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&guest.qemu_log)?;
    let child = Command::new(qemu_binary())
        .args(["-accel", "tcg", "-machine", "q35", "-cpu", "max"])
        .args(["-m", &MEMORY_MIB.to_string(), "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(&guest.kernel)
        .arg("-initrd")
        .arg(&guest.initrd)
        .args(["-append", "console=ttyS0 quiet loglevel=1 panic=-1"])
        // Appended to, like a host server's log: every boot's console.
        .arg("-chardev")
        .arg(format!("file,id=console,path={},append=on", console.display()))
        .args(["-serial", "chardev:console"])
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=none,id=store",
            guest.disk.display()
        ))
        .args(["-device", "virtio-blk-pci,drive=store"])
        .arg("-netdev")
        .arg(format!(
            "user,id=net,hostfwd=tcp:127.0.0.1:{}-:{GUEST_PORT}",
            server.port
        ))
        .args(["-device", "virtio-net-pci,netdev=net"])
        .stdin(Stdio::null())
        .stdout(qemu_log.try_clone()?)
        .stderr(qemu_log)
        .spawn()
        .with_context(|| format!("starting {}", qemu_binary().display()))?;
    guest.boot_offset = offset;
    guest.boots += 1;
    server.child = Some(child);
    Ok(())
}

/// Waits until nats-server in the guest has said it is ready and a client
/// connecting through the forwarded port is greeted (its `INFO`), for
/// `limit` but at least [`BOOT_LIMIT`]. Fails early, with the console, if
/// QEMU exits or the guest's init gives up.
pub(crate) fn wait_ready(server: &mut NatsServer, limit: Duration) -> Result<()> {
    let limit = limit.max(BOOT_LIMIT);
    let deadline = Instant::now() + limit;
    let guest = server.guest.as_ref().context("not a guest server")?;
    let offset = guest.boot_offset;
    let qemu_log = guest.qemu_log.clone();
    let addr: SocketAddr = ([127, 0, 0, 1], server.port).into();
    let failure = |what: String, server: &NatsServer| {
        anyhow::anyhow!(
            "NATS guest {}: {what}; QEMU said:\n{}\nconsole of this boot:\n{}",
            server.name,
            std::fs::read_to_string(&qemu_log).unwrap_or_default(),
            this_boot(server, offset)
        )
    };
    while Instant::now() < deadline {
        if let Some(child) = server.child.as_mut()
            && let Some(status) = child.try_wait()?
        {
            return Err(failure(format!("QEMU exited with {status}"), server));
        }
        let console = this_boot(server, offset);
        if console.contains(FAILED) {
            return Err(failure("its init gave up".into(), server));
        }
        if console.contains(READY) && greeted(addr) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(failure(format!("not ready after {limit:?}"), server))
}

/// The console since the boot that started at `offset`.
fn this_boot(server: &NatsServer, offset: u64) -> String {
    let text = std::fs::read(server.dir.join(format!("{}.log", server.name))).unwrap_or_default();
    let from = (offset as usize).min(text.len());
    String::from_utf8_lossy(&text[from..]).into_owned()
}

/// Whether a connection to `addr` is greeted by a NATS server's `INFO`
/// (QEMU accepts on the forwarded port before anything listens in the guest).
fn greeted(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut head = [0u8; 5];
    stream.read_exact(&mut head).is_ok() && &head == b"INFO "
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_configuration_becomes_the_guests() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("server-cert.pem");
        std::fs::write(&cert, "CERT").unwrap();
        let host = format!(
            "server_name: n1\nlisten: 127.0.0.1:4567\nmax_payload: 8MB\njetstream {{\n  \
             store_dir: \"/tmp/x/n1-store\"\n  sync_interval: always\n}}\n\
             tls {{\n  cert_file: \"{}\"\n  timeout: 5\n}}\noperator: \"eyJ0\"\n",
            cert.display()
        );
        let contents = dir.path().join("contents");
        let guest = guest_config(&host, 4567, &contents).unwrap();
        assert_eq!(
            guest,
            "server_name: n1\nlisten: 0.0.0.0:4222\nmax_payload: 8MB\njetstream {\n  \
             store_dir: \"/mnt/nats/store\"\n  sync_interval: always\n}\n\
             tls {\n  cert_file: \"/mnt/nats/files/server-cert.pem\"\n  timeout: 5\n}\n\
             operator: \"eyJ0\"\n"
        );
        assert_eq!(
            std::fs::read_to_string(contents.join("files/server-cert.pem")).unwrap(),
            "CERT"
        );
        // Without `sync_interval: always` there is nothing to prove.
        let lax = host.replace("  sync_interval: always\n", "");
        assert!(guest_config(&lax, 4567, &contents).is_err());
    }
}
