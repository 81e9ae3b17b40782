//! What one account may ask of the market: jobs in flight, segments and
//! redundancy per job, guest memory, image size, and API requests per
//! second. Pure: [`Quotas::admit`] decides a submission from the spec and
//! the account's jobs in flight; [`InFlight`] keeps the count (a slot is
//! taken before the job is written, so two racing submissions cannot both
//! take the last one). Rates are kept by `governor` in `api.rs`.

use std::collections::{HashMap, HashSet};

use vmlot_schemas::JobId;
use vmlot_schemas::market::{JobSpec, SegmentCount};

/// Per-account limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quotas {
    /// Jobs of one account running (or ended and not yet refunded) at once.
    pub jobs_in_flight: usize,
    /// Segments one job may ask for (a job that runs until its guest
    /// halts is bounded by its budget instead).
    pub segments_per_job: u32,
    /// Replicas of each segment.
    pub redundancy: u32,
    /// Guest memory.
    pub memory_mib: u32,
    /// Bytes of the image's files (kernel, initrd, disks) as stored.
    pub image_bytes: u64,
    /// API requests per second per caller (bursts up to twice as many).
    pub requests_per_second: u32,
}

impl Default for Quotas {
    fn default() -> Self {
        Self {
            jobs_in_flight: 32,
            // A job's record lists every settled segment (about 600 bytes
            // each) and must stay under the server's 8 MiB payload.
            segments_per_job: 10_000,
            redundancy: 5,
            memory_mib: 16 * 1024,
            image_bytes: 64 << 30,
            requests_per_second: 100,
        }
    }
}

/// Why a submission is over its account's quota.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum OverQuota {
    #[error("account {account} has {running} jobs in flight, the most it may have")]
    JobsInFlight { account: String, running: usize },
    #[error("{asked} segments asked for; at most {limit} per job")]
    Segments { asked: u32, limit: u32 },
    #[error("redundancy {asked} asked for; at most {limit}")]
    Redundancy { asked: u32, limit: u32 },
    #[error("{asked} MiB of guest memory asked for; at most {limit} MiB")]
    Memory { asked: u32, limit: u32 },
    #[error("the image stores {asked} bytes; at most {limit}")]
    ImageBytes { asked: u64, limit: u64 },
}

impl Quotas {
    /// Whether `spec`, whose image stores `image_bytes`, fits the limits of
    /// one job (the count of jobs in flight is [`InFlight::take`]'s).
    pub fn admit(&self, spec: &JobSpec, image_bytes: u64) -> Result<(), OverQuota> {
        if let SegmentCount::Count(n) = spec.segments
            && n > self.segments_per_job
        {
            return Err(OverQuota::Segments {
                asked: n,
                limit: self.segments_per_job,
            });
        }
        if spec.redundancy > self.redundancy {
            return Err(OverQuota::Redundancy {
                asked: spec.redundancy,
                limit: self.redundancy,
            });
        }
        if spec.image.vm.memory_mib > self.memory_mib {
            return Err(OverQuota::Memory {
                asked: spec.image.vm.memory_mib,
                limit: self.memory_mib,
            });
        }
        if image_bytes > self.image_bytes {
            return Err(OverQuota::ImageBytes {
                asked: image_bytes,
                limit: self.image_bytes,
            });
        }
        Ok(())
    }
}

/// Each account's jobs in flight.
#[derive(Debug, Default)]
pub struct InFlight {
    by_account: HashMap<String, HashSet<JobId>>,
}

impl InFlight {
    /// Takes one of `account`'s `limit` slots for `job`, or says why not.
    pub fn take(&mut self, account: &str, job: JobId, limit: usize) -> Result<(), OverQuota> {
        let jobs = self.by_account.entry(account.to_string()).or_default();
        if jobs.len() >= limit && !jobs.contains(&job) {
            return Err(OverQuota::JobsInFlight {
                account: account.to_string(),
                running: jobs.len(),
            });
        }
        jobs.insert(job);
        Ok(())
    }

    /// Counts `job` whatever the limit (a job resumed after a restart).
    pub fn resume(&mut self, account: &str, job: JobId) {
        self.by_account
            .entry(account.to_string())
            .or_default()
            .insert(job);
    }

    /// Gives `job`'s slot back.
    pub fn release(&mut self, job: &JobId) {
        self.by_account.retain(|_, jobs| {
            jobs.remove(job);
            !jobs.is_empty()
        });
    }

    pub fn count(&self, account: &str) -> usize {
        self.by_account.get(account).map_or(0, HashSet::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmlot_schemas::market::Image;
    use vmlot_schemas::{HypervisorKind, ManifestId, Money, VmConfig};

    fn spec(segments: u32, redundancy: u32, memory_mib: u32) -> JobSpec {
        JobSpec {
            image: Image {
                vm: VmConfig {
                    hypervisor: HypervisorKind::Qemu,
                    arch: "x86_64".into(),
                    memory_mib,
                    vcpus: 1,
                    cmdline: String::new(),
                },
                kernel: ManifestId(vmlot_schemas::ids::Digest::Sha256([0; 32])),
                initrd: None,
                disks: vec![],
            },
            segment_seconds: 10,
            segments: SegmentCount::Count(segments),
            redundancy,
            check: vmlot_schemas::market::ResultCheck::Continuation,
            reserve_price: Money::new(1.into(), "CRD"),
            budget: Money::new(10.into(), "CRD"),
            account: "alice".into(),
        }
    }

    #[test]
    fn each_limit_refuses_what_passes_it_and_admits_what_meets_it() {
        let q = Quotas {
            jobs_in_flight: 2,
            segments_per_job: 10,
            redundancy: 2,
            memory_mib: 512,
            image_bytes: 1000,
            requests_per_second: 1,
        };
        assert_eq!(q.admit(&spec(10, 2, 512), 1000), Ok(()));
        assert!(matches!(
            q.admit(&spec(11, 1, 128), 0),
            Err(OverQuota::Segments { .. })
        ));
        assert!(matches!(
            q.admit(&spec(1, 3, 128), 0),
            Err(OverQuota::Redundancy { .. })
        ));
        assert!(matches!(
            q.admit(&spec(1, 1, 513), 0),
            Err(OverQuota::Memory { .. })
        ));
        assert!(matches!(
            q.admit(&spec(1, 1, 128), 1001),
            Err(OverQuota::ImageBytes { .. })
        ));
        let mut until = spec(1, 1, 128);
        until.segments = SegmentCount::UntilHalt;
        assert_eq!(q.admit(&until, 0), Ok(()));
    }

    #[test]
    fn jobs_in_flight_are_counted_per_account_and_given_back() {
        let mut f = InFlight::default();
        let (a, b, c) = (JobId::new(), JobId::new(), JobId::new());
        f.take("alice", a, 2).unwrap();
        f.take("alice", b, 2).unwrap();
        assert!(matches!(
            f.take("alice", c, 2),
            Err(OverQuota::JobsInFlight { running: 2, .. })
        ));
        f.take("bob", c, 2).unwrap();
        f.release(&a);
        f.take("alice", c, 2).unwrap();
        assert_eq!(f.count("alice"), 2);
        f.resume("alice", JobId::new());
        assert_eq!(f.count("alice"), 3);
    }
}
