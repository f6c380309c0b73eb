//! Parsing HTTP-dates (RFC 9110 §5.6.7) for `If-Modified-Since` against `Last-Modified`.
//!
//! All three formats a recipient must accept are parsed: the preferred IMF-fixdate
//! (`Sun, 06 Nov 1994 08:49:37 GMT`), the obsolete RFC 850 form
//! (`Sunday, 06-Nov-94 08:49:37 GMT`) and ANSI C's asctime (`Sun Nov  6 08:49:37 1994`).
//! The day name is not checked against the date (RFC 9110 lets a recipient ignore it).
//!
//! Invariant: parsing allocates nothing and never panics on any input; a value that is
//! not a valid date is `None`, so the caller ignores the header as RFC 9110 requires.

/// Errors of this module: none are reported; invalid dates are simply `None`.
#[derive(Debug, thiserror::Error)]
pub enum HttpDateError {
    #[error("not an HTTP-date")]
    Invalid,
}

/// Seconds since the Unix epoch of an HTTP-date, or `None` if `value` is not one.
pub fn parse(value: &[u8]) -> Option<u64> {
    parse_checked(value).ok()
}

fn parse_checked(value: &[u8]) -> Result<u64, HttpDateError> {
    let s = trim(value);
    let date = match s.len() {
        29 => imf_fixdate(s),
        24 => asctime(s),
        _ => rfc850(s),
    };
    date.ok_or(HttpDateError::Invalid)
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// `Sun, 06 Nov 1994 08:49:37 GMT`
fn imf_fixdate(s: &[u8]) -> Option<u64> {
    if &s[3..5] != b", " || s[7] != b' ' || s[11] != b' ' || s[16] != b' ' {
        return None;
    }
    if &s[25..] != b" GMT" {
        return None;
    }
    let day = digits(&s[5..7])?;
    let month = month(&s[8..11])?;
    let year = digits(&s[12..16])?;
    let time = time(&s[17..25])?;
    to_unix(year, month, day, time)
}

/// `Sunday, 06-Nov-94 08:49:37 GMT`
fn rfc850(s: &[u8]) -> Option<u64> {
    let comma = s.iter().position(|&b| b == b',')?;
    let rest = s.get(comma + 1..)?;
    let rest = rest.strip_prefix(b" ")?;
    if rest.len() != 22 || rest[2] != b'-' || rest[6] != b'-' || rest[9] != b' ' {
        return None;
    }
    if &rest[18..] != b" GMT" {
        return None;
    }
    let day = digits(&rest[0..2])?;
    let month = month(&rest[3..6])?;
    let yy = digits(&rest[7..9])?;
    // RFC 9110: a two-digit year more than 50 years in the future is in the past.
    let year = if yy < 70 { 2000 + yy } else { 1900 + yy };
    let time = time(&rest[10..18])?;
    to_unix(year, month, day, time)
}

/// `Sun Nov  6 08:49:37 1994`
fn asctime(s: &[u8]) -> Option<u64> {
    if s[3] != b' ' || s[7] != b' ' || s[10] != b' ' || s[19] != b' ' {
        return None;
    }
    let month = month(&s[4..7])?;
    let day = match &s[8..10] {
        [b' ', d] => digits(&[*d])?,
        two => digits(two)?,
    };
    let time = time(&s[11..19])?;
    let year = digits(&s[20..24])?;
    to_unix(year, month, day, time)
}

fn digits(s: &[u8]) -> Option<u64> {
    if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(s.iter().fold(0, |n, &d| n * 10 + u64::from(d - b'0')))
}

fn month(s: &[u8]) -> Option<u64> {
    const MONTHS: [&[u8; 3]; 12] = [
        b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov",
        b"Dec",
    ];
    MONTHS
        .iter()
        .position(|m| m.as_slice() == s)
        .map(|i| i as u64 + 1)
}

/// `HH:MM:SS` as seconds into the day.
fn time(s: &[u8]) -> Option<u64> {
    if s.len() != 8 || s[2] != b':' || s[5] != b':' {
        return None;
    }
    let (h, m, sec) = (digits(&s[0..2])?, digits(&s[3..5])?, digits(&s[6..8])?);
    // 60 is a leap second.
    (h < 24 && m < 60 && sec <= 60).then_some(h * 3600 + m * 60 + sec)
}

fn to_unix(year: u64, month: u64, day: u64, time: u64) -> Option<u64> {
    if !(1970..=9999).contains(&year) || !(1..=31).contains(&day) {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + time)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm),
/// for years from 1970 on.
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOV_6_1994: u64 = 784_111_777;

    #[test]
    fn the_three_formats_of_rfc_9110() {
        assert_eq!(parse(b"Sun, 06 Nov 1994 08:49:37 GMT"), Some(NOV_6_1994));
        assert_eq!(parse(b"Sunday, 06-Nov-94 08:49:37 GMT"), Some(NOV_6_1994));
        assert_eq!(parse(b"Sun Nov  6 08:49:37 1994"), Some(NOV_6_1994));
        assert_eq!(parse(b" Sun, 06 Nov 1994 08:49:37 GMT "), Some(NOV_6_1994));
    }

    #[test]
    fn epoch_leap_years_and_two_digit_years() {
        assert_eq!(parse(b"Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(parse(b"Thu, 29 Feb 2024 12:00:00 GMT"), Some(1_709_208_000));
        assert_eq!(parse(b"Wed, 01 Mar 2000 00:00:00 GMT"), Some(951_868_800));
        assert_eq!(
            parse(b"Thursday, 29-Feb-24 12:00:00 GMT"),
            Some(1_709_208_000)
        );
    }

    #[test]
    fn garbage_is_none_and_never_panics() {
        for bad in [
            &b""[..],
            b"yesterday",
            b"Sun, 06 Nov 1994 08:49:37 UTC",
            b"Sun, 06 Foo 1994 08:49:37 GMT",
            b"Sun, 06 Nov 1994 25:49:37 GMT",
            b"Sun, 6 Nov 1994 08:49:37 GMT",
            b"Sun, 06 Nov 1969 08:49:37 GMT",
            b"Sun, xx Nov 1994 08:49:37 GMT",
            b"Sunday, 06-Nov-94 08:49:37",
            b",",
            b"Sun Nov  x 08:49:37 1994",
            b"\xff\xfe, 06 Nov 1994 08:49:37 GMT",
        ] {
            assert_eq!(parse(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
        assert!(parse_checked(b"nope").is_err());
    }
}
