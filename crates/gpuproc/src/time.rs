//! Timeouts that saturate: every timeout a caller gives becomes a deadline through
//! [`deadline`], so `Duration::MAX` (or any timeout past the clock's range) means "no
//! deadline" instead of an overflow panic. The CLI parses durations through
//! [`duration_from_secs_f64`] for the same reason.

use std::fmt;
use std::time::{Duration, Instant};

/// The instant `timeout` from now, or `None` (wait for ever) when that instant is past what
/// the clock can represent.
///
/// ```
/// use std::time::Duration;
/// assert!(gpuproc::time::deadline(Duration::from_secs(1)).is_some());
/// assert!(gpuproc::time::deadline(Duration::MAX).is_none());
/// ```
pub fn deadline(timeout: Duration) -> Option<Instant> {
    Instant::now().checked_add(timeout)
}

/// `at + d`, or a century after `at` when `d` is longer (or the sum past the clock's range),
/// for state that needs an instant rather than "no deadline".
pub fn saturating_add(at: Instant, d: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 86_400);
    at.checked_add(d.min(CENTURY))
        .or_else(|| at.checked_add(Duration::from_secs(86_400)))
        .unwrap_or(at)
}

/// The time left until `deadline` (zero once it has passed); `None` for no deadline.
pub fn remaining(deadline: Option<Instant>) -> Option<Duration> {
    deadline.map(|d| d.saturating_duration_since(Instant::now()))
}

/// A number of seconds as a [`Duration`], saturating at [`Duration::MAX`] (so `1e20` or
/// infinity mean "for ever"); negative numbers and NaN are errors.
///
/// ```
/// use std::time::Duration;
/// use gpuproc::time::duration_from_secs_f64;
/// assert_eq!(duration_from_secs_f64(1.5), Ok(Duration::from_millis(1500)));
/// assert_eq!(duration_from_secs_f64(1e20), Ok(Duration::MAX));
/// assert!(duration_from_secs_f64(-1.0).is_err());
/// ```
pub fn duration_from_secs_f64(secs: f64) -> Result<Duration, InvalidDuration> {
    if secs.is_nan() || secs < 0.0 {
        return Err(InvalidDuration(secs));
    }
    Ok(Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX))
}

/// A number of seconds that is not a duration: negative or NaN.
#[derive(Clone, Copy, PartialEq)]
pub struct InvalidDuration(pub f64);

impl fmt::Display for InvalidDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} is not a duration: expected a number of seconds >= 0",
            self.0
        )
    }
}

impl std::error::Error for InvalidDuration {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_timeouts_mean_no_deadline() {
        assert_eq!(deadline(Duration::MAX), None);
        assert_eq!(deadline(Duration::from_secs(u64::MAX)), None);
        assert_eq!(remaining(None), None);
        let d = deadline(Duration::from_secs(3600)).unwrap();
        assert!(remaining(Some(d)).unwrap() > Duration::from_secs(3599));
        assert_eq!(remaining(Some(Instant::now())), Some(Duration::ZERO));
        let now = Instant::now();
        assert!(saturating_add(now, Duration::MAX) > saturating_add(now, Duration::from_secs(1)));
        assert_eq!(
            saturating_add(now, Duration::from_secs(1)),
            now + Duration::from_secs(1)
        );
    }

    #[test]
    fn seconds_saturate_and_reject_nonsense() {
        assert_eq!(duration_from_secs_f64(0.0), Ok(Duration::ZERO));
        assert_eq!(duration_from_secs_f64(1e20), Ok(Duration::MAX));
        assert_eq!(
            duration_from_secs_f64(1e19),
            Ok(Duration::from_secs(10_000_000_000_000_000_000))
        );
        assert_eq!(duration_from_secs_f64(f64::INFINITY), Ok(Duration::MAX));
        assert!(duration_from_secs_f64(f64::NAN).is_err());
        assert!(duration_from_secs_f64(-0.5).is_err());
        assert!(duration_from_secs_f64(-0.5)
            .unwrap_err()
            .to_string()
            .contains("-0.5"));
    }
}
