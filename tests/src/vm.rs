//! A market for real VMs, driven as a user drives it: the `vmlot` CLI as a
//! process, the project's test guest (scripts/build-guest.sh) as the image,
//! and the checks every VM suite makes of a finished job (paid once per
//! segment, the console exact). The QEMU and Xen suites share it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use vmlot_schemas::JobId;
use vmlot_schemas::ledger::Settlement;
use vmlot_schemas::market::{GuestState, JobState, JobStatus};

use vmlot_schemas::caller::Role;

use crate::market::{self, Market, TEST_OPERATOR, kill_pids, processes_mentioning, wait_for};
use crate::repo_root;

const SETUP: &str = "run `make deps guest` in the repository root";

/// The test guest's kernel and initramfs (`make guest`).
pub fn guest_files() -> (PathBuf, PathBuf) {
    let dir = repo_root().join(".tools/guest");
    let (kernel, initrd) = (dir.join("vmlinuz"), dir.join("initrd.cpio.gz"));
    for file in [&kernel, &initrd] {
        assert!(file.is_file(), "test guest {} missing: {SETUP}", file.display());
    }
    (kernel, initrd)
}

/// Says how long a test took (its turn, not its wait for one).
pub struct Timed(&'static str, std::time::Instant);

impl Timed {
    pub fn start(what: &'static str) -> Self {
        Self(what, std::time::Instant::now())
    }
}

impl Drop for Timed {
    fn drop(&mut self) {
        eprintln!("{} took {:.1} s", self.0, self.1.elapsed().as_secs_f64());
    }
}

/// SIGKILLs on drop every process whose command line mentions a path: the
/// guests of a market go down with it, whatever killed their provider.
struct Reaper(String);

impl Drop for Reaper {
    fn drop(&mut self) {
        kill_pids(&processes_mentioning(&self.0));
    }
}

/// The image a job runs: the test guest under one hypervisor.
pub struct GuestImage<'a> {
    /// `qemu` or `xen`.
    pub hypervisor: &'a str,
    pub memory_mib: u32,
    pub cmdline: &'a str,
    pub disks: &'a [&'a Path],
}

/// A market whose VMs go down with it.
pub struct VmMarket {
    pub market: Market,
    /// How long [`VmMarket::until`] waits.
    pub patience: Duration,
    _reaper: Reaper,
}

impl VmMarket {
    /// `allowance_s`: the broker's transfer allowance, added to the segment
    /// length for each award's deadline.
    pub fn start(allowance_s: u32) -> Self {
        Self::start_with_bid_window(300, allowance_s)
    }

    /// [`VmMarket::start`] with a bid window of `bid_window_ms`: providers in
    /// nested hosts answer lots more slowly.
    pub fn start_with_bid_window(bid_window_ms: u32, allowance_s: u32) -> Self {
        Self::on(Market::start(broker_args(bid_window_ms, allowance_s), &[]).unwrap())
    }

    /// [`VmMarket::start`] on a new JetStream cluster of `nodes` servers,
    /// every stream and bucket kept on each ([`Market::on_cluster`]).
    pub async fn start_on_cluster(nodes: usize, allowance_s: u32) -> Self {
        let market = Market::start_on_cluster(nodes, broker_args(300, allowance_s), &[])
            .await
            .unwrap();
        Self::on(market)
    }

    /// `market` (with no guests yet), its guests going down with it.
    pub fn on(market: Market) -> Self {
        let reaper = Reaper(market.path().display().to_string());
        Self {
            market,
            patience: Duration::from_secs(240),
            _reaper: reaper,
        }
    }

    /// `vmlot` as the market's operator.
    pub fn vmlot(&self, args: &[&str]) -> Output {
        self.vmlot_as(Role::Operator, TEST_OPERATOR, args)
    }

    /// `vmlot` with the credentials of `role`'s user `name`.
    pub fn vmlot_as(&self, role: Role, name: &str, args: &[&str]) -> Output {
        self.market.vmlot_as(role, name, args)
    }

    /// `vmlot` as the operator, which must succeed; its stdout.
    pub fn vmlot_ok(&self, args: &[&str]) -> Vec<u8> {
        self.vmlot_ok_as(Role::Operator, TEST_OPERATOR, args)
    }

    /// `vmlot` as `role`'s user `name`, which must succeed; its stdout.
    pub fn vmlot_ok_as(&self, role: Role, name: &str, args: &[&str]) -> Vec<u8> {
        let out = self.vmlot_as(role, name, args);
        assert!(
            out.status.success(),
            "vmlot {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.market.logs()
        );
        out.stdout
    }

