//! The Xen driver on a machine that is not a Xen dom0 (these tests run on
//! the plain build host): everything it must refuse before, or instead of,
//! starting a domain. Real domains are run on the nested Xen hosts of
//! scripts/xen-host.sh, where the market tests drive this driver.
//!
//! Nothing is mocked: the toolstack check runs Debian's real `xl` when one
//! is at hand (unpacked from the packages scripts/xen-host.sh caches in
//! .tools/xen/debs), and otherwise shows that a missing `xl` is named as
//! such.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use vmlot_cas::xensave::XL_MAGIC;
use vmlot_provider::driver::xen::{self, GuestType, XenConfig, XenDriver};
use vmlot_provider::driver::{BootFiles, Driver, DriverError, SegmentPlan, SegmentStart};
use vmlot_schemas::{HypervisorKind, VmConfig};

/// A kernel, initrd and disk that exist (their content does not matter:
/// nothing here boots them).
fn image(dir: &Path) -> BootFiles {
    let kernel = dir.join("vmlinuz");
    let initrd = dir.join("initrd.cpio.gz");
    let disk = dir.join("disk.raw");
    for f in [&kernel, &initrd, &disk] {
        std::fs::write(f, b"not really an image").expect("write image file");
    }
    BootFiles {
        kernel,
        initrd: Some(initrd),
        disks: vec![disk],
        memory: None,
    }
}

fn plan(files: &BootFiles, start: SegmentStart, workdir: &Path) -> SegmentPlan {
    SegmentPlan {
        vm: VmConfig {
            hypervisor: HypervisorKind::Xen,
            arch: "x86_64".into(),
            memory_mib: 128,
            vcpus: 1,
            cmdline: "console=hvc0 quiet".into(),
        },
        files: files.clone(),
        start,
        run_for: Duration::from_secs(2),
        instructions: None,
        workdir: workdir.to_path_buf(),
        owner: None,
    }
}

fn driver(binary: Option<PathBuf>) -> XenDriver {
    XenDriver::new(XenConfig {
        binary,
        guest_type: GuestType::Pv,
        console_dir: xen::DEFAULT_CONSOLE_DIR.into(),
    })
}

async fn run(driver: &XenDriver, plan: &SegmentPlan) -> DriverError {
    match driver.run_segment(plan, CancellationToken::new()).await {
        Ok(report) => panic!("a segment ran on a machine without Xen: {:?}", report.end),
        Err(e) => e,
    }
}

/// An xl save file prefix as xl 4.17 writes it (x86: little-endian).
fn xl_save_file(config_json: &str) -> Vec<u8> {
    let mut config = config_json.as_bytes().to_vec();
    config.push(0);
    let mut optional = (config.len() as u32).to_le_bytes().to_vec();
    optional.extend_from_slice(&config);
    let mut file = XL_MAGIC.to_vec();
    // byteorder, mandatory flags (JSON | STREAMv2), optional flags, length.
    for word in [0x0102_0304u32, 3, 0, optional.len() as u32] {
        file.extend_from_slice(&word.to_le_bytes());
    }
    file.extend_from_slice(&optional);
    // The libxl migration stream v2 follows (its header: "LibxlFmt", version 2).
    file.extend_from_slice(b"LibxlFmt\0\0\0\x02\0\0\0\0");
    file
}

#[tokio::test]
async fn missing_xl_is_named_with_its_package() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = image(dir.path());
    let plan = plan(&files, SegmentStart::Boot, &dir.path().join("work"));
    for binary in [
        dir.path().join("no/such/xl"),
        PathBuf::from("vmlot-no-such-xl-on-path"),
    ] {
        match run(&driver(Some(binary.clone())), &plan).await {
            DriverError::MissingBinary { binary: b, package } => {
                assert_eq!(b, binary.display().to_string());
                assert_eq!(package, "xen-utils-4.17");
            }
            other => panic!("expected MissingBinary for {}, got {other}", binary.display()),
        }
    }
    // Nothing was started, so nothing was written.
    assert!(!dir.path().join("work").exists());
}

