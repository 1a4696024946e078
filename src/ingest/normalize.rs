//! Normalisation of the values channel exports carry: times, amounts, phone
//! numbers, e-mail addresses and other identifiers, each into the one form
//! the event model keeps. Every function here is pure and exact (amounts
//! never pass through floating point), and each refusal says what is wrong
//! with the value, in words an operator can act on.
//!
//! This room owns reading one value. It knows nothing of files, sources,
//! customers or the store.

use jiff::Timestamp;
use jiff::civil::DateTime;
use jiff::tz::TimeZone;

/// Why a value was refused: the text goes into the reject report beside the
/// record's position.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

fn refused(msg: impl Into<String>) -> Refused {
    Refused(msg.into())
}

/// Longest value (in bytes) any normaliser looks at; longer is refused
/// before it is parsed.
pub const MAX_VALUE_BYTES: usize = 1024;

/// Epoch numbers at least this large are milliseconds; smaller ones are
/// seconds. 10^11 seconds is the year 5138; 10^11 ms is 1973-03-03.
const MS_FROM: i64 = 100_000_000_000;

/// How a source writes its times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeForm {
    /// Whatever the value looks like: an epoch number (seconds or
    /// milliseconds, told apart by size), RFC 3339 with an offset, or a local
    /// date and time in the source's zone.
    Auto,
    EpochSeconds,
    EpochMillis,
}

/// A time as Unix milliseconds.
///
/// Accepted (with [`TimeForm::Auto`]): `1794398405` (seconds),
/// `1794398405000` (milliseconds), `2026-11-11T20:00:05+08:00`,
/// `2026-11-11T12:00:05Z` (any RFC 3339 offset), and local times in `zone`:
/// `2026-11-11 20:00:05`, `2026-11-11T20:00:05.250`, `2026/11/11 20:00`,
/// `2026-11-11` (midnight). A local time that a zone's clock change skips or
/// repeats takes the earlier instant.
pub fn time_ms(value: &str, form: TimeForm, zone: &TimeZone) -> Result<i64, Refused> {
    let v = trimmed(value, "time")?;
    let as_number = || -> Result<i64, Refused> {
        v.parse::<i64>()
            .map_err(|_| refused(format!("time {v:?} is not a whole number")))
    };
    let ms = match form {
        TimeForm::EpochSeconds => as_number()?
            .checked_mul(1000)
            .ok_or_else(|| refused(format!("time {v:?} is out of range")))?,
        TimeForm::EpochMillis => as_number()?,
        TimeForm::Auto if v.bytes().all(|b| b.is_ascii_digit()) => {
            let n = as_number()?;
            if n >= MS_FROM { n } else { n * 1000 }
        }
        TimeForm::Auto => text_time_ms(v, zone)?,
    };
    if !(0..=MAX_TIME_MS).contains(&ms) {
        return Err(refused(format!("time {v:?} is before 1970 or after 9999")));
    }
    Ok(ms)
}

/// 9999-12-31T23:59:59.999Z.
const MAX_TIME_MS: i64 = 253_402_300_799_999;

fn text_time_ms(v: &str, zone: &TimeZone) -> Result<i64, Refused> {
    let explain = || {
        refused(format!(
            "time {v:?} is not a time (expected e.g. 2026-11-11 20:00:05, \
             2026-11-11T20:00:05+08:00 or Unix seconds or milliseconds)"
        ))
    };
    if has_offset(v) {
        let t: Timestamp = v.parse().map_err(|_| explain())?;
        return Ok(t.as_millisecond());
    }
    // Local: dashes or slashes between the date's parts, a space or a `T`
    // before the time, which may lack its seconds.
    let mut s = v.replace('/', "-");
    if let Some(i) = s.find(' ') {
        s.replace_range(i..i + 1, "T");
    }
    let dt: DateTime = if s.contains('T') {
        let (date, time) = s.split_once('T').ok_or_else(explain)?;
        let time = if time.len() == 5 {
            format!("{time}:00")
        } else {
            time.to_string()
        };
        format!("{}T{time}", padded_date(date).ok_or_else(explain)?)
            .parse()
            .map_err(|_| explain())?
    } else {
        format!("{}T00:00:00", padded_date(&s).ok_or_else(explain)?)
            .parse()
            .map_err(|_| explain())?
    };
    let t = zone
        .to_ambiguous_timestamp(dt)
        .earlier()
        .map_err(|_| explain())?;
    Ok(t.as_millisecond())
}