    /// Pushes the test guest with `vmlot image push`; the image description file.
    pub fn push_image(&self, image: &GuestImage) -> PathBuf {
        let (kernel, initrd) = guest_files();
        let description = self
            .market
            .path()
            .join(format!("image-{}.json", image.hypervisor));
        let memory = image.memory_mib.to_string();
        let mut args: Vec<&str> = vec![
            "image",
            "push",
            "--hypervisor",
            image.hypervisor,
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--memory",
            &memory,
            "--cmdline",
            image.cmdline,
            "-o",
            description.to_str().unwrap(),
        ];
        for disk in image.disks {
            args.extend(["--disk", disk.to_str().unwrap()]);
        }
        self.vmlot_ok(&args);
        description
    }

    /// Funds submitter `default` and submits as it with `vmlot submit`; the job id.
    /// `segments` is a count or `until-halt`.
    pub fn submit(&self, image: &Path, segment_seconds: &str, segments: &str, redundancy: &str) -> JobId {
        self.submit_checked(image, segment_seconds, segments, redundancy, "continuation")
    }

    /// [`Self::submit`] with `vmlot submit --check CHECK` (`none` for a
    /// market of one provider: nobody else could check its checkpoints).
    pub fn submit_checked(
        &self,
        image: &Path,
        segment_seconds: &str,
        segments: &str,
        redundancy: &str,
        check: &str,
    ) -> JobId {
        let mut args = vec![
            "--json",
            "submit",
            "--check",
            check,
            "--image",
            image.to_str().unwrap(),
            "--segment-seconds",
            segment_seconds,
            "--redundancy",
            redundancy,
            "--reserve",
            "1",
            "--budget",
            "50",
        ];
        match segments {
            "until-halt" => args.push("--until-halt"),
            n => args.extend(["--segments", n]),
        }
        self.vmlot_ok(&["admin", "credit", "default", "50"]);
        let out = self.vmlot_ok_as(Role::Submitter, "default", &args);
        let submitted: serde_json::Value = serde_json::from_slice(&out).unwrap();
        submitted["job"].as_str().unwrap().parse().unwrap()
    }

    pub async fn status(&self, job: JobId) -> JobStatus {
        self.market.status(job).await
    }

    /// Polls until `check` holds for the job's status; fails with the logs
    /// (and `more`, e.g. a nested host's console) after [`VmMarket::patience`].
    pub async fn until<T>(
        &self,
        job: JobId,
        what: &str,
        mut check: impl FnMut(&JobStatus) -> Option<T>,
    ) -> T {
        let found = wait_for(self.patience, async || {
            let s = self.status(job).await;
            check(&s)
        })
        .await;
        match found {
            Ok(v) => v,
            Err(e) => panic!(
                "{what}: {e}\n{:#?}\n{}",
                self.status(job).await,
                self.market.logs()
            ),
        }
    }

    /// Waits for the job's end, which must be `Done`.
    pub async fn wait_final(&self, job: JobId) -> JobStatus {
        let done = self.market.wait_final(job, self.patience).await;
        assert_eq!(done.state, JobState::Done, "{done:#?}\n{}", self.market.logs());
        done
    }

    /// The settlement payments of `job`, read from the books.
    pub async fn payments(&self, job: JobId) -> Vec<Settlement> {
        market::payments(self.market.api().await.nats(), job).await
    }

    /// Exactly one payment per settled segment, to the provider that
    /// settled it, and the job's spending is their sum (once the job is
    /// refunded: [`Market::paid`](crate::market::Market::paid)).
    pub async fn assert_paid_once(&self, job: JobId) -> JobStatus {
        self.market.assert_paid_once(job).await
    }
}

/// The broker's flags for a VM market: `bid_window_ms` of bids, and
/// `allowance_s` beyond the segment's length for each award's deadline.
pub fn broker_args(bid_window_ms: u32, allowance_s: u32) -> Vec<String> {
    vec![
        "--bid-window-ms".to_string(),
        bid_window_ms.to_string(),
        "--transfer-allowance-s".to_string(),
        allowance_s.to_string(),
    ]
}

