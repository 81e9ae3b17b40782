//! One recipe made into files: `mmdebstrap` bootstraps the root file
//! system from Debian's archive (the farm's apt cache kept between builds,
//! so a second recipe on the same base downloads only its own packages),
//! the recipe's files and the boot script go in, `mkfs.ext4 -d` makes the
//! disk image from the directory, and with format `tar` the directory is
//! also written as a tar. The command lines and the boot script are pure
//! functions, unit-tested; running them is the edge.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use vmlot_schemas::recipe::{ImageFormat, Recipe, RecipeId};

use crate::error::BuildError;

/// Where the farm's boot script is put in every image, and what the
/// initrd hands the machine to.
pub const INIT_PATH: &str = "/sbin/vmlot-init";
/// The recipe's command, as a file the boot script runs (no quoting).
pub const COMMAND_PATH: &str = "/etc/vmlot/command";
/// Printed on the console once the image's own init has started.
pub const READY_LINE: &str = "vmlot-image: ready";
/// Printed on the console with the command's exit status.
pub const EXIT_LINE: &str = "vmlot-image: command exited";

/// What a build made, in its scratch directory.
#[derive(Debug)]
pub struct Made {
    pub disk: PathBuf,
    pub export: Option<PathBuf>,
    /// `name=version` of every package installed, sorted.
    pub installed: Vec<String>,
}

/// How the farm runs a build.
#[derive(Clone, Debug)]
pub struct Builder {
    /// The Debian mirror, e.g. `http://deb.debian.org/debian`.
    pub mirror: String,
    /// Downloaded packages kept between builds.
    pub apt_cache: PathBuf,
}

/// A step's progress line.
pub type Progress<'a> = &'a (dyn Fn(&str, &str) + Send + Sync);

impl Builder {
    /// Builds `recipe` in `scratch` (which it owns and the caller removes).
    pub async fn build(
        &self,
        recipe: &Recipe,
        id: &RecipeId,
        scratch: &Path,
        progress: Progress<'_>,
    ) -> Result<Made, BuildError> {
        let root = scratch.join("root");
        std::fs::create_dir_all(&self.apt_cache)
            .map_err(|e| BuildError::io("apt cache", &self.apt_cache, e))?;
        progress(
            "bootstrap",
            &format!(
                "mmdebstrap {} {} ({} packages asked for)",
                recipe.suite,
                recipe.architecture,
                recipe.packages.len()
            ),
        );
        run(
            "bootstrap",
            Command::new("mmdebstrap").args(mmdebstrap_args(recipe, &self.mirror, &self.apt_cache, &root)),
            progress,
        )
        .await?;

        progress("files", &format!("{} files, the boot script", recipe.files.len()));
        write_files(recipe, id, &root)?;
        let installed = installed(&root).await?;

        let disk = scratch.join("disk.img");
        progress("disk", &format!("mkfs.ext4 -d, {} MiB", recipe.disk_mib));
        let mut mkfs = Command::new("mkfs.ext4");
        mkfs.args(mkfs_args(recipe, id, &root, &disk))
            .env("E2FSPROGS_FAKE_TIME", "1");
        run("disk", &mut mkfs, progress).await?;

        let export = if recipe.format == ImageFormat::Tar {
            let tar = scratch.join("root.tar");
            progress("export", "tar of the root file system");
            run(
                "export",
                Command::new("tar").args(tar_args(&root, &tar)),
                progress,
            )
            .await?;
            Some(tar)
        } else {
            None
        };
        Ok(Made {
            disk,
            export,
            installed,
        })
    }
}

