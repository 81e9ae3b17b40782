//! A segment's Xen domain on paper: the `xl` domain config written from
//! the lot (PV by default, PVH as a setting; disks through `disk=`; every
//! `on_*` event `preserve`, so a powered-off or crashed domain stays to be
//! read), and the check of a checkpoint's embedded config against the lot
//! before it is restored. Values are refused rather than escaped when they
//! cannot be written into an xl config.

use std::fmt::Write as _;
use std::path::Path;
use std::str::FromStr;

use vmlot_cas::SavedConfig;
use vmlot_schemas::VmConfig;

use crate::driver::api::{BootFiles, DriverError};

/// The `xl` domain config of the segment, in its workdir.
pub const CONFIG_FILE: &str = "domain.cfg";
/// xvda … xvdz.
const MAX_DISKS: usize = 26;

/// Which kind of Xen guest a domain is. Checkpoints only restore into the
/// same kind, so providers of one market should agree on it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GuestType {
    /// Paravirtualized: no hardware virtualization needed, so it works in
    /// a Xen nested under TCG. The kernel must be a Xen PV kernel (its
    /// console is `hvc0`).
    #[default]
    Pv,
    /// PVH: a PV-aware kernel in an HVM container. Needs VT-x/AMD-V in the
    /// machine Xen runs on; domains get `tsc_mode="native"`, which nested
    /// TCG needs.
    Pvh,
}

impl GuestType {
    /// The word `xl` and libxl use: `pv` or `pvh`.
    pub fn as_str(self) -> &'static str {
        match self {
            GuestType::Pv => "pv",
            GuestType::Pvh => "pvh",
        }
    }
}

impl FromStr for GuestType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pv" => Ok(GuestType::Pv),
            "pvh" => Ok(GuestType::Pvh),
            other => Err(format!("unknown Xen guest type {other:?} (pv, pvh)")),
        }
    }
}

/// The xl domain config of one segment. `files` must be absolute paths.
///
/// Every string is written between quotes that xl's config parser ends at
/// the next quote, so a value holding a quote, a backslash or a line break
/// is refused ([`DriverError::BadImage`]) rather than escaped.
pub(crate) fn domain_config(
    name: &str,
    vm: &VmConfig,
    files: &BootFiles,
    guest: GuestType,
) -> Result<String, DriverError> {
    if files.disks.len() > MAX_DISKS {
        return Err(DriverError::BadImage(format!(
            "{} disks; at most {MAX_DISKS} (xvda…xvdz)",
            files.disks.len()
        )));
    }
    let mut cfg = String::new();
    let _ = writeln!(cfg, "# One segment of a vmlot job; written by the provider.");
    let _ = writeln!(cfg, "name = \"{}\"", config_str("domain name", name)?);
    let _ = writeln!(cfg, "type = \"{}\"", guest.as_str());
    let _ = writeln!(cfg, "memory = {}", vm.memory_mib);
    let _ = writeln!(cfg, "vcpus = {}", vm.vcpus);
    let _ = writeln!(cfg, "kernel = \"{}\"", config_path("kernel", &files.kernel)?);
    if let Some(initrd) = &files.initrd {
        let _ = writeln!(cfg, "ramdisk = \"{}\"", config_path("initrd", initrd)?);
    }
    let _ = writeln!(
        cfg,
        "cmdline = \"{}\"",
        config_str("kernel command line", &vm.cmdline)?
    );
    if guest == GuestType::Pvh {
        // The TSC as the CPU has it: under nested TCG Xen's emulated TSC
        // modes misbehave.
        let _ = writeln!(cfg, "tsc_mode = \"native\"");
    }
    let mut disks = Vec::new();
    for (i, disk) in files.disks.iter().enumerate() {
        let target = config_path("disk", disk)?;
        // target= comes last: xl takes the rest of the spec literally, commas
        // included.
        disks.push(format!(
            "'format=raw, vdev=xvd{}, access=rw, target={target}'",
            char::from(b'a' + i as u8)
        ));
    }
    if disks.is_empty() {
        let _ = writeln!(cfg, "disk = [ ]");
    } else {
        let _ = writeln!(cfg, "disk = [ {} ]", disks.join(", "));
    }
    let _ = writeln!(cfg, "vif = [ ]");
    // Keep a shut-down domain, so its state says how it ended.
    for event in ["on_poweroff", "on_reboot", "on_crash", "on_watchdog"] {
        let _ = writeln!(cfg, "{event} = \"preserve\"");
    }
    Ok(cfg)
}