/// `2026-1-5` as `2026-01-05` (some exports drop the zeros).
fn padded_date(date: &str) -> Option<String> {
    let mut parts = date.split('-');
    let (y, m, d) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || y.len() != 4 || m.is_empty() || d.is_empty() {
        return None;
    }
    if m.len() > 2 || d.len() > 2 {
        return None;
    }
    Some(format!("{y}-{m:0>2}-{d:0>2}"))
}

/// Whether a time's text ends with an offset (`Z`, `+08:00`, `-0500`).
fn has_offset(v: &str) -> bool {
    if v.ends_with('Z') || v.ends_with('z') {
        return true;
    }
    // An offset sign after the time part (a date's dashes come before `T`).
    match v.find(['T', ' ']) {
        Some(t) => v[t..].contains(['+', '-']),
        None => false,
    }
}

/// How a source writes its amounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AmountUnit {
    /// Yuan, with at most two decimal places: `¥1,299.00`, `1299.5`,
    /// `-35`, `1299.50元`.
    Yuan,
    /// Whole fen: `129900`.
    Fen,
}

/// An amount in fen (1/100 yuan), exactly.
///
/// Currency signs (`¥`, `￥`, `RMB`, `CNY`, `元`), spaces and thousands
/// separators are dropped; a sign may lead. Yuan with more than two
/// significant decimal places are refused rather than rounded.
pub fn amount_fen(value: &str, unit: AmountUnit) -> Result<i64, Refused> {
    let v = trimmed(value, "amount")?;
    let mut s: String = v
        .chars()
        .filter(|c| !matches!(c, ',' | ' ' | '¥' | '￥' | '元' | '\u{a0}'))
        .collect();
    for word in ["RMB", "CNY", "rmb", "cny"] {
        s = s.replace(word, "");
    }
    let (negative, digits) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s.strip_prefix('+').unwrap_or(&s)),
    };
    let bad = || refused(format!("amount {v:?} is not a number of yuan or fen"));
    let (whole, frac) = match digits.split_once('.') {
        Some((w, f)) => (w, f),
        None => (digits, ""),
    };
    if whole.is_empty() && frac.is_empty() {
        return Err(bad());
    }
    if !whole.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let fen = match unit {
        AmountUnit::Fen => {
            if frac.bytes().any(|b| b != b'0') {
                return Err(refused(format!(
                    "amount {v:?} has a fraction of a fen (the source's amounts are in fen)"
                )));
            }
            parse_digits(whole).ok_or_else(|| refused(format!("amount {v:?} is out of range")))?
        }
        AmountUnit::Yuan => {
            let frac = frac.trim_end_matches('0');
            if frac.len() > 2 {
                return Err(refused(format!(
                    "amount {v:?} has more than two decimal places (a fraction of a fen)"
                )));
            }
            let yuan = parse_digits(whole)
                .ok_or_else(|| refused(format!("amount {v:?} is out of range")))?;
            let cents = format!("{frac:0<2}");
            let cents: i64 = cents.parse().map_err(|_| bad())?;
            yuan.checked_mul(100)
                .and_then(|f| f.checked_add(cents))
                .ok_or_else(|| refused(format!("amount {v:?} is out of range")))?
        }
    };
    Ok(if negative { -fen } else { fen })
}

/// A run of ASCII digits (possibly empty, meaning 0) as an i64.
fn parse_digits(d: &str) -> Option<i64> {
    if d.is_empty() {
        return Some(0);
    }
    d.parse().ok()
}

/// A mainland China mobile number in its one form: 11 digits, `1[3-9]…`.
///
/// `+86 138-1234-5678`, `0086 13812345678`, `86-13812345678` and
/// `(138) 1234 5678` all become `13812345678`. Masked numbers such as
/// `138****5678` (marketplace exports hide the middle digits) and numbers
/// that are not mobile numbers are refused.
pub fn phone(value: &str) -> Result<String, Refused> {
    let v = trimmed(value, "phone number")?;
    if v.contains('*') {
        return Err(refused(format!(
            "phone number {v:?} is masked: it cannot identify a customer"
        )));
    }
    let mut digits = String::with_capacity(v.len());
    for (i, c) in v.char_indices() {
        match c {
            '0'..='9' => digits.push(c),
            ' ' | '-' | '(' | ')' | '.' | '\u{a0}' => {}
            '+' if i == 0 => {}
            _ => {
                return Err(refused(format!(
                    "phone number {v:?} has a character that is not a digit: {c:?}"
                )));
            }
        }
    }
    let international = v.starts_with('+') || digits.starts_with("00");
    if international && !(digits.starts_with("86") || digits.starts_with("0086")) {
        return Err(refused(format!(
            "phone number {v:?} is not a mainland number (its country code is not 86)"
        )));
    }
    let national = if digits.len() == 15 && digits.starts_with("0086") {
        &digits[4..]
    } else if digits.len() == 13 && digits.starts_with("86") {
        &digits[2..]
    } else {
        &digits[..]
    };
    let b = national.as_bytes();
    if b.len() != 11 || b[0] != b'1' || !(b'3'..=b'9').contains(&b[1]) {
        return Err(refused(format!(
            "phone number {v:?} is not a mainland mobile number (11 digits starting 13–19, \
             optionally after +86 or 0086)"
        )));
    }
    Ok(national.to_string())
}