/// `mmdebstrap`'s arguments: the minimal base and the recipe's packages,
/// into a directory, the farm's apt cache synced in before and out after
/// (and the packages left out of the image).
pub fn mmdebstrap_args(recipe: &Recipe, mirror: &str, cache: &Path, root: &Path) -> Vec<String> {
    let cache = shell_quote(&cache.display().to_string());
    let mut args = vec![
        "--variant=minbase".to_string(),
        "--mode=root".into(),
        "--format=directory".into(),
        format!("--architectures={}", recipe.architecture),
        "--aptopt=Acquire::Retries \"3\"".into(),
        "--skip=download/empty".into(),
        "--skip=essential/unlink".into(),
        "--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/".into(),
        format!("--setup-hook=sync-in {cache} /var/cache/apt/archives/"),
        format!("--customize-hook=sync-out /var/cache/apt/archives {cache}"),
        "--customize-hook=rm -f \"$1\"/var/cache/apt/archives/*.deb".into(),
    ];
    let recipe = recipe.canonical();
    if !recipe.packages.is_empty() {
        args.push(format!("--include={}", recipe.packages.join(",")));
    }
    args.push(recipe.suite.clone());
    args.push(root.display().to_string());
    args.push(mirror.to_string());
    args
}

/// `mkfs.ext4`'s arguments: the directory as the file system, with its
/// uuid and directory-hash seed taken from the recipe's id, so one recipe
/// built twice lays out alike (and `E2FSPROGS_FAKE_TIME` fixes the times).
pub fn mkfs_args(recipe: &Recipe, id: &RecipeId, root: &Path, disk: &Path) -> Vec<String> {
    let uuid = uuid::Uuid::from_slice(&id.0.as_bytes()[..16]).expect("16 bytes make a uuid");
    vec![
        "-q".into(),
        "-F".into(),
        "-t".into(),
        "ext4".into(),
        "-b".into(),
        "4096".into(),
        "-m".into(),
        "0".into(),
        "-L".into(),
        "vmlot-root".into(),
        "-U".into(),
        uuid.to_string(),
        "-E".into(),
        format!("hash_seed={uuid},root_owner=0:0"),
        "-d".into(),
        root.display().to_string(),
        disk.display().to_string(),
        format!("{}M", recipe.disk_mib),
    ]
}

/// `tar`'s arguments: the root file system, sorted, numeric owners.
pub fn tar_args(root: &Path, tar: &Path) -> Vec<String> {
    vec![
        "--sort=name".into(),
        "--numeric-owner".into(),
        "-C".into(),
        root.display().to_string(),
        "-cf".into(),
        tar.display().to_string(),
        ".".into(),
    ]
}

/// What the boot script does once it asked for the poweroff: the kernel
/// powers off in its own time, shutting the disk's driver down first, so
/// the script waits with shell builtins alone. (It ran `sleep 60` until a
/// loaded run caught `sleep` being read from a disk already shut down:
/// the script died, init with it, and the guest hung in a panic.)
pub const WAIT_FOR_POWEROFF: &str = "while :; do :; done";

/// The boot script the initrd hands the machine to: kernel file systems,
/// the recipe's command with its output on the console, its exit status,
/// then power off (the job ends with the guest).
pub fn init_script(id: &RecipeId, has_command: bool) -> String {
    let command = if has_command {
        format!("/bin/sh {COMMAND_PATH} </dev/null >/dev/console 2>&1\nstatus=$?\n")
    } else {
        "status=0\n".to_string()
    };
    format!(
        "#!/bin/sh\n\
         # Written by vmlot's OS Farm for recipe {id}: runs the recipe's command and powers off.\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sysfs /sys\n\
         mount -t devtmpfs devtmpfs /dev 2>/dev/null\n\
         mount -t tmpfs tmpfs /run\n\
         mount -t tmpfs tmpfs /tmp\n\
         export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8\n\
         cd /root 2>/dev/null || cd /\n\
         echo \"{READY_LINE} {id}\" >/dev/console\n\
         {command}\
         echo \"{EXIT_LINE} $status\" >/dev/console\n\
         sync\n\
         echo o > /proc/sysrq-trigger\n\
         {WAIT_FOR_POWEROFF}\n"
    )
}

