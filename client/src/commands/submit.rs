//! `vmlot submit`: the image (pushed now, or described by `image push`),
//! the job's terms, and the broker's answer; `--watch` follows the job.

use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use clap::Args;
use rust_decimal::Decimal;
use vmlot_schemas::Money;
use vmlot_schemas::market::{JobSpec, ResultCheck, SegmentCount};

use crate::commands::image::{ImageArgs, push_image};
use crate::commands::{recipe, watch};
use crate::context::Context;
use crate::output::print_json_line;

/// `vmlot submit`.
#[derive(Args)]
pub struct SubmitArgs {
    /// An image description written by `vmlot image push -o`; or give the files below.
    #[arg(long, conflicts_with = "recipe")]
    pub image: Option<PathBuf>,
    /// A recipe file: OS Farm builds its image (or answers the one built
    /// before), and the job boots it on QEMU with --memory and --vcpus.
    #[arg(long)]
    pub recipe: Option<PathBuf>,
    #[command(flatten)]
    pub files: ImageArgs,
    /// Segment length T in seconds.
    #[arg(long)]
    pub segment_seconds: u32,
    /// Number of segments; omit with --until-halt.
    #[arg(long, conflicts_with = "until_halt")]
    pub segments: Option<u32>,
    #[arg(long)]
    pub until_halt: bool,
    #[arg(long, default_value_t = 1)]
    pub redundancy: u32,
    /// How results are checked before their providers are paid:
    /// `continuation` (paid once another provider restored the state;
    /// the last one by a short check restore after the job's segments) or
    /// `none` (paid at settlement on the result's own checks) or `quorum`
    /// (r ≥ 2 replicas of a deterministic guest; paid when two agree).
    #[arg(long, default_value = "continuation", value_parser = parse_check)]
    pub check: ResultCheck,
    /// Most paid for one segment.
    #[arg(long)]
    pub reserve: Decimal,
    /// Most paid in all.
    #[arg(long)]
    pub budget: Decimal,
    #[arg(long, default_value = "CRD")]
    pub unit: String,
    /// Follow the job to its end, like `vmlot watch`.
    #[arg(long)]
    pub watch: bool,
}

pub async fn submit(ctx: &Context, args: &SubmitArgs) -> Result<()> {
    let image = match (&args.image, &args.recipe) {
        (Some(path), _) => {
            serde_json::from_slice(&std::fs::read(path)?).context("reading the image description")?
        }
        (None, Some(path)) => {
            let built = recipe::build(ctx, recipe::read_recipe(path)?).await?;
            recipe::image_of(&built.image, args.files.memory, args.files.vcpus)
        }
        (None, None) => push_image(ctx, &args.files).await?,
    };
    let segments = match (args.segments, args.until_halt) {
        (Some(n), false) => SegmentCount::Count(n),
        (None, true) => SegmentCount::UntilHalt,
        _ => bail!("give --segments N or --until-halt"),
    };
    let spec = JobSpec {
        image,
        segment_seconds: args.segment_seconds,
        segments,
        redundancy: args.redundancy,
        check: args.check,
        reserve_price: Money::new(args.reserve, args.unit.clone()),
        budget: Money::new(args.budget, args.unit.clone()),
        // The broker charges the caller, whoever its credentials say.
        account: String::new(),
    };
    let submitted = ctx.api().await?.submit(spec).await?;
    if ctx.json && !args.watch {
        print_json_line(&submitted)?;
    } else if !ctx.json {
        println!("job {}", submitted.job);
    }
    if args.watch {
        watch::watch(ctx, submitted.job).await?;
    }
    Ok(())
}

fn parse_check(s: &str) -> Result<ResultCheck, String> {
    match s {
        "none" => Ok(ResultCheck::None),
        "continuation" => Ok(ResultCheck::Continuation),
        "quorum" => Ok(ResultCheck::Quorum),
        _ => Err(format!("unknown check {s:?}: none, continuation or quorum")),
    }
}
