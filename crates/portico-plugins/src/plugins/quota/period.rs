//! Calendar periods of `quota`: a day (midnight to midnight) or a month (from the
//! billing anchor day to the same day of the next month), in a time zone, with its
//! daylight-saving days (a day is then 23 or 25 hours long). Times are Unix seconds.

use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::Timestamp;
use schemars::JsonSchema;
use serde::Deserialize;

/// The length of a quota period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Per {
    /// From midnight to midnight in the time zone.
    Day,
    /// From the anchor day (default the 1st) at midnight to the same day of the
    /// next month.
    Month,
}

impl Per {
    pub fn as_str(self) -> &'static str {
        match self {
            Per::Day => "day",
            Per::Month => "month",
        }
    }
}

/// The calendar periods are counted in.
#[derive(Debug, Clone)]
pub struct Calendar {
    tz: TimeZone,
    /// The day months start on (1-28).
    anchor: i8,
}

/// Wall-clock time in Unix seconds, injectable so tests choose the date.
pub trait WallClock: Send + Sync + 'static {
    fn now_secs(&self) -> i64;
}

/// The system's clock.
pub struct SystemWallClock;

impl WallClock for SystemWallClock {
    fn now_secs(&self) -> i64 {
        Timestamp::now().as_second()
    }
}

/// A wall clock that moves only when told to (tests).
#[derive(Default)]
pub struct ManualWallClock(std::sync::atomic::AtomicI64);

impl ManualWallClock {
    pub fn at(secs: i64) -> Self {
        ManualWallClock(std::sync::atomic::AtomicI64::new(secs))
    }
    pub fn set(&self, secs: i64) {
        self.0.store(secs, std::sync::atomic::Ordering::Relaxed);
    }
    pub fn advance(&self, secs: i64) {
        self.0.fetch_add(secs, std::sync::atomic::Ordering::Relaxed);
    }
}

