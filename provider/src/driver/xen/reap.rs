//! Orphaned domains: a provider killed outright (SIGKILL) leaves its
//! domains running, since `xl create -e` ties a domain to no process. A
//! provider reaps those of dead providers on this host when it first finds
//! the toolstack working, so their memory is free for its own segments.

use std::path::Path;

use tokio_util::sync::CancellationToken;

use super::domain::DOMAIN_PREFIX;
use super::xl::{QUERY_TIMEOUT, Xl};

/// Destroys the domains of providers that died on this host (SIGKILL
/// leaves them running: `xl create -e` ties a domain to no process), so
/// their memory is free for the segments this provider will run. A domain
/// is an orphan when its name carries the pid of a process that is gone;
/// those of live providers beside this one are left alone.
pub(crate) async fn reap_orphans(xl: &Xl, cancel: &CancellationToken) {
    let list = match xl.run_retrying(&["list"], QUERY_TIMEOUT, cancel).await {
        Ok(run) if run.success() => run.stdout,
        _ => return,
    };
    let alive = |pid: u32| Path::new("/proc").join(pid.to_string()).exists();
    for name in orphaned_domains(&list, std::process::id(), alive) {
        tracing::warn!(domain = %name, "destroying a domain left by a provider that died");
        if let Err(e) = xl
            .run_retrying(&["destroy", name.as_str()], QUERY_TIMEOUT, cancel)
            .await
        {
            tracing::warn!(domain = %name, "could not destroy it: {e}");
        }
    }
}

/// The names in `xl list` output made by a provider process (see
/// [`super::domain::domain_name`]) that is neither `own_pid` nor `alive`.
fn orphaned_domains(list: &str, own_pid: u32, alive: impl Fn(u32) -> bool) -> Vec<String> {
    list.lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter_map(|name| {
            let pid: u32 = name
                .strip_prefix(DOMAIN_PREFIX)?
                .split('-')
                .next()?
                .parse()
                .ok()?;
            (pid != own_pid && !alive(pid)).then(|| name.to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orphans_are_domains_of_dead_provider_processes_only() {
        let list = "Name                                        ID   Mem VCPUs\tState\tTime(s)\n\
                    Domain-0                                     0  1024     2     r-----      50.1\n\
                    vmlot-100-0-0badcafe                         1   128     1     -b----       3.0\n\
                    vmlot-200-4-deadbeef                         2   128     1     -b----       3.0\n\
                    vmlot-300-1-feedf00d                         3   128     1     -b----       3.0\n\
                    vmlot-x-1-feedf00d                           4   128     1     -b----       3.0\n\
                    someone-else                                 5   128     1     -b----       3.0\n";
        // 100 is this provider, 200 another live one, 300 dead.
        let orphans = orphaned_domains(list, 100, |pid| pid == 200);
        assert_eq!(orphans, vec!["vmlot-300-1-feedf00d".to_string()]);
    }
}
