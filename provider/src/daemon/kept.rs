//! The guest RAM files this provider keeps from its last segment of each
//! job, so that its next segment of the same job (or the check restore of
//! one) pulls the new checkpoint's RAM onto the file it already holds: only
//! the pages that differ are written, from the cache or the store
//! ([`vmlot_cas::pull_file_over`]). Going on from its own save, nothing is.
//!
//! A file is kept under `<work_dir>/kept/<job>.ram` with the id of the
//! manifest this provider pushed for it; it is only ever moved, never
//! written, while kept. At most [`KEPT_JOBS`] are kept, the oldest dropped.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use vmlot_schemas::{JobId, ManifestId};

/// RAM files kept at once (each the size of its guest's memory).
pub const KEPT_JOBS: usize = 4;

pub(super) struct Kept {
    dir: PathBuf,
    /// Oldest first.
    files: Mutex<VecDeque<(JobId, ManifestId)>>,
}

impl Kept {
    /// Keeps files in `dir`, emptied first: what a previous run left there
    /// is not known to match any manifest.
    pub fn open(dir: PathBuf) -> std::io::Result<Self> {
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        std::fs::create_dir_all(&dir)?;
        Ok(Kept {
            dir,
            files: Mutex::new(VecDeque::new()),
        })
    }

    fn path(&self, job: &JobId) -> PathBuf {
        self.dir.join(format!("{job}.ram"))
    }

    /// Moves `file`, the RAM file of `job` that manifest `id` describes,
    /// into the keep; drops the oldest file beyond [`KEPT_JOBS`]. A file
    /// that cannot be moved is not kept (the next pull is a whole one).
    pub fn keep(&self, job: JobId, id: ManifestId, file: &Path) {
        let mut files = self.files.lock().expect("kept lock");
        files.retain(|(j, _)| *j != job);
        if let Err(e) = std::fs::rename(file, self.path(&job)) {
            tracing::warn!(%job, "RAM file not kept: {e}");
            return;
        }
        files.push_back((job, id));
        while files.len() > KEPT_JOBS {
            if let Some((old, _)) = files.pop_front() {
                let _ = std::fs::remove_file(self.path(&old));
            }
        }
    }

    /// Whether a file is kept for `job`.
    pub fn holds(&self, job: &JobId) -> bool {
        self.files
            .lock()
            .expect("kept lock")
            .iter()
            .any(|(j, _)| j == job)
    }

    /// Takes the file kept for `job`, if any: where it is and the manifest
    /// that describes it. The caller moves it away or deletes it.
    pub fn take(&self, job: &JobId) -> Option<(PathBuf, ManifestId)> {
        let mut files = self.files.lock().expect("kept lock");
        let at = files.iter().position(|(j, _)| j == job)?;
        let (_, id) = files.remove(at)?;
        Some((self.path(job), id))
    }
}

#[cfg(test)]
mod tests {
    use vmlot_schemas::HashAlgorithm;

    use super::*;

    #[test]
    fn keeps_the_last_file_of_each_job_and_the_newest_jobs() {
        let dir = tempfile::tempdir().unwrap();
        let kept = Kept::open(dir.path().join("kept")).unwrap();
        let id = |n: u8| ManifestId::of(HashAlgorithm::Sha256, &[n]);
        let jobs: Vec<JobId> = (0..=KEPT_JOBS).map(|_| JobId::new()).collect();
        let file = |n: u8| {
            let path = dir.path().join(format!("ram{n}"));
            std::fs::write(&path, [n]).unwrap();
            path
        };
        kept.keep(jobs[0], id(1), &file(1));
        kept.keep(jobs[0], id(2), &file(2));
        for (i, job) in jobs.iter().enumerate().skip(1) {
            kept.keep(*job, id(10 + i as u8), &file(10 + i as u8));
        }
        // The first job's file was the oldest: dropped.
        assert_eq!(kept.take(&jobs[0]), None);
        let (path, got) = kept.take(&jobs[1]).unwrap();
        assert_eq!((std::fs::read(&path).unwrap(), got), (vec![11], id(11)));
        assert_eq!(kept.take(&jobs[1]), None);
        assert_eq!(
            std::fs::read_dir(dir.path().join("kept")).unwrap().count(),
            KEPT_JOBS
        );
    }
}
