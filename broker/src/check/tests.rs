//! Every named refusal of a result's checks, and the results that pass,
//! without NATS.

use chrono::{DateTime, Utc};
use vmlot_schemas::market::{Checkpoint, GuestState, JobStatus, SegmentCount};
use vmlot_schemas::standing::RefusalKind;
use vmlot_schemas::{HashAlgorithm, HypervisorKind, ManifestId, ProviderId, VmConfig};

use super::*;
use crate::fixtures::*;

const ALLOWANCE: Duration = Duration::from_secs(2);

/// A job whose open attempt of a `t`-second segment was awarded to
/// `provider` at `at`, starting from machine state `input`.
fn open(provider: ProviderId, t: u32, at: DateTime<Utc>, input: Option<&[u8]>) -> JobStatus {
    let mut s = job(SegmentCount::UntilHalt);
    s.checkpoint.machine_state = input.map(|n| ManifestId::of(HashAlgorithm::Sha256, n));
    let far = Utc::now() + chrono::Duration::hours(1);
    let mut s = awarded(&s, &[provider], far);
    let open = s.open_lot.as_mut().unwrap();
    open.lot.segment_seconds = t;
    open.awarded_at = Some(at);
    s
}

fn running(name: &[u8]) -> GuestState {
    GuestState::Running {
        checkpoint: checkpoint(name),
    }
}

fn kind_of(r: Result<impl std::fmt::Debug, Refusal>) -> RefusalKind {
    r.expect_err("refused").kind
}

#[test]
fn a_result_that_could_have_run_passes_and_one_too_soon_is_too_early() {
    let p = ProviderId::new();
    let awarded_at = Utc::now() - chrono::Duration::seconds(60);
    let s = open(p, 10, awarded_at, Some(b"c0"));
    let r = result_of(&s, p, running(b"c1"));
    // 10 s segment: from 8 s after the award (2 s allowance) it could be true.
    let at = |secs: i64| awarded_at + chrono::Duration::seconds(secs);
    assert!(claims(&s, &r, at(12), ALLOWANCE).is_ok());
    assert!(claims(&s, &r, at(8), ALLOWANCE).is_ok());
    let early = claims(&s, &r, at(3), ALLOWANCE).unwrap_err();
    assert_eq!(early.kind, RefusalKind::TooEarly);
    assert!(early.why.contains("3.0 s after its award"), "{early}");
    // A guest may halt at once: that is not early (it is checked otherwise).
    let halted = result_of(
        &s,
        p,
        GuestState::Halted {
            final_state: Some(Checkpoint {
                machine_state: None,
                disks: vec![],
                stored_bytes: 0,
                memory: None,
            }),
        },
    );
    assert!(claims(&s, &halted, at(0), ALLOWANCE).is_ok());
}

#[test]
fn a_preempted_segment_may_come_early_but_not_under_a_quorum() {
    let p = ProviderId::new();
    let awarded_at = Utc::now() - chrono::Duration::seconds(60);
    let mut s = open(p, 30, awarded_at, Some(b"c0"));
    let mut r = result_of(&s, p, running(b"c1"));
    r.preempted = true;
    r.timings.run_ms = 4_000;
    let at = |secs: i64| awarded_at + chrono::Duration::seconds(secs);
    assert!(claims(&s, &r, at(6), ALLOWANCE).is_ok());
    // Not preempted, the same result is too early.
    r.preempted = false;
    assert_eq!(kind_of(claims(&s, &r, at(6), ALLOWANCE)), RefusalKind::TooEarly);
    r.preempted = true;
    // The input handed back is still refused, preempted or not.
    let unchanged = result_of(&s, p, running(b"c0"));
    let unchanged = SegmentResult {
        preempted: true,
        timings: r.timings,
        ..unchanged
    };
    assert_eq!(
        kind_of(claims(&s, &unchanged, at(6), ALLOWANCE)),
        RefusalKind::Unchanged
    );
    s.spec.check = ResultCheck::Quorum;
    assert_eq!(kind_of(claims(&s, &r, at(6), ALLOWANCE)), RefusalKind::Incomplete);
}

#[test]
fn an_ended_guest_without_its_final_state_is_refused() {
    let p = ProviderId::new();
    let s = open(p, 10, Utc::now(), None);
    for guest in [
        GuestState::Halted { final_state: None },
        GuestState::Crashed {
            reason: "panic".into(),
            final_state: None,
        },
    ] {
        let r = result_of(&s, p, guest);
        assert_eq!(
            kind_of(claims(&s, &r, Utc::now(), ALLOWANCE)),
            RefusalKind::NoFinalState
        );
    }
}