/// The recipe's files, its command and the boot script, into `root`.
fn write_files(recipe: &Recipe, id: &RecipeId, root: &Path) -> Result<(), BuildError> {
    use std::os::unix::fs::PermissionsExt;
    let put = |path: &str, content: &[u8], mode: u32| -> Result<(), BuildError> {
        // Validated: absolute, normal, no `..`; strip the leading `/`.
        let dest = root.join(path.trim_start_matches('/'));
        // A directory on the way that is a link could lead out of the root.
        let parent_is_link = Path::new(path).ancestors().skip(1).any(|a| {
            let p = root.join(a.to_string_lossy().trim_start_matches('/'));
            a != Path::new("/")
                && p.symlink_metadata().is_ok_and(|m| m.file_type().is_symlink())
                && !usr_merged(a, &p)
        });
        if parent_is_link {
            return Err(BuildError::Recipe(format!(
                "file {path}: a directory on its path is a symbolic link in the image"
            )));
        }
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(|e| BuildError::io("make directory", parent, e))?;
        }
        // A package may have left a symlink where a file goes: never
        // write through it (it could point out of the root).
        if dest.symlink_metadata().is_ok_and(|m| m.file_type().is_symlink()) {
            std::fs::remove_file(&dest).map_err(|e| BuildError::io("replace symlink", &dest, e))?;
        }
        std::fs::write(&dest, content).map_err(|e| BuildError::io("write", &dest, e))?;
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(mode))
            .map_err(|e| BuildError::io("chmod", &dest, e))
    };
    for f in &recipe.files {
        put(&f.path, f.content.as_bytes(), f.mode)?;
    }
    if let Some(command) = &recipe.command {
        put(COMMAND_PATH, command.as_bytes(), 0o644)?;
    }
    put(
        INIT_PATH,
        init_script(id, recipe.command.is_some()).as_bytes(),
        0o755,
    )
}

/// Debian's merged-/usr links (`/bin` → `usr/bin` and its kin, relative)
/// stay inside the root: writing through them is fine.
fn usr_merged(dir: &Path, link: &Path) -> bool {
    let top = ["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"]
        .iter()
        .any(|d| dir == Path::new(d));
    top && std::fs::read_link(link).is_ok_and(|t| {
        t.is_relative()
            && t.starts_with("usr")
            && !t.components().any(|c| c == std::path::Component::ParentDir)
    })
}

