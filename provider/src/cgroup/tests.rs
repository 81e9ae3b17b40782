//! The cgroup module's pure parts: paths from `/proc/self/cgroup` and
//! `mountinfo`, names, layouts.
use std::path::{Path, PathBuf};

use super::guest::{MIB, layout, setting};
use super::*;

/// This machine's: v1 controllers, the daemon's memory cgroup below the
/// root, a v2 mount without controllers beside them.
const HYBRID_CGROUP: &str = "9:name=systemd:/\n4:memory:/process_api/d57c\n2:cpuacct:/\n1:cpu:/\n0::/\n";
const HYBRID_MOUNTS: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
/// A systemd host on cgroup v2 only, the daemon in its service.
const V2_CGROUP: &str = "0::/system.slice/vmlot-provider.service\n";
const V2_MOUNTS: &str = "\
22 1 0:21 / /sys rw,nosuid shared:7 - sysfs sysfs rw
25 22 0:22 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

#[test]
fn own_paths_are_read_per_controller() {
    assert_eq!(own_path(HYBRID_CGROUP, Some("memory")), Some("/process_api/d57c"));
    assert_eq!(own_path(HYBRID_CGROUP, Some("cpu")), Some("/"));
    assert_eq!(own_path(HYBRID_CGROUP, None), Some("/"));
    let joint = "5:cpu,cpuacct:/user.slice\n3:memory:/user.slice/user-1000.slice\n";
    assert_eq!(own_path(joint, Some("cpu")), Some("/user.slice"));
    assert_eq!(own_path(joint, Some("cpuacct")), Some("/user.slice"));
    assert_eq!(own_path(joint, None), None);
    assert_eq!(own_path(V2_CGROUP, Some("memory")), None);
    assert_eq!(
        own_path(V2_CGROUP, None),
        Some("/system.slice/vmlot-provider.service")
    );
    // A path may itself hold a colon.
    assert_eq!(own_path("0::/a:b\n", None), Some("/a:b"));
}

#[test]
fn the_memory_controllers_hierarchy_decides_the_version() {
    assert_eq!(
        locate(HYBRID_CGROUP, HYBRID_MOUNTS).unwrap(),
        Place::V1 {
            memory: "/sys/fs/cgroup/memory/process_api/d57c".into(),
            cpu: Some("/sys/fs/cgroup/cpu".into()),
        }
    );
    let place = locate(HYBRID_CGROUP, HYBRID_MOUNTS).unwrap().to_string();
    assert!(place.ends_with("and /sys/fs/cgroup/cpu"), "{place}");
    assert_eq!(
        locate(V2_CGROUP, V2_MOUNTS).unwrap(),
        Place::V2 {
            own: "/sys/fs/cgroup/system.slice/vmlot-provider.service".into()
        }
    );
    // No cpu hierarchy: memory alone.
    let no_cpu: String = HYBRID_MOUNTS
        .lines()
        .filter(|l| !l.ends_with(",cpu"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(matches!(
        locate(HYBRID_CGROUP, &no_cpu).unwrap(),
        Place::V1 { cpu: None, .. }
    ));
    // No cgroup file system at all.
    assert!(matches!(
        locate(HYBRID_CGROUP, "22 1 0:21 / /sys rw - sysfs sysfs rw\n"),
        Err(CgroupError::Unavailable(_))
    ));
}

#[test]
fn a_bind_mounted_subtree_is_followed_or_refused() {
    // A container that sees only its own subtree, mounted at /sys/fs/cgroup.
    let mounts = "40 30 0:38 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
    assert_eq!(
        locate("0::/docker/abc/inner\n", mounts).unwrap(),
        Place::V2 {
            own: "/sys/fs/cgroup/inner".into()
        }
    );
    assert_eq!(
        locate("0::/docker/abc\n", mounts).unwrap(),
        Place::V2 {
            own: "/sys/fs/cgroup".into()
        }
    );
    assert!(locate("0::/docker/abcdef\n", mounts).is_err());
    assert!(locate("0::/elsewhere\n", mounts).is_err());
}

#[test]
fn v2_needs_memory_and_takes_cpu_when_there() {
    assert_eq!(
        v2_controllers("cpuset cpu io memory pids\n").unwrap(),
        "+memory +cpu"
    );
    assert_eq!(v2_controllers("memory pids").unwrap(), "+memory");
    assert!(v2_controllers("cpu io pids").is_err());
    assert!(v2_controllers("").is_err());
}

#[test]
fn the_layout_names_the_segments_cgroup_in_each_hierarchy() {
    let v1 = locate(HYBRID_CGROUP, HYBRID_MOUNTS).unwrap();
    let dirs = layout(&v1, "lot.7", 640 * MIB);
    assert_eq!(dirs.len(), 2);
    assert_eq!(
        dirs[0].0,
        Path::new("/sys/fs/cgroup/memory/process_api/d57c/vmlot-guests/lot.7")
    );
    assert_eq!(dirs[0].1, [setting("memory.limit_in_bytes", "671088640", false)]);
    assert_eq!(dirs[1].0, Path::new("/sys/fs/cgroup/cpu/vmlot-guests/lot.7"));
    assert_eq!(
        dirs[1].1,
        [setting("cpu.shares", "2", false), setting("cpu.idle", "1", true)]
    );
    let v2 = Place::V2 {
        own: "/cg/svc".into(),
    };
    let dirs = layout(&v2, "lot.7", 640 * MIB);
    assert_eq!(dirs.len(), 1);
    assert_eq!(dirs[0].0, Path::new("/cg/svc/vmlot-guests/lot.7"));
    assert_eq!(
        dirs[0].1,
        [
            setting("memory.max", "671088640", false),
            setting("cpu.weight", "1", true),
            setting("cpu.idle", "1", true),
        ]
    );
    assert_eq!(
        v1.guest_dirs(),
        [
            PathBuf::from("/sys/fs/cgroup/memory/process_api/d57c/vmlot-guests"),
            PathBuf::from("/sys/fs/cgroup/cpu/vmlot-guests"),
        ]
    );
}

#[test]
fn names_carry_the_lot_and_the_daemons_pid() {
    let lot = "0b7c5f0e-8a43-4c1e-9f59-5b1e0c6f3a21";
    let workdir = PathBuf::from(format!("/var/lib/vmlot-provider/work/{lot}/run"));
    let name = guest_name(&workdir, 4242, 3);
    assert_eq!(name, format!("{lot}.4242"));
    assert_eq!(owner_pid(&name), Some(4242));
    assert_eq!(guest_name(Path::new("/tmp/.tmpXYZ"), 17, 3), "segment-3.17");
    assert_eq!(owner_pid("segment-3.17"), Some(17));
    assert_eq!(owner_pid("stray"), None);
    assert_eq!(owner_pid("a.b"), None);
}

#[test]
fn the_ceiling_is_the_guest_plus_the_headroom() {
    let c = Confinement { headroom_mib: 512 };
    assert_eq!(c.ceiling_bytes(128), 640 * MIB);
    assert_eq!(c.ceiling_bytes(u32::MAX), (u64::from(u32::MAX) + 512) * MIB);
}
