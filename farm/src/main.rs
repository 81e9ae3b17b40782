//! `vmlot-farm`: OS Farm's daemon. Connects as the house (the broker's
//! credentials in the market's account: the farm is trusted, like the
//! broker, to say which image a recipe made), joins the store, serves
//! `image-build`, `image-list` and `image-show` until SIGINT or SIGTERM.

use std::path::PathBuf;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use vmlot_farm::FarmConfig;

#[derive(Parser)]
#[command(
    name = "vmlot-farm",
    version,
    about = "vmlot OS Farm: VM images named by their recipe, built on demand"
)]
struct Cli {
    /// NATS server URL(s), comma-separated.
    #[arg(long, env = "VMLOT_NATS", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    #[command(flatten)]
    access: vmlot_identity::Access,
    /// Scratch directories of builds (each removed when its build ends).
    #[arg(long, env = "VMLOT_FARM_DIR", default_value = "/var/tmp/vmlot-farm")]
    work_dir: PathBuf,
    /// Packages downloaded by earlier builds, kept for the next ones.
    #[arg(long, env = "VMLOT_FARM_APT_CACHE")]
    apt_cache: Option<PathBuf>,
    /// The Debian mirror mmdebstrap reads.
    #[arg(
        long,
        env = "VMLOT_FARM_MIRROR",
        default_value = "http://deb.debian.org/debian"
    )]
    mirror: String,
    /// The kernel every image boots (`make farm-boot`: .tools/farm-boot/vmlinuz).
    #[arg(long, env = "VMLOT_FARM_KERNEL")]
    kernel: PathBuf,
    /// The initrd that mounts an image's disk (.tools/farm-boot/initrd.cpio.gz).
    #[arg(long, env = "VMLOT_FARM_INITRD")]
    initrd: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("VMLOT_LOG").unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt().with_env_filter(filter).init();
    let (options, creds) = args.access.options()?;
    let client = vmlot_identity::connect_daemon(&args.nats, options.name("vmlot-farm")).await?;
    if let Some(creds) = creds {
        tracing::info!(user = %creds.caller, "connected with credentials");
    }
    let config = FarmConfig {
        apt_cache: args.apt_cache.unwrap_or_else(|| args.work_dir.join("apt-cache")),
        work_dir: args.work_dir,
        mirror: args.mirror,
        kernel: args.kernel,
        initrd: args.initrd,
    };
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        vmlot_telemetry::shutdown_signal().await;
        signal.cancel();
    });
    vmlot_farm::run(client, config, shutdown).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }
}
