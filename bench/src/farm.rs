//! The seed's table redone through the store (issue 18 step 4): for two
//! pairs of recipes (a base and the base plus packages; the same base on
//! two suites), OS Farm builds the first into an empty store, then the
//! second; what the second shares with the first (its blocks already
//! stored: hot), and what crosses the wire for it, counted by the NATS
//! server on the farm's own connection, against rsync's delta transfer of
//! the second disk onto the first (bytes sent and received) in the same run.

use std::collections::HashSet;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use vmlot_cas::{BlockStore, pull_file};
use vmlot_client::api::ImageShow;
use vmlot_schemas::recipe::{ImageRecord, RECIPE_VERSION, Recipe, RecipeRef};
use vmlot_schemas::{BlockId, ManifestId};
use vmlot_tests::market::{Market, wait_for};

use crate::baseline::{rsync_delta, version};

#[derive(clap::Args)]
pub struct Args {
    /// Packages of the "base plus packages" recipe, comma-separated.
    #[arg(long, default_value = "python3-minimal,curl,bc,jq", value_delimiter = ',')]
    packages: Vec<String>,
    /// The base's suite and the other suite of the second pair.
    #[arg(long, default_value = "bookworm")]
    suite: String,
    #[arg(long, default_value = "trixie")]
    other_suite: String,
    #[arg(long, default_value_t = 1024)]
    disk_mib: u32,
}

const MB: f64 = 1_000_000.0;

fn recipe(suite: &str, packages: &[String], disk_mib: u32) -> Recipe {
    Recipe {
        version: RECIPE_VERSION,
        distribution: "debian".into(),
        suite: suite.into(),
        architecture: "amd64".into(),
        packages: packages.to_vec(),
        files: Vec::new(),
        command: Some("echo seed table".into()),
        disk_mib,
        format: Default::default(),
    }
}

/// One pair's figures.
struct Row {
    pair: String,
    blocks: usize,
    hot: usize,
    cold_bytes: u64,
    wire: u64,
    build_s: f64,
    rsync_total: u64,
    rsync_literal: u64,
    rsync_s: f64,
}

pub async fn run(args: Args) -> Result<()> {
    println!(
        "nats-server: {}",
        version(vmlot_tests::nats_server_binary()?.as_os_str(), "--version")
    );
    println!("rsync: {}", version("rsync".as_ref(), "--version"));
    println!("mmdebstrap: {}", version("mmdebstrap".as_ref(), "--version"));
    let base = recipe(&args.suite, &[], args.disk_mib);
    let more = recipe(&args.suite, &args.packages, args.disk_mib);
    let other = recipe(&args.other_suite, &[], args.disk_mib);
    let rows = vec![
        pair(
            &format!("{} base → base + {}", args.suite, args.packages.join(",")),
            &base,
            &more,
        )
        .await?,
        pair(
            &format!("{} base → {} base", args.suite, args.other_suite),
            &base,
            &other,
        )
        .await?,
    ];
    println!();
    println!("## The seed's table through the store: the second image of each pair given the first");
    println!();
    println!(
        "| pair | blocks | hot % | cold MB | wire MB (server) | build s | rsync total MB | wire/rsync | rsync literal MB | rsync s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {:.1} | {:.2} | {:.2} | {:.1} | {:.2} | {:.2} | {:.2} | {:.1} |",
            r.pair,
            r.blocks,
            100.0 * r.hot as f64 / r.blocks as f64,
            r.cold_bytes as f64 / MB,
            r.wire as f64 / MB,
            r.build_s,
            r.rsync_total as f64 / MB,
            r.wire as f64 / r.rsync_total as f64,
            r.rsync_literal as f64 / MB,
            r.rsync_s,
        );
    }
    Ok(())
}

/// Builds `first` into a new store, then `second`; the second's figures.
async fn pair(name: &str, first: &Recipe, second: &Recipe) -> Result<Row> {
    println!("[pair] {name}");
    let mut market = Market::start(vec!["--bid-window-ms".into(), "300".into()], &[])?;
    market.add_farm()?;
    let farm_log = || market.farm.as_ref().map(|f| f.log()).unwrap_or_default();
    wait_for(std::time::Duration::from_secs(120), async || {
        farm_log().contains("boot kit stored").then_some(())
    })
    .await
    .context("the farm did not start")?;
    let cid = market.server.connection_named("vmlot-farm")?;
    let api = market.submitter("bench").await;
    let started = Instant::now();
    let a = build(&api, first).await?;
    println!("[pair] first built in {:.1} s", started.elapsed().as_secs_f64());
    let store = BlockStore::join(market.server.client().await?, Default::default(), None).await?;
    let mut stored: HashSet<BlockId> = HashSet::new();
    for m in [&a.kernel.manifest, &a.initrd.manifest, &a.disk.manifest] {
        stored.extend(blocks(&store, m).await?);
    }
    let before = market.server.connection_traffic(cid)?;
    let started = Instant::now();
    let b = build(&api, second).await?;
    let build_s = started.elapsed().as_secs_f64();
    let wire = (market.server.connection_traffic(cid)? - before).in_bytes;
    println!("[pair] second built in {build_s:.1} s");
    let disk: HashSet<BlockId> = blocks(&store, &b.disk.manifest).await?;
    let cold: Vec<&BlockId> = disk.iter().filter(|x| !stored.contains(x)).collect();
    if cold.len() as u64 != b.disk.sent_blocks {
        bail!(
            "the farm sent {} blocks, {} were cold",
            b.disk.sent_blocks,
            cold.len()
        );
    }
    let dir = tempfile::tempdir()?;
    let (fa, fb) = (dir.path().join("a.img"), dir.path().join("b.img"));
    pull_file(&store, None, &a.disk.manifest, &fa).await?;
    pull_file(&store, None, &b.disk.manifest, &fb).await?;
    let rsync = rsync_delta(&fa, &fb)?;
    Ok(Row {
        pair: name.into(),
        blocks: disk.len(),
        hot: disk.len() - cold.len(),
        cold_bytes: b.disk.sent_bytes,
        wire,
        build_s,
        rsync_total: rsync.total,
        rsync_literal: rsync.literal,
        rsync_s: rsync.seconds,
    })
}

async fn build(api: &vmlot_client::Api, recipe: &Recipe) -> Result<ImageRecord> {
    let built = api
        .build_image(recipe.clone(), |_| {}, std::time::Duration::from_secs(900))
        .await?;
    // Read back through the index, as a submitter would.
    Ok(api
        .call::<ImageShow>(&RecipeRef {
            recipe_id: built.image.recipe_id,
        })
        .await?)
}

async fn blocks(store: &BlockStore, id: &ManifestId) -> Result<HashSet<BlockId>> {
    Ok(store
        .get_manifest(id)
        .await?
        .unique_blocks()
        .into_iter()
        .map(|(b, _)| b)
        .collect())
}
