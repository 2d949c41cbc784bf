//! Command-line values shared by `gpuproc pick` and `gpuproc run`: sizes (`10GiB`),
//! durations (`5m`, `1h30m`) and the GPU order (`--order`).

use std::time::Duration;

use clap::ValueEnum;
use gpuproc::gpu::Order;

/// `--order` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OrderArg {
    /// Least-shared first, then most free memory.
    MostFree,
    /// Lowest index first.
    LowestIndex,
    /// After the GPU most recently picked on this machine, wrapping around.
    RoundRobin,
}

impl From<OrderArg> for Order {
    fn from(o: OrderArg) -> Order {
        match o {
            OrderArg::MostFree => Order::MostFree,
            OrderArg::LowestIndex => Order::LowestIndex,
            OrderArg::RoundRobin => Order::RoundRobin,
        }
    }
}

/// A duration for people: `30s`, `5m`, `1h30m`, `1.5s`.
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    match (s / 3600, s % 3600 / 60, s % 60) {
        (0, 0, _) if d.subsec_millis() != 0 && s < 10 => format!("{:.1}s", d.as_secs_f64()),
        (0, 0, sec) => format!("{sec}s"),
        (0, m, 0) => format!("{m}m"),
        (0, m, sec) => format!("{m}m{sec}s"),
        (h, 0, 0) => format!("{h}h"),
        (h, m, 0) => format!("{h}h{m}m"),
        (h, m, sec) => format!("{h}h{m}m{sec}s"),
    }
}

pub use gpuproc::gpu::parse_size;

/// Parses a duration: `30s`, `5m`, `1h30m`, `500ms`, `2d`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("expected a duration such as 30s, 5m or 1h30m, got {s:?}");
    let text = s.trim();
    if let Ok(seconds) = text.parse::<f64>() {
        return gpuproc::time::duration_from_secs_f64(seconds).map_err(|_| bad());
    }
    let mut total = 0.0;
    let mut rest = text;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let value: f64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "d" => 86400.0,
            _ => return Err(bad()),
        };
        total += value * seconds;
        rest = &rest[unit_len..];
    }
    gpuproc::time::duration_from_secs_f64(total).map_err(|_| bad())
}

/// Seconds already checked to be a number >= 0 as a [`Duration`], saturating (so `1e20`
/// means for ever); anything else is zero.
pub fn seconds(v: f64) -> Duration {
    gpuproc::time::duration_from_secs_f64(v).unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1073741824"), Ok(1 << 30));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("10 GiB"), Ok(10 << 30));
        assert_eq!(parse_size("10g"), Ok(10 << 30));
        assert_eq!(parse_size("500MiB"), Ok(500 << 20));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("2GB"), Ok(2_000_000_000));
        assert_eq!(parse_size("1TiB"), Ok(1 << 40));
        assert_eq!(parse_size("0"), Ok(0));
        for bad in ["", "GiB", "10 parsecs", "-1GiB", "1e3", "99999999999999TiB"] {
            let err = parse_size(bad).unwrap_err();
            assert!(err.contains("expected a size"), "{bad}: {err}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86400)));
        // Too long for the clock: for ever, not a panic.
        assert_eq!(parse_duration("1e20"), Ok(Duration::MAX));
        assert_eq!(parse_duration("1e400"), Ok(Duration::MAX));
        assert_eq!(parse_duration("99999999999999999999d"), Ok(Duration::MAX));
        assert_eq!(
            parse_duration("1e19"),
            Ok(Duration::from_secs(10_000_000_000_000_000_000))
        );
        assert_eq!(seconds(1e20), Duration::MAX);
        assert_eq!(seconds(f64::INFINITY), Duration::MAX);
        assert!(!human(Duration::MAX).is_empty());
        for bad in ["", "m", "5 minutes", "-3s", "5x", "1h 30m", "nan"] {
            let err = parse_duration(bad).unwrap_err();
            assert!(err.contains("expected a duration"), "{bad}: {err}");
        }
    }

    #[test]
    fn durations_for_people() {
        assert_eq!(human(Duration::from_secs(300)), "5m");
        assert_eq!(human(Duration::from_secs(30)), "30s");
        assert_eq!(human(Duration::from_secs(5400)), "1h30m");
        assert_eq!(human(Duration::from_secs(5401)), "1h30m1s");
        assert_eq!(human(Duration::from_secs(3600)), "1h");
        assert_eq!(human(Duration::from_secs(90)), "1m30s");
        assert_eq!(human(Duration::from_millis(1500)), "1.5s");
    }
}