#[tokio::test]
async fn lots_for_other_hypervisors_and_bad_images_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = image(dir.path());
    let work = dir.path().join("work");
    let d = driver(Some(dir.path().join("no/such/xl")));

    let mut p = plan(&files, SegmentStart::Boot, &work);
    p.vm.hypervisor = HypervisorKind::Qemu;
    assert!(matches!(
        run(&d, &p).await,
        DriverError::WrongHypervisor {
            expected: HypervisorKind::Xen,
            actual: HypervisorKind::Qemu
        }
    ));

    // A command line that would end its quoted string in the xl config.
    let mut p = plan(&files, SegmentStart::Boot, &work);
    p.vm.cmdline = "console=hvc0\"\nkernel = \"/etc/shadow".into();
    match run(&d, &p).await {
        DriverError::BadImage(why) => assert!(why.contains("kernel command line"), "{why}"),
        other => panic!("expected BadImage, got {other}"),
    }

    // A disk whose name holds a quote.
    let quoted = dir.path().join("it's.raw");
    std::fs::write(&quoted, b"x").expect("write");
    let mut p = plan(&files, SegmentStart::Boot, &work);
    p.files.disks.push(quoted);
    match run(&d, &p).await {
        DriverError::BadImage(why) => assert!(why.contains("disk path"), "{why}"),
        other => panic!("expected BadImage, got {other}"),
    }

    let mut p = plan(&files, SegmentStart::Boot, &work);
    p.files.kernel = dir.path().join("absent-vmlinuz");
    assert!(matches!(run(&d, &p).await, DriverError::BadImage(_)));
    let mut p = plan(&files, SegmentStart::Boot, &work);
    p.vm.arch = "aarch64".into();
    assert!(matches!(run(&d, &p).await, DriverError::BadImage(_)));
    assert!(!work.exists());
}

/// A checkpoint is checked against the lot before any domain is built.
#[tokio::test]
async fn checkpoints_of_other_machines_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = image(dir.path());
    let work = dir.path().join("work");
    let d = driver(Some(dir.path().join("no/such/xl")));
    let state = dir.path().join("machine-state");
    let restore = SegmentStart::Restore {
        machine_state: state.clone(),
    };
    let p = plan(&files, restore, &work);
    let refusal = |e: DriverError| match e {
        DriverError::Restore(why) => why,
        other => panic!("expected a Restore refusal, got {other}"),
    };

    // A QEMU checkpoint, not an xl save file.
    std::fs::write(&state, b"QEVM\0\0\0\x03 and the rest of a QEMU migration stream").expect("write");
    let why = refusal(run(&d, &p).await);
    assert!(why.contains("not an xl save file"), "{why}");

    // The header cut short.
    let whole = xl_save_file(r#"{"c_info":{"type":"pv"},"b_info":{"max_memkb":131072,"max_vcpus":1}}"#);
    std::fs::write(&state, &whole[..40]).expect("write");
    let why = refusal(run(&d, &p).await);
    assert!(why.contains("truncated"), "{why}");

    // Well-formed, but another machine: each field is named.
    for (json, field) in [
        (
            r#"{"c_info":{"type":"pv"},"b_info":{"max_memkb":262144,"max_vcpus":1}}"#,
            "memory is 256 MiB",
        ),
        (
            r#"{"c_info":{"type":"pv"},"b_info":{"max_memkb":131072,"max_vcpus":2}}"#,
            "vcpus is 2",
        ),
        (
            r#"{"c_info":{"type":"pvh"},"b_info":{"max_memkb":131072,"max_vcpus":1}}"#,
            "type is pvh",
        ),
    ] {
        std::fs::write(&state, xl_save_file(json)).expect("write");
        let why = refusal(run(&d, &p).await);
        assert!(why.contains(field), "{field}: {why}");
    }

    // The lot's own machine passes the check and gets as far as the
    // toolstack, which is missing here.
    std::fs::write(&state, &whole).expect("write");
    assert!(matches!(run(&d, &p).await, DriverError::MissingBinary { .. }));
    assert!(!work.exists());
}