/// Every package installed in `root`, `name=version`, sorted.
async fn installed(root: &Path) -> Result<Vec<String>, BuildError> {
    let out = Command::new("dpkg-query")
        .arg(format!("--admindir={}", root.join("var/lib/dpkg").display()))
        .args(["-W", "-f", "${Package}=${Version}\\n"])
        .output()
        .await
        .map_err(|e| BuildError::Spawn {
            program: "dpkg-query".into(),
            error: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(BuildError::Step {
            step: "files",
            status: out.status.to_string(),
            tail: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    v.sort();
    Ok(v)
}

/// Runs one step, each line it prints sent as progress; fails with the
/// last lines.
async fn run(step: &'static str, cmd: &mut Command, progress: Progress<'_>) -> Result<(), BuildError> {
    let program = cmd.as_std().get_program().to_string_lossy().into_owned();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| BuildError::Spawn {
            program: program.clone(),
            error: e.to_string(),
        })?;
    let out = BufReader::new(child.stdout.take().expect("piped")).lines();
    let err = BufReader::new(child.stderr.take().expect("piped")).lines();
    let mut lines = futures::stream::select(tokio_stream_lines(out), tokio_stream_lines(err));
    let mut tail: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    use futures::StreamExt;
    while let Some(line) = lines.next().await {
        progress(step, &line);
        tail.push_back(line);
        if tail.len() > 20 {
            tail.pop_front();
        }
    }
    let status = child.wait().await.map_err(|e| BuildError::Spawn {
        program,
        error: e.to_string(),
    })?;
    if !status.success() {
        return Err(BuildError::Step {
            step,
            status: status.to_string(),
            tail: Vec::from(tail).join("\n"),
        });
    }
    Ok(())
}

fn tokio_stream_lines<R: tokio::io::AsyncBufRead + Unpin + Send + 'static>(
    lines: tokio::io::Lines<R>,
) -> futures::stream::BoxStream<'static, String> {
    use futures::StreamExt;
    futures::stream::unfold(lines, |mut l| async move {
        match l.next_line().await {
            Ok(Some(line)) => Some((line, l)),
            _ => None,
        }
    })
    .boxed()
}

/// Single-quotes `s` for the shell mmdebstrap runs hooks in.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmlot_schemas::recipe::RecipeFile;

    /// A recipe as a user writes one.
    fn recipe() -> Recipe {
        serde_json::from_str(
            r#"{"version": 1, "distribution": "debian", "suite": "bookworm", "architecture": "amd64",
                "packages": ["hello", "bc"], "command": "hello", "disk_mib": 256,
                "files": [{"path": "/etc/motd", "content": "hi\n"}]}"#,
        )
        .expect("a recipe")
    }

    #[test]
    fn mmdebstrap_gets_the_base_the_packages_sorted_and_the_cache() {
        let args = mmdebstrap_args(
            &recipe(),
            "http://deb.debian.org/debian",
            Path::new("/c/it's"),
            Path::new("/s/root"),
        );
        assert!(args.contains(&"--variant=minbase".to_string()));
        assert!(args.contains(&"--include=bc,hello".to_string()));
        assert!(args.contains(&"--architectures=amd64".to_string()));
        assert!(
            args.contains(&r"--setup-hook=sync-in '/c/it'\''s' /var/cache/apt/archives/".to_string()),
            "{args:?}"
        );
        assert_eq!(
            &args[args.len() - 3..],
            ["bookworm", "/s/root", "http://deb.debian.org/debian"]
        );
        let mut bare = recipe();
        bare.packages.clear();
        assert!(
            !mmdebstrap_args(&bare, "m", Path::new("/c"), Path::new("/r"))
                .iter()
                .any(|a| a.starts_with("--include"))
        );
    }

    #[test]
    fn mkfs_lays_out_one_recipe_alike() {
        let r = recipe();
        let a = mkfs_args(&r, &r.id(), Path::new("/r"), Path::new("/d"));
        assert_eq!(a, mkfs_args(&r, &r.id(), Path::new("/r"), Path::new("/d")));
        let mut other = r.clone();
        other.command = None;
        assert_ne!(
            a,
            mkfs_args(&other, &other.id(), Path::new("/r"), Path::new("/d"))
        );
        assert_eq!(a.last().unwrap(), "256M");
    }

    #[test]
    fn the_boot_script_runs_the_command_then_powers_off() {
        let id = recipe().id();
        let s = init_script(&id, true);
        assert!(s.starts_with("#!/bin/sh\n"));
        let run = s.find(COMMAND_PATH).unwrap();
        let off = s.find("echo o > /proc/sysrq-trigger").unwrap();
        assert!(
            s.find(READY_LINE).unwrap() < run
                && run < s.find(EXIT_LINE).unwrap()
                && s.find(EXIT_LINE).unwrap() < off
        );
        assert!(s.contains(&id.to_hex()));
        assert!(!init_script(&id, false).contains(COMMAND_PATH));
        // Nothing after the poweroff request reads the disk.
        assert_eq!(s[off..].lines().nth(1), Some(WAIT_FOR_POWEROFF));
        assert_eq!(s[off..].lines().count(), 2);
    }

    #[test]
    fn files_go_in_and_never_through_a_link_out_of_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("usr/bin")).unwrap();
        std::os::unix::fs::symlink("usr/bin", root.join("bin")).unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("opt")).unwrap();
        let mut r = recipe();
        r.files.push(RecipeFile {
            path: "/bin/tool".into(),
            mode: 0o755,
            content: "#!/bin/sh\n".into(),
        });
        write_files(&r, &r.id(), &root).unwrap();
        assert_eq!(std::fs::read_to_string(root.join("etc/motd")).unwrap(), "hi\n");
        assert!(root.join("usr/bin/tool").exists(), "through the merged-/usr link");
        assert_eq!(
            std::fs::read_to_string(root.join("etc/vmlot/command")).unwrap(),
            "hello"
        );
        assert!(
            std::fs::read_to_string(root.join("sbin/vmlot-init"))
                .unwrap()
                .contains(READY_LINE)
        );
        r.files.push(RecipeFile {
            path: "/opt/x".into(),
            mode: 0o644,
            content: "x".into(),
        });
        let err = write_files(&r, &r.id(), &root).unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert!(!outside.join("x").exists());
    }
}