impl WallClock for ManualWallClock {
    fn now_secs(&self) -> i64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Calendar {
    /// `time_zone`: an IANA name (`Europe/Paris`) or `UTC`; `anchor`: 1-28.
    pub fn new(time_zone: &str, anchor: i8) -> Result<Calendar, String> {
        let tz = TimeZone::get(time_zone)
            .map_err(|e| format!("`{time_zone}` is not a known IANA time zone: {e}"))?;
        if !(1..=28).contains(&anchor) {
            return Err(
                "must be from 1 to 28 (every month has that day); use 1 for calendar months".into(),
            );
        }
        Ok(Calendar { tz, anchor })
    }

    pub fn utc() -> Calendar {
        Calendar {
            tz: TimeZone::UTC,
            anchor: 1,
        }
    }

    /// The period of `per` that contains `now`: `(start, end)`, end excluded.
    pub fn period(&self, per: Per, now: i64) -> (i64, i64) {
        let r = (|| -> Result<(i64, i64), jiff::Error> {
            let local = Timestamp::from_second(now)?.to_zoned_datetime(self.tz.clone());
            let today = local.date();
            let (start, end) = match per {
                Per::Day => (today, today.tomorrow()?),
                Per::Month => {
                    let this = Date::new(today.year(), today.month(), self.anchor)?;
                    let start = if today >= this {
                        this
                    } else {
                        shift_month(this, -1)?
                    };
                    (start, shift_month(start, 1)?)
                }
            };
            Ok((self.midnight(start)?, self.midnight(end)?))
        })();
        // Only reachable at the ends of jiff's range (year ±9999): one-day periods.
        r.unwrap_or_else(|_| {
            let start = now.div_euclid(86400) * 86400;
            (start, start + 86400)
        })
    }

    /// The first instant of `day` in the time zone (01:00 where midnight is skipped).
    fn midnight(&self, day: Date) -> Result<i64, jiff::Error> {
        Ok(day
            .to_zoned_datetime(self.tz.clone())?
            .start_of_day()?
            .timestamp()
            .as_second())
    }
}

/// The same day (at most 28) `months` months later or earlier.
fn shift_month(d: Date, months: i32) -> Result<Date, jiff::Error> {
    let index = i32::from(d.year()) * 12 + i32::from(d.month()) - 1 + months;
    let year = i16::try_from(index.div_euclid(12)).unwrap_or(i16::MAX);
    let month = (index.rem_euclid(12) + 1) as i8;
    Date::new(year, month, d.day())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ts(s: &str) -> i64 {
        s.parse::<Timestamp>().unwrap().as_second()
    }

    fn show(p: (i64, i64)) -> (String, String) {
        let f = |t: i64| Timestamp::from_second(t).unwrap().to_string();
        (f(p.0), f(p.1))
    }

    #[test]
    fn utc_days_and_months() {
        let c = Calendar::utc();
        assert_eq!(
            show(c.period(Per::Day, ts("2026-03-05T13:45:00Z"))),
            ("2026-03-05T00:00:00Z".into(), "2026-03-06T00:00:00Z".into())
        );
        // Midnight belongs to the day it starts.
        assert_eq!(
            show(c.period(Per::Day, ts("2026-03-06T00:00:00Z"))).0,
            "2026-03-06T00:00:00Z"
        );
        assert_eq!(
            show(c.period(Per::Month, ts("2026-02-28T23:59:59Z"))),
            ("2026-02-01T00:00:00Z".into(), "2026-03-01T00:00:00Z".into())
        );
        // December rolls into the next year.
        assert_eq!(
            show(c.period(Per::Month, ts("2026-12-31T12:00:00Z"))),
            ("2026-12-01T00:00:00Z".into(), "2027-01-01T00:00:00Z".into())
        );
    }

    #[test]
    fn dst_days_are_23_and_25_hours() {
        let c = Calendar::new("Europe/Paris", 1).unwrap();
        // 2026-03-29: clocks go from 02:00 to 03:00 in Paris.
        let (s, e) = c.period(Per::Day, ts("2026-03-29T12:00:00Z"));
        assert_eq!(
            show((s, e)),
            ("2026-03-28T23:00:00Z".into(), "2026-03-29T22:00:00Z".into())
        );
        assert_eq!(e - s, 23 * 3600);
        // 2026-10-25: back from 03:00 to 02:00.
        let (s, e) = c.period(Per::Day, ts("2026-10-25T12:00:00Z"));
        assert_eq!(e - s, 25 * 3600);
        // Just before local midnight is still the previous day.
        let (s, _) = c.period(Per::Day, ts("2026-07-01T21:59:59Z"));
        assert_eq!(show((s, s)).0, "2026-06-30T22:00:00Z");
        // A month in Paris starts at local midnight (UTC+1 in winter).
        assert_eq!(
            show(c.period(Per::Month, ts("2026-01-31T23:30:00Z"))),
            ("2026-01-31T23:00:00Z".into(), "2026-02-28T23:00:00Z".into())
        );
        // A month that spans the spring change is an hour short.
        let (s, e) = c.period(Per::Month, ts("2026-03-15T00:00:00Z"));
        assert_eq!(e - s, 31 * 86400 - 3600);
    }

    #[test]
    fn anchor_day_months() {
        let c = Calendar::new("UTC", 15).unwrap();
        assert_eq!(
            show(c.period(Per::Month, ts("2026-03-20T00:00:00Z"))),
            ("2026-03-15T00:00:00Z".into(), "2026-04-15T00:00:00Z".into())
        );
        // Before the anchor: the period started last month.
        assert_eq!(
            show(c.period(Per::Month, ts("2026-03-14T23:59:59Z"))),
            ("2026-02-15T00:00:00Z".into(), "2026-03-15T00:00:00Z".into())
        );
        assert_eq!(
            show(c.period(Per::Month, ts("2026-01-10T00:00:00Z"))),
            ("2025-12-15T00:00:00Z".into(), "2026-01-15T00:00:00Z".into())
        );
        // Anchor 28 works in February of a common year.
        let c = Calendar::new("UTC", 28).unwrap();
        assert_eq!(
            show(c.period(Per::Month, ts("2026-03-01T00:00:00Z"))),
            ("2026-02-28T00:00:00Z".into(), "2026-03-28T00:00:00Z".into())
        );
        // Days ignore the anchor.
        assert_eq!(
            show(c.period(Per::Day, ts("2026-03-01T05:00:00Z"))).0,
            "2026-03-01T00:00:00Z"
        );
    }

    #[test]
    fn invalid_settings() {
        assert!(Calendar::new("UTC", 31).is_err());
        assert!(Calendar::new("UTC", 29).is_err());
        assert!(Calendar::new("UTC", 0).is_err());
        assert!(Calendar::new("Mars/Olympus", 1).is_err());
        assert!(Calendar::new("America/New_York", 28).is_ok());
    }
}
