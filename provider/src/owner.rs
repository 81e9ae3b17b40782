//! The machine owner's activity, without the provider's own guests: the
//! CPU the machine spent since the last look (`/proc/stat`), less what
//! this daemon and every process it started (QEMU, `xl`, …) spent
//! (`/proc/<pid>/stat` of each descendant). A load average counts the
//! provider's own guests too, so a provider running a segment would look
//! busy to itself and stop bidding; this does not. A graphical session in
//! use (input within the desktop's idle delay) makes the owner busy too,
//! whatever the CPU says ([`crate::desktop`]).
//!
//! The arithmetic is pure ([`owner_share`], [`descendants`]); [`Meter`]
//! reads `/proc`.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::desktop::Desktop;

/// CPU time counters at one moment, in clock ticks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sample {
    /// Every CPU's busy time (all but idle and iowait).
    pub busy: u64,
    /// Every CPU's time, busy or not.
    pub total: u64,
    /// The provider's and its descendants' user and system time.
    pub own: u64,
}

/// The owner's share of the machine's CPU between two samples (0 to 1):
/// busy time not the provider's, over all CPU time. (`own` counts exited
/// descendants through their parents' children's-time fields, so it only
/// grows; were it ever to shrink, the interval is counted as the owner's,
/// the side that leaves the owner alone.)
pub fn owner_share(before: Sample, after: Sample) -> f64 {
    let total = after.total.saturating_sub(before.total);
    if total == 0 {
        return 0.0;
    }
    let busy = after.busy.saturating_sub(before.busy);
    let own = after.own.saturating_sub(before.own);
    let owner = busy.saturating_sub(own);
    (owner as f64 / total as f64).clamp(0.0, 1.0)
}

/// `root` and every process descending from it, from (pid, parent) pairs.
pub fn descendants(parents: &[(u32, u32)], root: u32) -> HashSet<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for &(pid, ppid) in parents {
        children.entry(ppid).or_default().push(pid);
    }
    let mut found = HashSet::from([root]);
    let mut todo = vec![root];
    while let Some(pid) = todo.pop() {
        for &child in children.get(&pid).into_iter().flatten() {
            if found.insert(child) {
                todo.push(child);
            }
        }
    }
    found
}

/// From `/proc/stat`'s first line: (busy, total) ticks of every CPU.
pub fn parse_cpu_line(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().next()?;
    let mut fields = line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let values: Vec<u64> = fields.map(|f| f.parse().ok()).collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice]:
    // guest time is counted in user already.
    let total: u64 = values.iter().take(8).sum();
    let idle = values.get(3)? + values.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// From `/proc/<pid>/stat`: (parent pid, ticks): its own user and system
/// time and that of its children it has waited for (so a guest that
/// exited still counts, in its parent).
pub fn parse_pid_stat(stat: &str) -> Option<(u32, u64)> {
    // The command name is in parentheses and may hold spaces: fields
    // after its closing parenthesis are fixed.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14)
    let ppid = fields.get(1)?.parse().ok()?;
    let mut ticks = 0u64;
    for i in 11..=14 {
        ticks += fields.get(i)?.parse::<u64>().ok()?;
    }
    Some((ppid, ticks))
}

/// Reads the machine's and `root`'s family's counters now.
pub fn sample(root: u32) -> Option<Sample> {
    let (busy, total) = parse_cpu_line(&std::fs::read_to_string("/proc/stat").ok()?)?;
    let mut stats: Vec<(u32, u32, u64)> = Vec::new();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        // A process may exit between the listing and the read.
        if let Some((ppid, ticks)) = std::fs::read_to_string(entry.path().join("stat"))
            .ok()
            .and_then(|s| parse_pid_stat(&s))
        {
            stats.push((pid, ppid, ticks));
        }
    }
    let parents: Vec<(u32, u32)> = stats.iter().map(|&(pid, ppid, _)| (pid, ppid)).collect();
    let family = descendants(&parents, root);
    let own = stats
        .iter()
        .filter(|(pid, _, _)| family.contains(pid))
        .map(|&(_, _, ticks)| ticks)
        .sum();
    Some(Sample { busy, total, own })
}

/// Samples shorter apart than this give the last share again: ticks are
/// 10 ms, and a bid decision should not see noise.
const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// The owner's activity as the daemon asks for it, from one sample to
/// the next.
pub struct Meter {
    root: u32,
    last: Mutex<Option<(Instant, Sample, f64)>>,
    desktop: Desktop,
}

impl Default for Meter {
    fn default() -> Self {
        Meter::of(std::process::id())
    }
}

impl Meter {
    /// The owner's activity with `root` and its descendants left out.
    pub fn of(root: u32) -> Self {
        Meter {
            root,
            last: Mutex::new(None),
            desktop: Desktop::default(),
        }
    }

    /// The owner's share of the machine's CPU since the previous call at
    /// least a second ago (0 on the first call, or when `/proc` cannot be
    /// read: a provider that cannot tell does not stop).
    pub fn owner_share(&self) -> f64 {
        let mut last = self.last.lock().expect("owner meter lock");
        let now = Instant::now();
        if let Some((at, _, share)) = *last
            && now.duration_since(at) < MIN_INTERVAL
        {
            return share;
        }
        let Some(current) = sample(self.root) else {
            return 0.0;
        };
        let share = last.map_or(0.0, |(_, before, _)| owner_share(before, current));
        *last = Some((now, current, share));
        share
    }

    /// True while the owner's share stays below `threshold` and nobody
    /// uses a graphical session of the machine ([`Desktop`]); always with
    /// no threshold (a provider that does not scavenge).
    pub fn idle(&self, threshold: Option<f64>) -> bool {
        threshold.is_none_or(|t| self.owner_share() < t && !self.desktop.in_use())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_owner_is_the_busy_time_that_is_not_ours() {
        let at = |busy, total, own| Sample { busy, total, own };
        // 200 ticks of two CPUs; 150 busy, 100 of them ours: the owner 25 %.
        assert_eq!(owner_share(at(0, 0, 0), at(150, 200, 100)), 0.25);
        // All busy time ours: the owner is idle.
        assert_eq!(owner_share(at(10, 10, 5), at(110, 210, 105)), 0.0);
        // Were `own` to shrink, the interval is the owner's.
        assert_eq!(owner_share(at(0, 0, 500), at(100, 200, 10)), 0.5);
        // No time passed.
        assert_eq!(owner_share(at(5, 5, 5), at(5, 5, 5)), 0.0);
    }

    #[test]
    fn descendants_follow_every_generation() {
        let parents = [(10, 1), (11, 10), (12, 11), (13, 1), (14, 13), (15, 11)];
        assert_eq!(descendants(&parents, 10), HashSet::from([10, 11, 12, 15]));
        assert_eq!(descendants(&parents, 99), HashSet::from([99]));
    }

    #[test]
    fn proc_lines_parse() {
        let stat = "cpu  100 5 50 800 20 1 2 3 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n";
        assert_eq!(parse_cpu_line(stat), Some((161, 981)));
        assert_eq!(parse_cpu_line("intr 1 2"), None);
        let pid =
            "4242 (qemu-system-x86 (x)) S 4000 4242 4000 0 -1 4194560 100 0 0 0 750 250 30 20 20 0 3 0 1234";
        assert_eq!(parse_pid_stat(pid), Some((4000, 1050)));
        assert_eq!(parse_pid_stat("garbage"), None);
    }
}