pub(crate) fn config_str<'a>(what: &str, value: &'a str) -> Result<&'a str, DriverError> {
    match value
        .chars()
        .find(|c| matches!(c, '"' | '\'' | '\\' | '\n' | '\r' | '\0'))
    {
        Some(c) => Err(DriverError::BadImage(format!(
            "{what} {value:?} holds {c:?}, which cannot be written into an xl config"
        ))),
        None => Ok(value),
    }
}

fn config_path<'a>(what: &str, path: &'a Path) -> Result<&'a str, DriverError> {
    let s = path
        .to_str()
        .ok_or_else(|| DriverError::BadImage(format!("{what} path {} is not UTF-8", path.display())))?;
    if !path.is_absolute() {
        return Err(DriverError::BadImage(format!("{what} path {s} is not absolute")));
    }
    config_str(&format!("{what} path"), s)
}

/// The boot files as absolute paths without symlinks, as `xl` (running
/// elsewhere) must see them.
pub(crate) fn absolute_files(files: &BootFiles) -> Result<BootFiles, DriverError> {
    let resolve = |what: &str, p: &Path| {
        std::fs::canonicalize(p).map_err(|e| DriverError::BadImage(format!("{what} {}: {e}", p.display())))
    };
    Ok(BootFiles {
        kernel: resolve("kernel", &files.kernel)?,
        initrd: files
            .initrd
            .as_deref()
            .map(|p| resolve("initrd", p))
            .transpose()?,
        disks: files
            .disks
            .iter()
            .map(|p| resolve("disk", p))
            .collect::<Result<_, _>>()?,
        memory: None,
    })
}