/// An e-mail address: trimmed and lower-cased (addresses are matched
/// without regard to case in practice); one `@` with text on both sides
/// and a dot in the domain.
pub fn email(value: &str) -> Result<String, Refused> {
    let v = trimmed(value, "e-mail address")?;
    let lower = v.to_lowercase();
    match lower.split_once('@') {
        Some((local, domain))
            if !local.is_empty()
                && !domain.is_empty()
                && !domain.contains('@')
                && domain.contains('.')
                && !lower.chars().any(char::is_whitespace) =>
        {
            Ok(lower)
        }
        _ => Err(refused(format!("{v:?} is not an e-mail address"))),
    }
}

/// Any other identifier: trimmed, lower-cased when the identity type is
/// case-insensitive, without control characters.
pub fn identifier(value: &str, what: &str, case_insensitive: bool) -> Result<String, Refused> {
    let v = trimmed(value, what)?;
    if v.chars().any(char::is_control) {
        return Err(refused(format!(
            "{what} {v:?} contains a control character"
        )));
    }
    Ok(if case_insensitive {
        v.to_lowercase()
    } else {
        v.to_string()
    })
}

/// Free text (a title, a note): trimmed; line breaks and tabs are kept,
/// other control characters refused.
pub fn text(value: &str, what: &str) -> Result<String, Refused> {
    let v = trimmed(value, what)?;
    if v.chars()
        .any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
    {
        return Err(refused(format!(
            "{what} {v:?} contains a control character"
        )));
    }
    Ok(v.to_string())
}

