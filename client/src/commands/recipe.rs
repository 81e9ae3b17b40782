//! `vmlot image build`, `image ls`, `image show` and the recipe half of
//! `submit --recipe`: a recipe from a file or from flags, sent to OS Farm,
//! its build's progress on standard error, the image it answers.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use clap::{Args, ValueEnum};
use vmlot_client::api::{ImageList, ImageShow};
use vmlot_schemas::market::Image;
use vmlot_schemas::recipe::{Built, ImageFormat, ImageRecord, RECIPE_VERSION, Recipe, RecipeFile, RecipeRef};
use vmlot_schemas::{HypervisorKind, VmConfig};

use crate::context::Context;
use crate::output::{Align, Table, human_bytes, print_json};

/// The longest the farm may stay silent during a build.
const QUIET: Duration = Duration::from_secs(600);

#[derive(Clone, Copy, ValueEnum)]
pub enum FormatArg {
    Raw,
    Tar,
}

/// A recipe: a file, or the flags.
#[derive(Args)]
pub struct RecipeArgs {
    /// A recipe file (JSON, `schemas/json/recipe.json`); or give it by the flags below.
    pub recipe: Option<PathBuf>,
    #[arg(long, default_value = "debian", conflicts_with = "recipe")]
    pub distro: String,
    #[arg(long, default_value = "bookworm", conflicts_with = "recipe")]
    pub suite: String,
    /// Debian's architecture name.
    #[arg(long, default_value = "amd64", conflicts_with = "recipe")]
    pub architecture: String,
    /// Packages beside the minimal base, comma-separated.
    #[arg(long, value_delimiter = ',', conflicts_with = "recipe")]
    pub packages: Vec<String>,
    /// A file to add: GUEST_PATH=LOCAL_FILE (text).
    #[arg(
        long = "file",
        value_name = "GUEST_PATH=LOCAL_FILE",
        conflicts_with = "recipe"
    )]
    pub files: Vec<String>,
    /// Run at boot by /bin/sh, its output on the console; the guest powers off after it.
    #[arg(long, conflicts_with = "recipe")]
    pub command: Option<String>,
    #[arg(long, default_value_t = 512, conflicts_with = "recipe")]
    pub disk_mib: u32,
    #[arg(long, value_enum, default_value = "raw", conflicts_with = "recipe")]
    pub format: FormatArg,
}

impl RecipeArgs {
    /// The recipe these arguments describe.
    pub fn recipe(&self) -> Result<Recipe> {
        if let Some(path) = &self.recipe {
            return read_recipe(path);
        }
        let mut files = Vec::new();
        for spec in &self.files {
            let Some((guest, local)) = spec.split_once('=') else {
                bail!("--file {spec:?}: give GUEST_PATH=LOCAL_FILE");
            };
            let content = std::fs::read_to_string(local)
                .with_context(|| format!("reading {local} (text files only)"))?;
            files.push(RecipeFile {
                path: guest.to_string(),
                mode: 0o644,
                content,
            });
        }
        Ok(Recipe {
            version: RECIPE_VERSION,
            distribution: self.distro.clone(),
            suite: self.suite.clone(),
            architecture: self.architecture.clone(),
            packages: self.packages.clone(),
            files,
            command: self.command.clone(),
            disk_mib: self.disk_mib,
            format: match self.format {
                FormatArg::Raw => ImageFormat::Raw,
                FormatArg::Tar => ImageFormat::Tar,
            },
        })
    }
}

/// A recipe file, parsed (its rules are checked by [`build`] before the farm is asked).
pub fn read_recipe(path: &std::path::Path) -> Result<Recipe> {
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let recipe: Recipe =
        serde_json::from_slice(&text).with_context(|| format!("{} is not a recipe", path.display()))?;
    Ok(recipe)
}