#[test]
fn the_input_handed_back_or_an_image_part_is_unchanged() {
    let p = ProviderId::new();
    let long_ago = Utc::now() - chrono::Duration::seconds(60);
    let s = open(p, 10, long_ago, Some(b"c0"));
    let same = result_of(&s, p, running(b"c0"));
    let refused = claims(&s, &same, Utc::now(), ALLOWANCE).unwrap_err();
    assert_eq!(refused.kind, RefusalKind::Unchanged);
    // Segment 0 starts from the image: its kernel is no machine state.
    let s0 = open(p, 10, long_ago, None);
    let kernel = s0.spec.image.kernel;
    let named_kernel = result_of(
        &s0,
        p,
        GuestState::Running {
            checkpoint: Checkpoint {
                machine_state: Some(kernel),
                disks: vec![],
                stored_bytes: 4096,
                memory: None,
            },
        },
    );
    assert_eq!(
        kind_of(claims(&s0, &named_kernel, Utc::now(), ALLOWANCE)),
        RefusalKind::Unchanged
    );
}

#[test]
fn a_state_without_machine_state_or_with_other_disks_is_incomplete() {
    let p = ProviderId::new();
    let s = open(p, 1, Utc::now() - chrono::Duration::seconds(60), Some(b"c0"));
    let no_state = result_of(
        &s,
        p,
        GuestState::Running {
            checkpoint: Checkpoint {
                machine_state: None,
                disks: vec![],
                stored_bytes: 0,
                memory: None,
            },
        },
    );
    assert_eq!(
        kind_of(claims(&s, &no_state, Utc::now(), ALLOWANCE)),
        RefusalKind::Incomplete
    );
    let mut extra = checkpoint(b"c1");
    extra
        .disks
        .push(ManifestId::of(HashAlgorithm::Sha256, b"a disk the image lacks"));
    let extra = result_of(&s, p, GuestState::Running { checkpoint: extra });
    assert_eq!(
        kind_of(claims(&s, &extra, Utc::now(), ALLOWANCE)),
        RefusalKind::Incomplete
    );
}

#[test]
fn a_result_from_a_provider_not_awarded_is_not_open() {
    let p = ProviderId::new();
    let s = open(p, 1, Utc::now() - chrono::Duration::seconds(60), Some(b"c0"));
    let stranger = result_of(&s, ProviderId::new(), running(b"c1"));
    assert_eq!(
        kind_of(claims(&s, &stranger, Utc::now(), ALLOWANCE)),
        RefusalKind::NotOpen
    );
}

fn vm(hypervisor: HypervisorKind, memory_mib: u32, cmdline: &str) -> VmConfig {
    VmConfig {
        hypervisor,
        arch: "x86_64".into(),
        memory_mib,
        vcpus: 1,
        cmdline: cmdline.into(),
    }
}

/// The start of an xl save file for a domain of `memkb` KiB and 1 vCPU.
fn xl_prefix(memkb: u64) -> Vec<u8> {
    use vmlot_cas::xensave::{XL_BYTEORDER, XL_FLAG_JSON, XL_FLAG_STREAM_V2, XL_MAGIC};
    let config = format!(
        r#"{{"c_info":{{"type":"pv","name":"g"}},"b_info":{{"max_memkb":{memkb},"target_memkb":{memkb},"max_vcpus":1}}}}"#
    );
    let mut config = config.into_bytes();
    config.push(0);
    let mut optional = (config.len() as u32).to_ne_bytes().to_vec();
    optional.extend_from_slice(&config);
    let mut file = XL_MAGIC.to_vec();
    for word in [
        XL_BYTEORDER,
        XL_FLAG_JSON | XL_FLAG_STREAM_V2,
        0,
        optional.len() as u32,
    ] {
        file.extend_from_slice(&word.to_ne_bytes());
    }
    file.extend_from_slice(&optional);
    file.extend_from_slice(b"LibxlFmt\0\0\0\x02\0\0\0\0");
    file
}

#[test]
fn an_xl_save_must_be_for_the_lots_machine() {
    let save = xl_prefix(128 * 1024);
    assert!(state_kind(&vm(HypervisorKind::Xen, 128, ""), 0, 1 << 20, &save, None).is_ok());
    let other = state_kind(&vm(HypervisorKind::Xen, 256, ""), 0, 1 << 20, &save, None).unwrap_err();
    assert_eq!(other.kind, RefusalKind::WrongKind);
    assert!(other.why.contains("memory"), "{other}");
    for junk in [&b""[..], b"QEVM\0\0\0\x03", &[0u8; 4096]] {
        assert_eq!(
            kind_of(state_kind(&vm(HypervisorKind::Xen, 128, ""), 0, 4096, junk, None)),
            RefusalKind::WrongKind
        );
    }
    // An xl save is not a QEMU state, and holds its RAM.
    assert_eq!(
        kind_of(state_kind(
            &vm(HypervisorKind::Qemu, 128, ""),
            0,
            1 << 20,
            &save,
            None
        )),
        RefusalKind::WrongKind
    );
    assert_eq!(
        kind_of(state_kind(
            &vm(HypervisorKind::Xen, 128, ""),
            0,
            1 << 20,
            &save,
            Some(128 << 20)
        )),
        RefusalKind::WrongKind
    );
}

