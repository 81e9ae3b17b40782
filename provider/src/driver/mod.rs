//! The hypervisor drivers: boot from an image or restore from a
//! checkpoint, run T seconds, save, and report how the guest ended.
//!
//! A driver works on local files only; moving them through the
//! content-addressed store is the caller's job.
//!
//! - [`api`]: what the daemon and a driver exchange ([`SegmentPlan`],
//!   [`SegmentReport`], [`DriverError`]) and the [`Driver`] trait.
//! - [`template`]: the segment, written once (start, run, save to a partial
//!   file and rename, stop, console, timings) over each hypervisor's steps.
//! - [`host`]: the checks and helpers every driver shares.
//! - [`qemu`] (QMP), [`xen`] (`xl` in dom0); [`synthetic`] (no VM, for
//!   market load tests) only with the cargo feature `synthetic`.

pub mod api;
pub(crate) mod host;
pub mod qemu;
#[cfg(feature = "synthetic")]
pub mod synthetic;
pub mod template;
pub mod xen;

pub use api::{
    BootFiles, Driver, DriverError, OwnerPolicy, SegmentEnd, SegmentPlan, SegmentReport, SegmentStart,
    VmState, VmStep,
};
pub use template::STATE_FILE;