/// What the xl save file at `path` says of its domain (the header is read
/// by [`vmlot_cas::read_saved_config`], the one parser of it). The error
/// names the file and what is wrong with it.
pub(crate) async fn read_saved_config(path: &Path) -> Result<SavedConfig, String> {
    let file = path.to_path_buf();
    let read = tokio::task::spawn_blocking(move || {
        let f = std::fs::File::open(&file)?;
        vmlot_cas::read_saved_config(std::io::BufReader::new(f))
    })
    .await;
    match read {
        Ok(Ok(saved)) => Ok(saved),
        Ok(Err(e)) => Err(format!("{}: {e}", path.display())),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Refuses a save file whose domain is not the lot's: another guest type,
/// memory size or vCPU count would not restore into the domain we build
/// (or would restore into a different machine than the lot paid for).
pub(crate) fn check_saved_config(
    saved: &SavedConfig,
    vm: &VmConfig,
    guest: GuestType,
) -> Result<(), DriverError> {
    let mismatch = |field: &str, saved: String, lot: String| {
        DriverError::Restore(format!(
            "checkpoint does not match the lot: {field} is {saved} in the save file, {lot} in the lot"
        ))
    };
    match saved.guest_type.as_deref() {
        Some(t) if t == guest.as_str() => {}
        Some(t) => {
            return Err(mismatch(
                "type",
                t.to_string(),
                format!("{} (this provider's guest type)", guest.as_str()),
            ));
        }
        None => return Err(DriverError::Restore("save file config has no domain type".into())),
    }
    let memkb = saved.max_memkb.or(saved.target_memkb).ok_or_else(|| {
        DriverError::Restore("save file config has no memory size (b_info.max_memkb)".into())
    })?;
    if memkb != u64::from(vm.memory_mib) * 1024 {
        return Err(mismatch(
            "memory",
            format!("{} MiB", memkb as f64 / 1024.0),
            format!("{} MiB", vm.memory_mib),
        ));
    }
    let vcpus = saved.max_vcpus.ok_or_else(|| {
        DriverError::Restore("save file config has no vCPU count (b_info.max_vcpus)".into())
    })?;
    if vcpus != u64::from(vm.vcpus) {
        return Err(mismatch("vcpus", vcpus.to_string(), vm.vcpus.to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use vmlot_cas::xensave::{XL_BYTEORDER, XL_FLAG_JSON, XL_FLAG_STREAM_V2, XL_MAGIC};
    use vmlot_schemas::HypervisorKind;

    use super::*;

    fn vm(memory_mib: u32, vcpus: u32, cmdline: &str) -> VmConfig {
        VmConfig {
            hypervisor: HypervisorKind::Xen,
            arch: "x86_64".into(),
            memory_mib,
            vcpus,
            cmdline: cmdline.into(),
        }
    }

    fn files(disks: &[&str]) -> BootFiles {
        BootFiles {
            kernel: "/img/vmlinuz".into(),
            initrd: Some("/img/initrd.cpio.gz".into()),
            disks: disks.iter().map(PathBuf::from).collect(),
            memory: None,
        }
    }

    fn bad_image(r: Result<String, DriverError>) -> String {
        match r {
            Err(DriverError::BadImage(why)) => why,
            other => panic!("expected BadImage, got {other:?}"),
        }
    }

    #[test]
    fn pv_config_has_everything_the_lot_says() {
        let cfg = domain_config(
            "vmlot-1-0-abcdef01",
            &vm(128, 2, "console=hvc0 quiet vmlot.steps=200"),
            &files(&["/work/d0.raw", "/work/with, comma=and space.raw"]),
            GuestType::Pv,
        )
        .expect("config");
        let expected = "\
# One segment of a vmlot job; written by the provider.
name = \"vmlot-1-0-abcdef01\"
type = \"pv\"
memory = 128
vcpus = 2
kernel = \"/img/vmlinuz\"
ramdisk = \"/img/initrd.cpio.gz\"
cmdline = \"console=hvc0 quiet vmlot.steps=200\"
disk = [ 'format=raw, vdev=xvda, access=rw, target=/work/d0.raw', \
'format=raw, vdev=xvdb, access=rw, target=/work/with, comma=and space.raw' ]
vif = [ ]
on_poweroff = \"preserve\"
on_reboot = \"preserve\"
on_crash = \"preserve\"
on_watchdog = \"preserve\"
";
        assert_eq!(cfg, expected);
        assert!(!cfg.contains("tsc_mode"));
    }

    #[test]
    fn pvh_config_sets_native_tsc_and_no_disks_is_an_empty_list() {
        let mut f = files(&[]);
        f.initrd = None;
        let cfg = domain_config("vmlot-x", &vm(256, 1, "console=hvc0"), &f, GuestType::Pvh).expect("config");
        assert!(cfg.contains("type = \"pvh\"\n"), "{cfg}");
        assert!(cfg.contains("tsc_mode = \"native\"\n"), "{cfg}");
        assert!(cfg.contains("disk = [ ]\n"), "{cfg}");
        assert!(!cfg.contains("ramdisk"), "{cfg}");
    }

    #[test]
    fn values_that_would_break_out_of_their_quotes_are_refused() {
        for cmdline in [
            "init=/bin/sh\" extra=\"1",
            "a'b",
            "line\nbreak",
            "cr\rhere",
            "back\\slash",
            "nul\0",
        ] {
            let why = bad_image(domain_config(
                "n",
                &vm(128, 1, cmdline),
                &files(&[]),
                GuestType::Pv,
            ));
            assert!(why.contains("kernel command line"), "{why}");
        }
        for disk in ["/w/it's.raw", "/w/a\"b.raw", "/w/new\nline.raw"] {
            let why = bad_image(domain_config(
                "n",
                &vm(128, 1, ""),
                &files(&[disk]),
                GuestType::Pv,
            ));
            assert!(why.contains("disk path"), "{why}");
        }
        let mut f = files(&[]);
        f.kernel = "relative/vmlinuz".into();
        let why = bad_image(domain_config("n", &vm(128, 1, ""), &f, GuestType::Pv));
        assert!(why.contains("not absolute"), "{why}");
        let many: Vec<String> = (0..27).map(|i| format!("/d/{i}.raw")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let why = bad_image(domain_config("n", &vm(128, 1, ""), &files(&many), GuestType::Pv));
        assert!(why.contains("at most 26"), "{why}");
    }

    #[test]
    fn guest_type_words() {
        assert_eq!("pv".parse::<GuestType>(), Ok(GuestType::Pv));
        assert_eq!("pvh".parse::<GuestType>(), Ok(GuestType::Pvh));
        assert!("hvm".parse::<GuestType>().is_err());
        assert_eq!(GuestType::default(), GuestType::Pv);
    }

    /// The start of an xl save file of a `kind` domain, as xl writes it.
    fn save_file(kind: &str, memkb: u64, vcpus: u64) -> Vec<u8> {
        let mut config = serde_json::to_vec(&serde_json::json!({
            "c_info": { "type": kind, "name": "vmlot-9-0-00000000" },
            "b_info": { "max_vcpus": vcpus, "max_memkb": memkb, "target_memkb": memkb },
        }))
        .unwrap();
        config.push(0);
        let mut optional = (config.len() as u32).to_ne_bytes().to_vec();
        optional.extend_from_slice(&config);
        let mut file = XL_MAGIC.to_vec();
        let flags = XL_FLAG_JSON | XL_FLAG_STREAM_V2;
        for word in [XL_BYTEORDER, flags, 0, optional.len() as u32] {
            file.extend_from_slice(&word.to_ne_bytes());
        }
        file.extend_from_slice(&optional);
        file
    }

    #[tokio::test]
    async fn saved_config_must_match_the_lot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("machine-state");
        let saved = |kind, memkb, vcpus| {
            std::fs::write(&path, save_file(kind, memkb, vcpus)).unwrap();
            let path = path.clone();
            async move { read_saved_config(&path).await.unwrap() }
        };
        let refused = |saved: SavedConfig, vm: VmConfig, guest| match check_saved_config(&saved, &vm, guest) {
            Err(DriverError::Restore(why)) => why,
            other => panic!("expected a refusal, got {other:?}"),
        };
        check_saved_config(&saved("pvh", 262144, 4).await, &vm(256, 4, ""), GuestType::Pvh).expect("match");

        let why = refused(saved("pv", 262144, 1).await, vm(128, 1, ""), GuestType::Pv);
        assert!(
            why.contains("memory is 256 MiB in the save file, 128 MiB in the lot"),
            "{why}"
        );
        let why = refused(saved("pv", 131072, 2).await, vm(128, 1, ""), GuestType::Pv);
        assert!(why.contains("vcpus is 2 in the save file, 1 in the lot"), "{why}");
        let why = refused(saved("pvh", 131072, 1).await, vm(128, 1, ""), GuestType::Pv);
        assert!(why.contains("type is pvh in the save file"), "{why}");
        let why = refused(saved("hvm", 131072, 1).await, vm(128, 1, ""), GuestType::Pvh);
        assert!(why.contains("type is hvm"), "{why}");

        // No type at all is refused, not guessed.
        let untyped = SavedConfig {
            guest_type: None,
            ..saved("pv", 131072, 1).await
        };
        let why = refused(untyped, vm(128, 1, ""), GuestType::Pv);
        assert!(why.contains("no domain type"), "{why}");

        // A file that is no xl save file is named with what is wrong.
        std::fs::write(&path, b"QEVM and the rest of a QEMU stream").unwrap();
        let why = read_saved_config(&path).await.unwrap_err();
        assert!(why.starts_with(&path.display().to_string()), "{why}");
        assert!(why.contains("not an xl save file"), "{why}");
        let why = read_saved_config(&dir.path().join("absent")).await.unwrap_err();
        assert!(why.contains("absent"), "{why}");
    }
}
