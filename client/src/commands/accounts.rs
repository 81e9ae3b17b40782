//! Accounts and times as people type them: `alice`, `provider:NAME`,
//! `escrow:JOB`, `2026-11`, `2026-11-25T10:00:00Z`. A provider named rather
//! than given by id is looked up among those the broker has heard from.

use anyhow::{Context as _, Result, bail};
use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use vmlot_schemas::ProviderId;
use vmlot_schemas::ledger::Account;

use crate::context::Context;

/// A time as typed: RFC 3339, or a date meaning its midnight UTC.
pub fn parse_time(text: &str) -> Result<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&Utc));
    }
    let date = NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .with_context(|| format!("{text:?} is neither RFC 3339 nor YYYY-MM-DD"))?;
    Ok(Utc.from_utc_datetime(&date.and_hms_opt(0, 0, 0).expect("midnight")))
}

/// A period as typed: `2026-11` (a month), `2026` (a year) or `2026-11-25` (a day).
pub fn parse_period(text: &str) -> Result<(DateTime<Utc>, DateTime<Utc>)> {
    let midnight = |d: NaiveDate| Utc.from_utc_datetime(&d.and_hms_opt(0, 0, 0).expect("midnight"));
    let parts: Vec<&str> = text.split('-').collect();
    let num = |s: &str| s.parse::<u32>().with_context(|| format!("bad period {text:?}"));
    let (from, until) = match parts[..] {
        [y] => {
            let y = num(y)? as i32;
            (
                NaiveDate::from_ymd_opt(y, 1, 1),
                NaiveDate::from_ymd_opt(y + 1, 1, 1),
            )
        }
        [y, m] => {
            let (y, m) = (num(y)? as i32, num(m)?);
            let from = NaiveDate::from_ymd_opt(y, m, 1);
            (
                from,
                from.and_then(|d| d.checked_add_months(chrono::Months::new(1))),
            )
        }
        [_, _, _] => {
            let d = NaiveDate::parse_from_str(text, "%Y-%m-%d").ok();
            (d, d.and_then(|d| d.succ_opt()))
        }
        _ => (None, None),
    };
    match (from, until) {
        (Some(f), Some(u)) => Ok((midnight(f), midnight(u))),
        _ => bail!("bad period {text:?}: want YYYY, YYYY-MM or YYYY-MM-DD"),
    }
}

/// An account as typed. A bare name is a user; `provider:NAME` is looked
/// up among the providers the broker has seen.
pub async fn resolve_account(ctx: &Context, text: &str) -> Result<Account> {
    if let Ok(account) = text.parse::<Account>() {
        return Ok(account);
    }
    if let Some(name) = text.strip_prefix("provider:") {
        return Ok(Account::Provider(resolve_provider(ctx, name).await?));
    }
    if vmlot_schemas::ledger::valid_user_name(text) {
        return Ok(Account::User(text.to_string()));
    }
    bail!(vmlot_schemas::ledger::BadAccount(text.to_string()))
}

/// A provider as typed: its id, or the name of one the broker has heard from.
pub async fn resolve_provider(ctx: &Context, text: &str) -> Result<ProviderId> {
    if let Ok(id) = text.parse() {
        return Ok(id);
    }
    let live = ctx.api().await?.providers().await?;
    match live.iter().filter(|p| p.name == text).collect::<Vec<_>>()[..] {
        [one] => Ok(one.provider),
        [] => bail!("no provider named {text:?} is on the market now; give its id"),
        _ => bail!("several providers are named {text:?}; give its id"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Datelike;

    #[test]
    fn periods_and_times_parse_as_people_type_them() {
        let (f, u) = parse_period("2026-11").unwrap();
        assert_eq!(f.to_rfc3339(), "2026-11-01T00:00:00+00:00");
        assert_eq!(u.to_rfc3339(), "2026-12-01T00:00:00+00:00");
        let (f, u) = parse_period("2026-12").unwrap();
        assert_eq!((f.month(), u.year(), u.month()), (12, 2027, 1));
        let (f, u) = parse_period("2026-11-25").unwrap();
        assert_eq!((f.day(), u.day()), (25, 26));
        assert_eq!(parse_period("2026").unwrap().1.year(), 2027);
        for bad in ["2026-13", "nov", "2026-11-31", "2026-1-2-3", ""] {
            assert!(parse_period(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            parse_time("2026-11-25").unwrap().to_rfc3339(),
            "2026-11-25T00:00:00+00:00"
        );
        assert_eq!(
            parse_time("2026-11-25T10:00:00+02:00").unwrap().to_rfc3339(),
            "2026-11-25T08:00:00+00:00"
        );
        assert!(parse_time("yesterday").is_err());
    }
}