/// Debian's real xl with its libraries: `.tools/xen/pkgs` if someone
/// unpacked the packages there, else unpacked here from the cached .debs.
/// Returns a wrapper that sets LD_LIBRARY_PATH (inside dom0 none is
/// needed), or None when neither is available.
fn real_xl(scratch: &Path) -> Option<PathBuf> {
    let xen = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/xen");
    let root = if xen.join("pkgs/usr/lib/xen-4.17/bin/xl").is_file() {
        xen.join("pkgs")
    } else {
        let debs: Vec<PathBuf> = std::fs::read_dir(xen.join("debs"))
            .ok()?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "deb"))
            .collect();
        if !debs
            .iter()
            .any(|p| p.to_string_lossy().contains("xen-utils-4.17_"))
        {
            return None;
        }
        let root = scratch.join("pkgs");
        for deb in &debs {
            let status = std::process::Command::new("dpkg-deb")
                .arg("-x")
                .arg(deb)
                .arg(&root)
                .status()
                .ok()?;
            assert!(status.success(), "dpkg-deb -x {} failed", deb.display());
        }
        root
    };
    let xl = root.join("usr/lib/xen-4.17/bin/xl");
    if !xl.is_file() {
        return None;
    }
    let wrapper = scratch.join("xl");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nLD_LIBRARY_PATH='{}' exec '{}' \"$@\"\n",
            root.join("usr/lib/x86_64-linux-gnu").display(),
            xl.display()
        ),
    )
    .expect("write xl wrapper");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod xl wrapper");
    Some(wrapper)
}

/// Outside dom0 the real `xl` cannot reach the hypervisor: the segment is
/// refused with a Toolstack error that says so, carries xl's own words,
/// and leaves no domain config behind.
#[tokio::test]
async fn real_xl_outside_dom0_is_a_clear_toolstack_error() {
    let capabilities = std::fs::read_to_string("/proc/xen/capabilities").unwrap_or_default();
    assert!(
        !capabilities.contains("control_d"),
        "this test expects a machine that is not a Xen dom0"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let files = image(dir.path());
    let work = dir.path().join("work");
    let plan = plan(&files, SegmentStart::Boot, &work);
    let Some(xl) = real_xl(dir.path()) else {
        println!(
            "note: no Debian xl here (.tools/xen/debs or .tools/xen/pkgs: run scripts/xen-host.sh build); \
             checking the missing-xl error instead"
        );
        match run(&driver(None), &plan).await {
            DriverError::MissingBinary { binary, package } => {
                assert_eq!(binary, "xl");
                assert_eq!(package, "xen-utils-4.17");
            }
            other => panic!("expected MissingBinary (no xl on PATH here), got {other}"),
        }
        return;
    };
    let d = driver(Some(xl));
    let err = run(&d, &plan).await;
    let why = match &err {
        DriverError::Toolstack(why) => why.clone(),
        other => panic!("expected a Toolstack error, got {other}"),
    };
    println!("{err}");
    assert!(why.contains("/proc/xen/capabilities"), "{why}");
    assert!(why.contains("not running under Xen"), "{why}");
    assert!(why.contains("`xl info` failed"), "{why}");
    // xl's own stderr (libxl could not open the hypervisor interface).
    assert!(why.contains("cannot init xl context"), "{why}");
    assert!(!work.join(xen::CONFIG_FILE).exists());
    // A failed check is not remembered as success: the next segment asks again.
    assert!(matches!(run(&d, &plan).await, DriverError::Toolstack(_)));
}
