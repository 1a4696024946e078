//! Member counts over time: for every tag and saved audience, its member
//! count once a day, as a series a dashboard can plot (how a tag grows or
//! shrinks). The server records a day's counts once, when the day begins;
//! points older than the retention are dropped when a day is recorded.
//! Kept whole in memory (a few bytes a point), written by a checkpoint into
//! its segment when it changed, and read back at start-up.
//!
//! This room owns the series and their bytes; the server decides when a
//! day is recorded and counts the audiences, `state::apply` records it.

use std::collections::BTreeMap;

use crate::storage::codec::{Dec, DecResult, Enc};

/// Version of [`History::encode`].
const VERSION: u8 = 1;

/// Every name's series of (local day, member count), oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    series: BTreeMap<String, Vec<(i32, u64)>>,
    /// The newest day recorded (0: none).
    last_day: i32,
}

impl History {
    pub fn is_empty(&self) -> bool {
        self.series.is_empty()
    }

    /// The newest day recorded, if any.
    pub fn last_day(&self) -> Option<i32> {
        (self.last_day != 0).then_some(self.last_day)
    }

    /// `name`'s points on days `from..` (oldest first).
    pub fn series(&self, name: &str, from: i32) -> Vec<(i32, u64)> {
        self.series
            .get(name)
            .map(|s| s.iter().copied().filter(|(d, _)| *d >= from).collect())
            .unwrap_or_default()
    }

    /// Records the counts of day `day`, replacing any of that day, and
    /// drops every point before `keep_from` (and names left with none).
    pub fn record(&mut self, day: i32, counts: &[(String, u64)], keep_from: i32) {
        for (name, count) in counts {
            let s = self.series.entry(name.clone()).or_default();
            match s.binary_search_by_key(&day, |(d, _)| *d) {
                Ok(i) => s[i].1 = *count,
                Err(i) => s.insert(i, (day, *count)),
            }
        }
        for s in self.series.values_mut() {
            s.retain(|(d, _)| *d >= keep_from);
        }
        self.series.retain(|_, s| !s.is_empty());
        self.last_day = self.last_day.max(day);
    }

    /// Forgets the series of `name` (a tag or audience dropped).
    pub fn forget(&mut self, name: &str) -> bool {
        self.series.remove(name).is_some()
    }

    /// The series as a segment stores them (`storage-format.md`, "History").
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::new();
        e.u8(VERSION)
            .i64(i64::from(self.last_day))
            .u32(self.series.len() as u32);
        for (name, points) in &self.series {
            e.str(name).u32(points.len() as u32);
            for (day, count) in points {
                e.i64(i64::from(*day)).u64(*count);
            }
        }
        e.buf
    }

    pub fn decode(bytes: &[u8]) -> DecResult<History> {
        let mut d = Dec::new(bytes);
        let version = d.u8()?;
        if version != VERSION {
            return d.err(format!("unsupported history version {version}"));
        }
        let day = |d: &mut Dec<'_>| -> DecResult<i32> {
            let v = d.i64()?;
            i32::try_from(v).or_else(|_| d.err(format!("day {v} out of range")))
        };
        let last_day = day(&mut d)?;
        let mut series = BTreeMap::new();
        for _ in 0..d.u32()? {
            let name = d.str()?.to_string();
            let mut points: Vec<(i32, u64)> = Vec::new();
            for _ in 0..d.u32()? {
                let p = (day(&mut d)?, d.u64()?);
                if points.last().is_some_and(|(last, _)| *last >= p.0) {
                    return d.err(format!("the days of {name:?} are out of order"));
                }
                points.push(p);
            }
            series.insert(name, points);
        }
        d.finish()?;
        Ok(History { series, last_day })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_are_recorded_replaced_and_dropped_past_retention() {
        let mut h = History::default();
        assert_eq!(h.last_day(), None);
        h.record(100, &[("a".into(), 5), ("b".into(), 1)], 0);
        h.record(101, &[("a".into(), 7)], 0);
        h.record(101, &[("a".into(), 8)], 0);
        assert_eq!(h.series("a", 0), [(100, 5), (101, 8)]);
        assert_eq!(h.series("a", 101), [(101, 8)]);
        assert_eq!(h.last_day(), Some(101));
        let back = History::decode(&h.encode()).unwrap();
        assert_eq!(back, h);
        assert!(History::decode(&h.encode()[..5]).is_err());
        // Retention: b's only point goes, and b with it.
        h.record(102, &[("a".into(), 9)], 101);
        assert_eq!(h.series("a", 0), [(101, 8), (102, 9)]);
        assert!(h.series("b", 0).is_empty());
        assert!(h.forget("a"));
        assert!(h.is_empty());
    }
}
