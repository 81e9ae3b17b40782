//! Baselines and meters shared by the benchmarks: rsync's delta transfer,
//! tool versions for the report, best-of-n timing, CPU seconds of the
//! nats-server and of this process.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt;
use vmlot_tests::NatsServer;

/// What rsync sent for one file.
pub struct Rsync {
    /// Bytes rsync sent literally (what its delta could not find in the basis).
    pub literal: u64,
    /// Everything its sender and receiver sent each other (`Total bytes
    /// sent` plus `Total bytes received`): the literal data, the matched
    /// blocks' tokens and the basis file's block checksums.
    pub total: u64,
    pub seconds: f64,
}

/// rsync's delta transfer of `b` onto a copy of `a` with `--inplace`: the
/// literal bytes it sends. In place, rsync only reuses basis data at or
/// after the offset it is writing, so content that moved towards the start
/// of the file counts as literal; see [`rsync_delta_with`].
pub fn rsync_delta(a: &Path, b: &Path) -> Result<Rsync> {
    rsync_delta_with(a, b, true)
}

/// rsync's delta transfer of `b` onto a copy of `a`, in place or (rsync's
/// default) into a new file built from the basis at any offset.
pub fn rsync_delta_with(a: &Path, b: &Path, inplace: bool) -> Result<Rsync> {
    rsync_delta_args(a, b, if inplace { &["--inplace"] } else { &[] })
}

/// rsync's delta transfer of `b` onto a copy of `a` with `extra` flags
/// (`-z`: compressed on the wire).
pub fn rsync_delta_args(a: &Path, b: &Path, extra: &[&str]) -> Result<Rsync> {
    let tmp = tempfile::tempdir()?;
    let dest = tmp.path().join("dest");
    std::fs::copy(a, &dest)?;
    let started = Instant::now();
    let mut rsync = Command::new("rsync");
    rsync.args(["--no-whole-file", "--stats"]);
    rsync.args(extra);
    let out = rsync
        .arg(b)
        .arg(&dest)
        .output()
        .context("running rsync (apt-get install rsync)")?;
    let seconds = started.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!("rsync failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let stats = String::from_utf8_lossy(&out.stdout);
    let figure = |name: &str| -> Result<u64> {
        stats
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .map(|v| v.replace(',', ""))
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("rsync printed no '{name}' line"))
    };
    Ok(Rsync {
        literal: figure("Literal data: ")?,
        total: figure("Total bytes sent: ")? + figure("Total bytes received: ")?,
        seconds,
    })
}

/// First line of `bin flag`, or why it could not run.
pub fn version(bin: &std::ffi::OsStr, flag: &str) -> String {
    Command::new(bin)
        .arg(flag)
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_else(|e| format!("unavailable ({e})"))
}

/// Fastest of `n` runs, in seconds.
pub fn best_of(n: usize, mut f: impl FnMut()) -> f64 {
    (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min)
}

/// CPU seconds used so far by a nats-server and by this process: two
/// readings, [`Cpu::since`] the other, say where a step's time went.
#[derive(Clone, Copy)]
pub struct Cpu {
    pub server: f64,
    pub own: f64,
}

impl Cpu {
    pub fn now(server: &NatsServer) -> Self {
        Self {
            server: server.cpu_seconds().unwrap_or(0.0),
            own: vmlot_tests::own_cpu_seconds().unwrap_or(0.0),
        }
    }

    /// What was used between `before` and this reading.
    pub fn since(self, before: Cpu) -> Cpu {
        Cpu {
            server: self.server - before.server,
            own: self.own - before.own,
        }
    }

    /// What was used from this reading until now: (server, own).
    pub fn stop(self, server: &NatsServer) -> (f64, f64) {
        let used = Cpu::now(server).since(self);
        (used.server, used.own)
    }
}

/// The write half of a raw-JetStream baseline: `pieces` published to
/// `subject` with their acknowledgements pipelined, at most `in_flight`
/// outstanding, waited for in order. Returns the bytes published.
pub async fn publish_pipelined(
    js: &jetstream::Context,
    subject: &'static str,
    pieces: impl Iterator<Item = std::io::Result<Bytes>>,
    in_flight: usize,
) -> Result<u64> {
    let mut acks = futures::stream::FuturesOrdered::new();
    let mut bytes = 0u64;
    for piece in pieces {
        let piece = piece?;
        bytes += piece.len() as u64;
        acks.push_back(js.publish(subject, piece).await?.into_future());
        if acks.len() >= in_flight {
            acks.next().await.context("ack")??;
        }
    }
    while let Some(ack) = acks.next().await {
        ack?;
    }
    Ok(bytes)
}

/// The test guest's boot files, from `dir` or `.tools/guest`; an error
/// naming the missing file and how to make it.
pub fn guest_files(dir: Option<&Path>) -> Result<vmlot_provider::driver::BootFiles> {
    let dir = dir.map_or_else(
        || vmlot_tests::repo_root().join(".tools/guest"),
        Path::to_path_buf,
    );
    let files = vmlot_provider::driver::BootFiles {
        kernel: dir.join("vmlinuz"),
        initrd: Some(dir.join("initrd.cpio.gz")),
        disks: Vec::new(),
        memory: None,
    };
    for file in [&files.kernel, files.initrd.as_ref().expect("set above")] {
        if !file.is_file() {
            anyhow::bail!("test guest file {} is missing: run `make guest`", file.display());
        }
    }
    Ok(files)
}