/// The joined console equals the uninterrupted run, and the guest ended by
/// powering off in the last segment.
pub fn assert_console_exact(console: &[u8], reference: &[u8], done: &JobStatus, how: &str) {
    assert!(
        console == reference,
        "{how}: the console differs from the uninterrupted run\n--- market\n{}\n--- uninterrupted\n{}",
        String::from_utf8_lossy(console),
        String::from_utf8_lossy(reference)
    );
    // The guest halted, and its result carried its disks as it left them.
    assert!(
        matches!(
            done.settled.last().map(|s| &s.guest),
            Some(GuestState::Halted { final_state: Some(_) })
        ),
        "{how}: the last segment should end halted with its final state: {:?}",
        done.settled.last().map(|s| &s.guest)
    );
    assert!(
        done.settled[..done.settled.len() - 1]
            .iter()
            .all(|s| matches!(s.guest, GuestState::Running { .. }))
    );
}

// The test guest as the QEMU suites run it (market_qemu.rs, cluster.rs).

/// The test guest's command line. 4.5–9 s of boot and 12–20 s of hashing
/// under TCG on the machines this has run on; CI's has run all of it inside
/// three 4 s segments, so a test that needs more asks
/// [`segment_seconds_spanning`] for shorter ones.
pub const CMDLINE: &str = "console=ttyS0 quiet loglevel=1 panic=-1 vmlot.steps=48 vmlot.work_kib=2048";
/// The test guest's memory under QEMU.
pub const MEMORY_MIB: u32 = 128;
/// The QEMU suites' segment length.
pub const SEGMENT_SECONDS: &str = "4";

/// One uninterrupted run of the test guest, made once.
struct Reference {
    console: Vec<u8>,
    /// Wall-clock time from QEMU's start to the guest's power-off.
    took: Duration,
}

static REFERENCE: tokio::sync::OnceCell<Reference> = tokio::sync::OnceCell::const_new();

async fn reference() -> &'static Reference {
    REFERENCE
        .get_or_init(|| async {
            tokio::task::spawn_blocking(|| {
                let _timed = Timed::start("direct reference run");
                let started = std::time::Instant::now();
                let console = direct_run(CMDLINE, None);
                let took = started.elapsed();
                let text = String::from_utf8_lossy(&console);
                assert!(
                    text.contains("step 48/48 ") && text.contains("vmlot-guest: done "),
                    "the direct run did not finish its work:\n{text}"
                );
                Reference { console, took }
            })
            .await
            .unwrap()
        })
        .await
}

/// The guest booted once by QEMU itself (no driver, no market) and run to
/// its power-off: the console every market run must reproduce.
pub async fn reference_console() -> &'static [u8] {
    &reference().await.console
}

/// A whole number of seconds, [`SEGMENT_SECONDS`] at most and 2 at least,
/// short enough that the uninterrupted run spans `segments` of them on this
/// machine: a test that needs the guest to cross several providers asks for
/// it instead of hoping TCG is slow enough (CI's machine once ran the whole
/// guest inside three 4 s segments).
pub async fn segment_seconds_spanning(segments: u32) -> String {
    let took = reference().await.took.as_secs();
    let most: u64 = SEGMENT_SECONDS.parse().unwrap();
    (took / u64::from(segments)).clamp(2, most).to_string()
}

/// Runs the test guest with `cmdline` (and `disk`, written in place) in
/// QEMU itself to its power-off; its console.
pub fn direct_run(cmdline: &str, disk: Option<&Path>) -> Vec<u8> {
    let (kernel, initrd) = guest_files();
    let dir = tempfile::tempdir().unwrap();
    let console = dir.path().join("console.log");
    let mut qemu = Command::new("timeout");
    qemu.arg("300")
        .arg("qemu-system-x86_64")
        .args(["-accel", "tcg", "-machine", "q35", "-m", &MEMORY_MIB.to_string()])
        .args(["-smp", "1", "-nodefaults", "-no-user-config", "-display", "none"])
        .arg("-no-reboot")
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", cmdline]);
    if let Some(disk) = disk {
        qemu.arg("-drive")
            .arg(format!("file={},format=raw,if=virtio", disk.display()));
    }
    let status = qemu
        .stdin(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("qemu-system-x86_64: {e}: {SETUP}"));
    assert!(status.success(), "direct QEMU run: {status}");
    std::fs::read(&console).unwrap()
}

/// The test guest as a QEMU image with these disks.
pub fn qemu_image<'a>(disks: &'a [&'a Path]) -> GuestImage<'a> {
    GuestImage {
        hypervisor: "qemu",
        memory_mib: MEMORY_MIB,
        cmdline: CMDLINE,
        disks,
    }
}