/// The value without surrounding white space (including the full-width
/// space of Chinese exports); refused if empty or over [`MAX_VALUE_BYTES`].
fn trimmed<'v>(value: &'v str, what: &str) -> Result<&'v str, Refused> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(refused(format!(
            "{what} is {} bytes long; at most {MAX_VALUE_BYTES} are read",
            value.len()
        )));
    }
    let v = value.trim_matches(|c: char| c.is_whitespace() || c == '\u{3000}');
    if v.is_empty() {
        return Err(refused(format!("{what} is empty")));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shanghai() -> TimeZone {
        TimeZone::get("Asia/Shanghai").unwrap()
    }

    #[test]
    fn times_in_every_form_agree() {
        let z = shanghai();
        // 2026-11-11 20:00:05 in Shanghai is 12:00:05 UTC.
        let want = 1_794_398_405_000;
        for v in [
            "1794398405",
            "1794398405000",
            "2026-11-11 20:00:05",
            " 2026-11-11T20:00:05 ",
            "2026/11/11 20:00:05",
            "2026-11-11T20:00:05+08:00",
            "2026-11-11T12:00:05Z",
            "2026-11-11T07:00:05-05:00",
        ] {
            assert_eq!(time_ms(v, TimeForm::Auto, &z), Ok(want), "{v}");
        }
        assert_eq!(
            time_ms("2026-11-11 20:00", TimeForm::Auto, &z),
            Ok(want - 5_000)
        );
        assert_eq!(
            time_ms("2026-11-11 20:00:05.250", TimeForm::Auto, &z),
            Ok(want + 250)
        );
        assert_eq!(
            time_ms("1794398405", TimeForm::EpochMillis, &z),
            Ok(1_794_398_405)
        );
        assert_eq!(time_ms("1794398405", TimeForm::EpochSeconds, &z), Ok(want));
    }

    #[test]
    fn midnight_in_shanghai_is_the_day_it_starts() {
        let z = shanghai();
        // 2026-11-12 00:00:00 local = 2026-11-11 16:00:00 UTC.
        let midnight = time_ms("2026-11-12 00:00:00", TimeForm::Auto, &z).unwrap();
        assert_eq!(midnight, 1_794_412_800_000);
        assert_eq!(time_ms("2026-11-12", TimeForm::Auto, &z), Ok(midnight));
        assert_eq!(
            time_ms("2026-11-12T00:00:00+08:00", TimeForm::Auto, &z),
            Ok(midnight)
        );
        assert_eq!(
            time_ms("2026-11-11 23:59:59", TimeForm::Auto, &z),
            Ok(midnight - 1_000)
        );
        assert_eq!(
            time_ms("2026-1-5", TimeForm::Auto, &z),
            time_ms("2026-01-05", TimeForm::Auto, &z)
        );
    }

    #[test]
    fn bad_times_say_why() {
        let z = shanghai();
        for v in [
            "",
            "  ",
            "yesterday",
            "2026-13-01",
            "2026-02-30 10:00:00",
            "11/11/2026",
            "-5",
        ] {
            let e = time_ms(v, TimeForm::Auto, &z).unwrap_err();
            assert!(!e.0.is_empty(), "{v}");
        }
        assert!(
            time_ms("abc", TimeForm::EpochSeconds, &z)
                .unwrap_err()
                .0
                .contains("whole number")
        );
        assert!(
            time_ms("99999999999999999", TimeForm::EpochSeconds, &z)
                .unwrap_err()
                .0
                .contains("range")
        );
        assert!(
            time_ms(&"1".repeat(5000), TimeForm::Auto, &z)
                .unwrap_err()
                .0
                .contains("bytes long")
        );
    }

    #[test]
    fn amounts_are_exact_fen() {
        use AmountUnit::*;
        for (v, unit, want) in [
            ("¥1,299.00", Yuan, 129_900),
            ("￥1,299.5", Yuan, 129_950),
            ("1299.5", Yuan, 129_950),
            ("1299", Yuan, 129_900),
            ("0.01", Yuan, 1),
            (".5", Yuan, 50),
            ("1299.50元", Yuan, 129_950),
            ("RMB 88", Yuan, 8_800),
            ("-35.20", Yuan, -3_520),
            ("1299.500", Yuan, 129_950),
            ("129900", Fen, 129_900),
            ("129900.00", Fen, 129_900),
            ("-100", Fen, -100),
            ("0", Fen, 0),
        ] {
            assert_eq!(amount_fen(v, unit), Ok(want), "{v}");
        }
        // 0.1 + 0.2 in floating point is not 0.3; here 0.29 is 29 fen.
        assert_eq!(amount_fen("0.29", Yuan), Ok(29));
        assert_eq!(amount_fen("92233720368547758.07", Yuan), Ok(i64::MAX));
    }

    #[test]
    fn bad_amounts_are_refused_not_rounded() {
        use AmountUnit::*;
        assert!(
            amount_fen("1299.505", Yuan)
                .unwrap_err()
                .0
                .contains("two decimal")
        );
        assert!(
            amount_fen("12.5", Fen)
                .unwrap_err()
                .0
                .contains("fraction of a fen")
        );
        assert!(
            amount_fen("92233720368547758.08", Yuan)
                .unwrap_err()
                .0
                .contains("range")
        );
        for v in ["", "free", "1.2.3", "12a", "--5", "¥", "1e3"] {
            assert!(amount_fen(v, Yuan).is_err(), "{v}");
        }
    }

    #[test]
    fn phones_fold_to_one_form() {
        for v in [
            "13812345678",
            "+86 138-1234-5678",
            "+8613812345678",
            "0086 13812345678",
            "86-138-1234-5678",
            "(138) 1234 5678",
            " 138 1234 5678 ",
        ] {
            assert_eq!(phone(v), Ok("13812345678".into()), "{v}");
        }
        assert!(phone("138****5678").unwrap_err().0.contains("masked"));
        for v in [
            "1381234567",
            "23812345678",
            "12812345678",
            "010-12345678",
            "+1 415 555 0100",
            "138123456789",
            "138x2345678",
            "1+3812345678",
        ] {
            assert!(phone(v).is_err(), "{v}");
        }
    }

    #[test]
    fn emails_and_identifiers() {
        assert_eq!(
            email(" Li.Wei@Example.COM "),
            Ok("li.wei@example.com".into())
        );
        for v in [
            "li.wei",
            "@example.com",
            "li@",
            "li@localhost",
            "a b@example.com",
            "a@b@c.com",
        ] {
            assert!(email(v).is_err(), "{v}");
        }
        assert_eq!(
            identifier("  oX9a01Ab ", "openid", false),
            Ok("oX9a01Ab".into())
        );
        assert_eq!(
            identifier("JD_Pin_7781", "jd_pin", true),
            Ok("jd_pin_7781".into())
        );
        assert_eq!(
            identifier("\u{3000}小美\u{3000}", "taobao_nick", false),
            Ok("小美".into())
        );
        assert!(
            identifier("a\u{0}b", "x", false)
                .unwrap_err()
                .0
                .contains("control")
        );
        assert!(
            identifier("   ", "member_card", false)
                .unwrap_err()
                .0
                .contains("empty")
        );
    }
}
