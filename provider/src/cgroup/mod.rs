//! The guest's cgroup: a scavenging provider (`idle_load` set) runs each
//! QEMU guest in a cgroup of its own, with the lowest CPU weight and a
//! memory ceiling. `SCHED_IDLE` (set per process by the driver) already
//! keeps the guest behind the owner's work on the CPU; the cgroup also
//! keeps it from pushing the owner's programs out of memory: a guest past
//! its ceiling is reclaimed from, and at worst OOM-killed itself, instead
//! of the owner's editor.
//!
//! **Where.** Under the daemon's own cgroup (from `/proc/self/cgroup`: each
//! controller's path on cgroup v1, the `0::` path on v2), in
//! `vmlot-guests/<lot>.<daemon pid>` (`segment-<n>.<pid>` for a workdir
//! that names no lot), so a systemd unit with `Delegate=yes` keeps its
//! guests inside its own slice. The pid says whose a cgroup is: when the
//! daemon starts it removes the empty ones of daemons no longer running
//! (a daemon killed outright leaves its guests' cgroups behind) and leaves
//! another running daemon's alone.
//!
//! **What.** The memory ceiling is the guest's memory plus a headroom
//! (`guest_memory_headroom_mib`: QEMU's own memory beyond guest RAM, the
//! TCG translation cache above all): `memory.limit_in_bytes` on v1,
//! `memory.max` on v2. CPU: the lowest weight (`cpu.shares` 2 on v1,
//! `cpu.weight` 1 on v2), then `cpu.idle` 1 where the kernel has the file
//! (5.15 on): the whole group then competes like a `SCHED_IDLE` task, at
//! that policy's weight (v1's `cpu.shares` then reads 3).
//!
//! **When.** QEMU enters its cgroup between fork and exec ([`Join`]: the
//! child writes `0`, itself, into `cgroup.procs`), so every page QEMU
//! allocates, guest RAM first, is charged there. The driver then checks it
//! is in (a cgroup removed under it, or `cgroup.procs` not writable, leaves
//! the guest unconfined, with a warning) and removes the cgroup once QEMU
//! has exited.
//!
//! **cgroup v2.** A cgroup that holds processes cannot give controllers to
//! children ("no internal processes"), so the first time, when the
//! daemon's own cgroup refuses `+memory +cpu` in its
//! `cgroup.subtree_control`, the daemon moves itself into the leaf
//! `<own>/daemon` and tries again. Not run on a host: the machine this was
//! written and tested on has its controllers on cgroup v1 only (a v2 mount
//! without controllers beside them); the v2 code is kept small and its
//! pure parts are unit-tested.
//!
//! **Without cgroups** (no write access, no memory controller) guests still
//! run, under `SCHED_IDLE` only, and one warning says so; so does
//! `vmlot-provider doctor`. A provider that cannot confine its guests is
//! still a provider.
//!
//! **Not Xen.** A Xen guest's vCPUs are scheduled by the hypervisor, not by
//! a process of dom0; the dom0 processes serving it (xenconsoled, a device
//! model) are not the guest, and confining them would confine nothing.
//!
//! Written by hand (a few `mkdir`, `write` and `rmdir` calls) rather than
//! with `cgroups-rs` (0.5.1, kata-containers): that crate pulls in `zbus`
//! (its systemd D-Bus manager) and `nix` 0.25 for these few file writes;
//! on v2 it writes the controllers into every ancestor's
//! `cgroup.subtree_control` from the hierarchy root down, ignoring errors,
//! and never moves the daemon out of its own cgroup, so under a delegated
//! unit (the daemon in the unit's cgroup) the guest's cgroup would get no
//! memory controller; and joining between fork and exec needs only the
//! `cgroup.procs` paths, prepared before the fork.

mod guest;
mod place;
mod prepare;

pub use guest::{Confinement, GuestCgroup, Join, guest_name, next_segment};
pub use place::{CgroupError, DAEMON_LEAF, GUESTS, Place, locate, own_path, owner_pid, v2_controllers};
pub use prepare::{for_guest, place, probe, sweep, unconfined};

#[cfg(test)]
mod tests;
