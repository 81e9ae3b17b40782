//! `vmlot-provider`: reads its settings, picks its drivers, runs
//! [`vmlot_provider::daemon::run`] until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use vmlot_provider::config::ProviderConfig;
use vmlot_provider::driver::Driver;
use vmlot_provider::driver::qemu::{Accel, QemuConfig, QemuDriver};
use vmlot_provider::driver::synthetic::{SyntheticConfig, SyntheticDriver};
use vmlot_provider::driver::xen::{GuestType, XenConfig, XenDriver};
use vmlot_schemas::{HypervisorKind, ProviderId};

#[derive(Parser)]
#[command(
    name = "vmlot-provider",
    version,
    about = "Sells time segments of this machine on the vmlot market"
)]
struct Args {
    /// NATS server URL(s), comma-separated.
    #[arg(long, env = "VMLOT_NATS", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// TOML settings file (see README); flags below override it.
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    id: Option<ProviderId>,
    #[arg(long)]
    name: Option<String>,
    /// Hypervisors to offer, comma-separated: qemu, xen, synthetic.
    #[arg(long, value_delimiter = ',')]
    hypervisors: Option<Vec<String>>,
    #[arg(long)]
    slots: Option<u32>,
    /// Asking price per second of segment.
    #[arg(long)]
    price_per_second: Option<rust_decimal::Decimal>,
    #[arg(long)]
    min_price: Option<rust_decimal::Decimal>,
    /// Discount for checkpoints already held: price × (1 − discount × hot share).
    #[arg(long)]
    hot_discount: Option<rust_decimal::Decimal>,
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Bid only while the 1-minute load per core is below this.
    #[arg(long)]
    idle_load: Option<f64>,
}

fn hypervisor(name: &str) -> anyhow::Result<HypervisorKind> {
    match name {
        "qemu" => Ok(HypervisorKind::Qemu),
        "xen" => Ok(HypervisorKind::Xen),
        "synthetic" => Ok(HypervisorKind::Synthetic),
        other => anyhow::bail!("unknown hypervisor {other:?} (qemu, xen, synthetic)"),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VMLOT_LOG").unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let mut config = match &args.config {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            ProviderConfig::from_toml(&text).with_context(|| format!("parsing {}", path.display()))?
        }
        None => ProviderConfig::default(),
    };
    if let Some(v) = args.id {
        config.id = v;
    }
    if let Some(v) = args.name {
        config.name = v;
    }
    if let Some(v) = &args.hypervisors {
        config.hypervisors = v.iter().map(|h| hypervisor(h)).collect::<anyhow::Result<_>>()?;
    }
    if let Some(v) = args.slots {
        config.slots = v;
    }
    if let Some(v) = args.price_per_second {
        config.price_per_second = v;
    }
    if let Some(v) = args.min_price {
        config.min_price = v;
    }
    if let Some(v) = args.hot_discount {
        config.hot_discount = v;
    }
    if let Some(v) = args.cache_dir {
        config.cache_dir = v;
    }
    if let Some(v) = args.work_dir {
        config.work_dir = v;
    }
    if args.idle_load.is_some() {
        config.idle_load = args.idle_load;
    }
    let mut drivers: Vec<Arc<dyn Driver>> = Vec::new();
    for kind in &config.hypervisors {
        match kind {
            HypervisorKind::Qemu => {
                let accel = match config.qemu_accel.as_str() {
                    "kvm" => Accel::Kvm,
                    "tcg" => Accel::Tcg,
                    _ => Accel::Auto,
                };
                drivers.push(Arc::new(QemuDriver::new(QemuConfig { binary: None, accel })));
            }
            HypervisorKind::Synthetic => drivers.push(Arc::new(SyntheticDriver::new(SyntheticConfig {
                changed_fraction: config.synthetic_changed_fraction,
            }))),
            HypervisorKind::Xen => {
                let guest_type: GuestType = config
                    .xen_guest_type
                    .parse()
                    .map_err(|e: String| anyhow::anyhow!("xen_guest_type: {e}"))?;
                drivers.push(Arc::new(XenDriver::new(XenConfig {
                    binary: config.xl_binary.clone(),
                    guest_type,
                    console_dir: config.xen_console_dir.clone(),
                })));
            }
        }
    }
    let addrs: Vec<async_nats::ServerAddr> = args
        .nats
        .split(',')
        .map(|u| u.trim().parse())
        .collect::<Result<_, _>>()?;
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connect(addrs)
        .await
        .with_context(|| format!("connecting to {}", args.nats))?;
    vmlot_provider::daemon::run(client, config, drivers, shutdown_signal()).await?;
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
}
