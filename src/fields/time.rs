//! Calendar arithmetic for time-bucketed behaviour fields: local dates as
//! day numbers (days since 1970-01-01), months as month numbers (months since
//! 1970-01), and the slot numbers that name their bitmaps.
//!
//! Local dates come from a field's IANA time zone (the tz database is built
//! into the binary, so a machine without `/usr/share/zoneinfo` works the same).

use jiff::Timestamp;
use jiff::tz::TimeZone;

use crate::error::{Error, Result};

/// Day slots are day numbers below this; month slots are this plus the month number.
pub const MONTH_BASE: u32 = 1 << 19;
/// Largest day number a slot can name (year 3405).
pub const MAX_DAY: i32 = MONTH_BASE as i32 - 1;

/// Zones looked up so far, by name: reading one from the tz database costs
/// far more than a query over a few customers (the query compiler and the
/// rules look up a field's zone every time). Bounded: past this many names
/// a zone is read every time.
static ZONES: std::sync::LazyLock<
    parking_lot::RwLock<std::collections::HashMap<String, TimeZone>>,
> = std::sync::LazyLock::new(Default::default);
const MAX_CACHED_ZONES: usize = 256;

/// Looks up a time zone by IANA name ("Asia/Shanghai", "UTC").
pub fn zone(name: &str) -> Result<TimeZone> {
    if let Some(tz) = ZONES.read().get(name) {
        return Ok(tz.clone());
    }
    let tz = read_zone(name)?;
    let mut zones = ZONES.write();
    if zones.len() < MAX_CACHED_ZONES {
        zones.insert(name.to_string(), tz.clone());
    }
    Ok(tz)
}

fn read_zone(name: &str) -> Result<TimeZone> {
    // Names whose meaning depends on the host (or that mean "no zone"): a
    // field's days must not change when the store moves to another machine.
    if HOST_DEPENDENT_ZONES
        .iter()
        .any(|z| z.eq_ignore_ascii_case(name))
        || name.starts_with('/')
    {
        return Err(Error::invalid(format!(
            "time zone {name:?} is not allowed: give an IANA region name such as \
             \"Asia/Shanghai\" or \"UTC\""
        )));
    }
    TimeZone::get(name).map_err(|e| Error::invalid(format!("unknown time zone {name:?}: {e}")))
}

/// The default zone ([`DEFAULT_TIME_ZONE`](crate::fields::DEFAULT_TIME_ZONE)),
/// from the tz database built into the binary.
pub fn default_zone() -> TimeZone {
    zone(crate::fields::DEFAULT_TIME_ZONE).unwrap_or(TimeZone::UTC)
}

/// Zone names refused by [`zone`].
const HOST_DEPENDENT_ZONES: &[&str] = &["localtime", "Factory", "posixrules", "posix/Factory"];

/// Day number of the proleptic Gregorian date `y-m-d`.
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date `(y, m, d)` of a day number.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Parses `YYYY-MM-DD` into a day number.
pub fn parse_date(s: &str) -> Option<i32> {
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        let part = s.get(r)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if !(1..=12).contains(&m) || d == 0 || d > days_in_month(i64::from(y), m) {
        return None;
    }
    i32::try_from(days_from_civil(i64::from(y), m, d)).ok()
}

/// `YYYY-MM-DD` of a day number.
pub fn format_day(day: i32) -> String {
    let (y, m, d) = civil_from_days(i64::from(day));
    format!("{y:04}-{m:02}-{d:02}")
}

/// `YYYY-MM` of a month number.
pub fn format_month(month: u32) -> String {
    format!("{:04}-{:02}", 1970 + month / 12, month % 12 + 1)
}

/// An instant (Unix milliseconds) as RFC 3339 in UTC, for messages; the
/// number itself when it is out of range.
pub fn format_ms(ms: i64) -> String {
    Timestamp::from_millisecond(ms).map_or_else(|_| format!("{ms} ms"), |t| t.to_string())
}

/// The local day number of an instant (Unix milliseconds) in `tz`.
pub fn day_of(ms: i64, tz: &TimeZone) -> Result<i32> {
    let ts = Timestamp::from_millisecond(ms)
        .map_err(|e| Error::invalid(format!("event time {ms} ms is out of range: {e}")))?;
    let date = tz.to_datetime(ts).date();
    let day = days_from_civil(
        i64::from(date.year()),
        date.month() as u32,
        date.day() as u32,
    );
    Ok(day as i32)
}