/// Asks the farm for `recipe`'s image, progress on standard error.
pub async fn build(ctx: &Context, recipe: Recipe) -> Result<Built> {
    if let Err(e) = recipe.validate() {
        bail!("the recipe is refused: {e}");
    }
    let id = recipe.id();
    eprintln!("recipe {id}");
    let built = ctx
        .api()
        .await?
        .build_image(recipe, |p| eprintln!("[{}] {}", p.step, p.line), QUIET)
        .await?;
    if built.built {
        eprintln!(
            "built in {:.1} s; the disk sent {} of its {} blocks ({})",
            built.image.build_millis as f64 / 1000.0,
            built.image.disk.sent_blocks,
            built.image.disk.unique_blocks,
            human_bytes(built.image.disk.sent_bytes)
        );
    } else {
        eprintln!(
            "built before ({}): answered at once",
            built.image.built_at.format("%Y-%m-%d %H:%M:%S UTC")
        );
    }
    Ok(built)
}

/// `vmlot image build`.
pub async fn build_command(ctx: &Context, args: &RecipeArgs) -> Result<()> {
    let built = build(ctx, args.recipe()?).await?;
    if ctx.json {
        return print_json(&built);
    }
    show_record(&built.image);
    Ok(())
}

/// `vmlot image ls`.
pub async fn list(ctx: &Context) -> Result<()> {
    let images = ctx.api().await?.call::<ImageList>(&()).await?;
    if ctx.json {
        return print_json(&images);
    }
    let mut table = Table::new(&[
        ("RECIPE", Align::Left),
        ("SUITE", Align::Left),
        ("PACKAGES", Align::Left),
        ("DISK", Align::Right),
        ("STORED", Align::Right),
        ("BUILT", Align::Left),
    ]);
    for i in &images {
        table.row([
            i.recipe_id.to_hex()[..16].to_string(),
            format!("{} {}", i.recipe.distribution, i.recipe.suite),
            i.recipe.packages.join(","),
            human_bytes(i.disk.size),
            human_bytes(i.disk.unique_blocks * 4096),
            i.built_at.format("%Y-%m-%d %H:%M").to_string(),
        ]);
    }
    table.print();
    Ok(())
}

/// `vmlot image show ID`.
pub async fn show(ctx: &Context, id: &str) -> Result<()> {
    let recipe_id = id.parse()?;
    let image = ctx
        .api()
        .await?
        .call::<ImageShow>(&RecipeRef { recipe_id })
        .await?;
    if ctx.json {
        return print_json(&image);
    }
    show_record(&image);
    Ok(())
}

fn show_record(i: &ImageRecord) {
    println!("recipe     {}", i.recipe_id);
    println!(
        "system     {} {} {}",
        i.recipe.distribution, i.recipe.suite, i.recipe.architecture
    );
    println!("packages   {}", i.recipe.packages.join(" "));
    println!("command    {}", i.recipe.command.as_deref().unwrap_or("-"));
    println!("kernel     {}", i.kernel.manifest);
    println!("initrd     {}", i.initrd.manifest);
    println!(
        "disk       {} ({}, {} blocks)",
        i.disk.manifest,
        human_bytes(i.disk.size),
        i.disk.unique_blocks
    );
    if let Some(export) = &i.export {
        println!(
            "export     {} (tar, {})",
            export.manifest,
            human_bytes(export.size)
        );
    }
    println!("cmdline    {}", i.cmdline);
    println!("installed  {} packages", i.installed.len());
    println!(
        "built      {} in {:.1} s",
        i.built_at.format("%Y-%m-%d %H:%M:%S UTC"),
        i.build_millis as f64 / 1000.0
    );
}

/// The image a job boots: the farm's kernel, initrd and disk, on QEMU.
pub fn image_of(record: &ImageRecord, memory_mib: u32, vcpus: u32) -> Image {
    Image {
        vm: VmConfig {
            hypervisor: HypervisorKind::Qemu,
            arch: "x86_64".into(),
            memory_mib,
            vcpus,
            cmdline: record.cmdline.clone(),
        },
        kernel: record.kernel.manifest,
        initrd: Some(record.initrd.manifest),
        disks: vec![record.disk.manifest],
    }
}