#[cfg(feature = "synthetic")]
#[test]
fn a_synthetic_state_must_have_run_this_segment_at_the_lots_size() {
    use vmlot_cas::synthetic::SyntheticHeader;
    let header = |counter, state_kib| {
        SyntheticHeader {
            seed: 1,
            counter,
            digest: [7; 20],
            state_kib,
            data: [8; 20],
        }
        .encode()
    };
    let small = vm(HypervisorKind::Synthetic, 16, "synthetic.state_kib=64");
    assert!(state_kind(&small, 2, 64 * 1024, &header(3, 64), None).is_ok());
    // Not run: the counter of the input.
    assert_eq!(
        kind_of(state_kind(&small, 2, 64 * 1024, &header(2, 64), None)),
        RefusalKind::Unchanged
    );
    // Another machine's size, or a header that lies about the size.
    assert_eq!(
        kind_of(state_kind(&small, 2, 128 * 1024, &header(3, 128), None)),
        RefusalKind::WrongKind
    );
    assert_eq!(
        kind_of(state_kind(&small, 2, 4096, &header(3, 64), None)),
        RefusalKind::WrongKind
    );
    let full = vm(HypervisorKind::Synthetic, 16, "");
    assert!(state_kind(&full, 0, 16 << 20, &header(1, 16 * 1024), None).is_ok());
    assert_eq!(
        kind_of(state_kind(&full, 0, 4096, b"junk", None)),
        RefusalKind::WrongKind
    );
}

/// The first bytes of real QEMU 10 saves (q35, mapped-ram, and one without).
const QEMU_128M: &[u8] = include_bytes!("../../../cas/tests/data/qemu10-q35-128m-mapped.head");
const QEMU_256M: &[u8] = include_bytes!("../../../cas/tests/data/qemu10-q35-256m-mapped.head");
const QEMU_CLASSIC: &[u8] = include_bytes!("../../../cas/tests/data/qemu10-q35-128m-classic.head");
/// A save of a guest whose RAM is a shared file, made with x-ignore-shared.
const QEMU_NO_RAM: &[u8] = include_bytes!("../../../cas/tests/data/qemu10-q35-128m-ignore-shared.head");

/// A state that leaves the guest's RAM in its file needs a memory part of
/// the lot's memory; one that holds its RAM takes none.
#[test]
fn a_qemu_save_without_its_ram_needs_a_memory_part_of_the_lots_size() {
    let qemu = |mib| vm(HypervisorKind::Qemu, mib, "");
    let part = |mib: u64| Some(mib << 20);
    assert!(state_kind(&qemu(128), 1, 1 << 20, QEMU_NO_RAM, part(128)).is_ok());
    assert_eq!(
        kind_of(state_kind(&qemu(128), 1, 1 << 20, QEMU_NO_RAM, None)),
        RefusalKind::Incomplete
    );
    let small = state_kind(&qemu(128), 1, 1 << 20, QEMU_NO_RAM, part(64)).unwrap_err();
    assert_eq!(small.kind, RefusalKind::WrongKind);
    assert!(small.why.contains("memory part holds"), "{small}");
    assert_eq!(
        kind_of(state_kind(&qemu(256), 1, 1 << 20, QEMU_NO_RAM, part(256))),
        RefusalKind::WrongKind
    );
    assert_eq!(
        kind_of(state_kind(&qemu(128), 1, 140 << 20, QEMU_128M, part(128))),
        RefusalKind::WrongKind
    );
}

#[test]
fn a_qemu_save_must_be_mapped_ram_for_the_lots_memory() {
    let qemu = |mib| vm(HypervisorKind::Qemu, mib, "");
    assert!(state_kind(&qemu(128), 1, 140 << 20, QEMU_128M, None).is_ok());
    assert!(state_kind(&qemu(256), 1, 270 << 20, QEMU_256M, None).is_ok());
    let other = state_kind(&qemu(128), 1, 270 << 20, QEMU_256M, None).unwrap_err();
    assert_eq!(other.kind, RefusalKind::WrongKind);
    assert!(
        other.why.contains("256 MiB in the save, 128 MiB in the lot"),
        "{other}"
    );
    assert_eq!(
        kind_of(state_kind(&qemu(128), 1, 1 << 20, QEMU_CLASSIC, None)),
        RefusalKind::WrongKind
    );
    // Not a QEMU stream at all, or one cut short.
    for junk in [&b""[..], &QEMU_128M[..20], &xl_prefix(128 * 1024), &[0u8; 4096]] {
        assert_eq!(
            kind_of(state_kind(&qemu(128), 1, 4096, junk, None)),
            RefusalKind::WrongKind
        );
    }
}