/// The first instant (Unix milliseconds) of local day `day` in `tz`: its
/// midnight, or the first moment after a gap that skips it.
pub fn day_start_ms(day: i32, tz: &TimeZone) -> Result<i64> {
    let (y, m, d) = civil_from_days(i64::from(day));
    let out_of_range = |e: jiff::Error| Error::invalid(format!("day {day} is out of range: {e}"));
    let date = jiff::civil::Date::new(
        i16::try_from(y).map_err(|_| Error::invalid(format!("day {day} is out of range")))?,
        m as i8,
        d as i8,
    )
    .map_err(out_of_range)?;
    let start = tz
        .to_timestamp(date.to_datetime(jiff::civil::Time::midnight()))
        .map_err(out_of_range)?;
    Ok(start.as_millisecond())
}

/// Month number (months since 1970-01) of a day number (≥ 0).
pub fn month_of(day: i32) -> u32 {
    let (y, m, _) = civil_from_days(i64::from(day));
    ((y - 1970) * 12 + i64::from(m) - 1) as u32
}

/// First day number of a month.
pub fn month_first_day(month: u32) -> i32 {
    days_from_civil(1970 + i64::from(month / 12), month % 12 + 1, 1) as i32
}

/// Last day number of a month.
pub fn month_last_day(month: u32) -> i32 {
    month_first_day(month + 1) - 1
}

/// What a slot of a behaviour field names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bucket {
    Day(i32),
    Month(u32),
}

impl Bucket {
    pub fn slot(self) -> u32 {
        match self {
            Bucket::Day(d) => d as u32,
            Bucket::Month(m) => MONTH_BASE + m,
        }
    }

    pub fn of_slot(slot: u32) -> Bucket {
        if slot >= MONTH_BASE {
            Bucket::Month(slot - MONTH_BASE)
        } else {
            Bucket::Day(slot as i32)
        }
    }

    /// The last day the bucket covers.
    pub fn last_day(self) -> i32 {
        match self {
            Bucket::Day(d) => d,
            Bucket::Month(m) => month_last_day(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_round_trips() {
        for day in -800_000..800_000 {
            if day % 997 != 0 && !(-1000..1000).contains(&day) {
                continue;
            }
            let (y, m, d) = civil_from_days(day);
            assert_eq!(days_from_civil(y, m, d), day);
        }
        assert_eq!(parse_date("1970-01-01"), Some(0));
        assert_eq!(parse_date("2026-11-28"), Some(20_785));
        assert_eq!(format_day(20_785), "2026-11-28");
        assert_eq!(
            parse_date("2024-02-29").map(format_day).as_deref(),
            Some("2024-02-29")
        );
        assert_eq!(parse_date("2026-02-29"), None);
        assert_eq!(parse_date("2026-13-01"), None);
        assert_eq!(parse_date("2026-1-01"), None);
        assert_eq!(month_of(20_785), (2026 - 1970) * 12 + 10);
        assert_eq!(format_month(month_of(20_785)), "2026-11");
        assert_eq!(format_day(month_first_day(month_of(20_785))), "2026-11-01");
        assert_eq!(format_day(month_last_day(month_of(20_785))), "2026-11-30");
    }

    #[test]
    fn local_days_in_shanghai() {
        let tz = zone("Asia/Shanghai").unwrap();
        // 2026-11-27T15:59:59.999Z is 23:59:59.999 on the 27th in Shanghai.
        let midnight_utc = parse_date("2026-11-28").unwrap() as i64 * 86_400_000;
        let shanghai_midnight = midnight_utc - 8 * 3_600_000;
        assert_eq!(
            format_day(day_of(shanghai_midnight - 1, &tz).unwrap()),
            "2026-11-27"
        );
        assert_eq!(
            format_day(day_of(shanghai_midnight, &tz).unwrap()),
            "2026-11-28"
        );
        let utc = zone("UTC").unwrap();
        assert_eq!(
            format_day(day_of(shanghai_midnight, &utc).unwrap()),
            "2026-11-27"
        );
        assert!(zone("Mars/Olympus").is_err());
    }
}
