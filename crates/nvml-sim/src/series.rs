//! Values that move with time: a scenario value is either a number (what every query returns) or
//! a range `{ min, max, period_s }` that the simulator walks through deterministically, so a live
//! view (nvitop, nvtop, `gpuproc top`) moves while tests can still predict every value.
//!
//! Everything here is a pure function of the scenario values and a time in seconds since the
//! Unix epoch: two processes loading the same scenario see the same value at the same instant.

use std::f64::consts::TAU;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Deserialize;

/// How often the simulated driver takes a utilisation sample, microseconds (the per-process
/// samples of `nvmlDeviceGetProcessUtilization` carry timestamps on this grid).
pub const SAMPLE_PERIOD_US: u64 = 100_000;

/// The period of a range that does not name one, seconds.
pub const DEFAULT_PERIOD_S: f64 = 30.0;

/// A scenario value: fixed, or varying between `min` and `max` (both included) over `period_s`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Level {
    /// Every query returns this value.
    Fixed(u32),
    /// A smooth, repeating walk between `min` and `max`.
    Range {
        /// The lowest value returned.
        min: u32,
        /// The highest value returned.
        max: u32,
        /// How long one cycle takes, seconds (positive and finite).
        period_s: f64,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RangeRepr {
    min: u32,
    max: u32,
    #[serde(default)]
    period_s: Option<f64>,
}

impl<'de> Deserialize<'de> for Level {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Level;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a whole number or a range { min, max, period_s }")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Level, E> {
                u32::try_from(v)
                    .map(Level::Fixed)
                    .map_err(|_| E::custom(format!("{v} is too large")))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Level, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom(format!("{v} is negative")))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Level, A::Error> {
                let r = RangeRepr::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Level::range(r).map_err(serde::de::Error::custom)
            }
        }
        d.deserialize_any(V)
    }
}

impl Level {
    fn range(r: RangeRepr) -> Result<Level, String> {
        let period_s = r.period_s.unwrap_or(DEFAULT_PERIOD_S);
        if r.min > r.max {
            return Err(format!(
                "range min {} is above max {}: expected min <= max",
                r.min, r.max
            ));
        }
        if !(period_s.is_finite() && period_s > 0.0) {
            return Err(format!(
                "range period_s {period_s}: expected a positive number of seconds"
            ));
        }
        Ok(Level::Range {
            min: r.min,
            max: r.max,
            period_s,
        })
    }
}

impl Default for Level {
    fn default() -> Self {
        Level::Fixed(0)
    }
}

impl From<u32> for Level {
    fn from(v: u32) -> Self {
        Level::Fixed(v)
    }
}

impl Level {
    /// The value at `t` seconds since the Unix epoch. `seed` shifts the phase, so GPUs and
    /// processes sharing a range do not move in lockstep. Always within `[min, max]`.
    pub fn at(&self, t: f64, seed: u64) -> u32 {
        match *self {
            Level::Fixed(v) => v,
            Level::Range { min, max, period_s } => {
                let f = wave(t / period_s, seed);
                let span = f64::from(max - min);
                // `f` is within [0, 1], so the sum is within [min, max].
                min + (span * f).round() as u32
            }
        }
    }

    /// The integral of the value from `t0` to `t1` (seconds since the epoch, `t0 <= t1`), in
    /// value-seconds: what a counter fed at this rate adds over that time. Exact, so counters
    /// built on it (energy, NVLink bytes) never go backwards and agree with [`Level::at`].
    pub fn integral(&self, t0: f64, t1: f64, seed: u64) -> f64 {
        let t1 = t1.max(t0);
        match *self {
            Level::Fixed(v) => f64::from(v) * (t1 - t0),
            Level::Range { min, max, period_s } => {
                let span = f64::from(max - min);
                let waves = wave_integral(t1 / period_s, seed) - wave_integral(t0 / period_s, seed);
                f64::from(min) * (t1 - t0) + span * period_s * waves
            }
        }
    }

    /// The fixed value, `None` for a range.
    pub fn fixed(&self) -> Option<u32> {
        match *self {
            Level::Fixed(v) => Some(v),
            Level::Range { .. } => None,
        }
    }

    /// The lowest value.
    pub fn min(&self) -> u32 {
        match *self {
            Level::Fixed(v) | Level::Range { min: v, .. } => v,
        }
    }

    /// The highest value.
    pub fn max(&self) -> u32 {
        match *self {
            Level::Fixed(v) | Level::Range { max: v, .. } => v,
        }
    }

    /// The middle of the range (the value itself when fixed): what the value averages to.
    pub fn mean(&self) -> f64 {
        (f64::from(self.min()) + f64::from(self.max())) / 2.0
    }
}

/// A smooth periodic function of `x` (in cycles) within `[0, 1]`: a sine with a faster
/// harmonic, phase-shifted by `seed`.
fn wave(x: f64, seed: u64) -> f64 {
    let phase = unit(seed);
    let v = 0.5 + 0.35 * (TAU * (x + phase)).sin() + 0.15 * (TAU * (3.0 * x + 2.0 * phase)).sin();
    v.clamp(0.0, 1.0)
}

/// An antiderivative of [`wave`] in `x` (the clamp there never binds: the terms add up to
/// within `[0, 1]`).
fn wave_integral(x: f64, seed: u64) -> f64 {
    let phase = unit(seed);
    0.5 * x
        - 0.35 / TAU * (TAU * (x + phase)).cos()
        - 0.15 / (3.0 * TAU) * (TAU * (3.0 * x + 2.0 * phase)).cos()
}

/// A number in `[0, 1)` from `seed` (splitmix64's finaliser).
pub fn unit(seed: u64) -> f64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// The weight of one process in its GPU's utilisation at `t` seconds: between 0.4 and 1.6,
/// moving over about 20 s with a phase from `pid`.
pub fn process_weight(t: f64, pid: u32) -> f64 {
    let seed = u64::from(pid);
    let period = 12.0 + 16.0 * unit(seed ^ 0x5151);
    1.0 + 0.6 * (TAU * (t / period + unit(seed))).sin()
}

/// Splits `total` percent among processes by `weights`: each share is rounded down, so the
/// shares never add up to more than `total`; a share that is a whole number but for
/// floating-point error (a process alone gets all of `total`) is not rounded down.
pub fn split(total: u32, weights: &[f64]) -> Vec<u32> {
    let sum: f64 = weights.iter().sum();
    if sum <= 0.0 {
        return vec![0; weights.len()];
    }
    let shares = |slack: f64| -> Vec<u32> {
        weights
            .iter()
            .map(|w| (f64::from(total) * (w / sum) + slack).floor() as u32)
            .collect()
    };
    let near = shares(1e-9);
    if near.iter().sum::<u32>() <= total {
        near
    } else {
        shares(0.0)
    }
}

/// Microseconds since the Unix epoch, from the wall clock (what NVML timestamps use).
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// The latest sample time at or before `us`: `us` rounded down to [`SAMPLE_PERIOD_US`].
pub fn sample_tick(us: u64) -> u64 {
    us - us % SAMPLE_PERIOD_US
}

/// Microseconds to seconds, for [`Level::at`].
pub fn secs(us: u64) -> f64 {
    us as f64 / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_values_never_move() {
        let l = Level::Fixed(57);
        for t in [0.0, 1.5, 1e9] {
            assert_eq!(l.at(t, 3), 57);
        }
        assert_eq!(l.fixed(), Some(57));
        assert_eq!(l.mean(), 57.0);
    }

    #[test]
    fn ranges_stay_in_bounds_and_move() {
        let l = Level::Range {
            min: 20,
            max: 90,
            period_s: 10.0,
        };
        let values: Vec<u32> = (0..400)
            .map(|i| l.at(1.7e9 + f64::from(i) * 0.1, 5))
            .collect();
        assert!(values.iter().all(|v| (20..=90).contains(v)), "{values:?}");
        let (lo, hi) = (values.iter().min().unwrap(), values.iter().max().unwrap());
        assert!(
            *hi - *lo > 40,
            "a range spans most of its bounds: {lo}..{hi}"
        );
        assert_eq!(l.at(1.7e9, 5), l.at(1.7e9, 5), "deterministic");
        assert_ne!(
            (0..10)
                .map(|i| l.at(1.7e9 + f64::from(i), 1))
                .collect::<Vec<_>>(),
            (0..10)
                .map(|i| l.at(1.7e9 + f64::from(i), 2))
                .collect::<Vec<_>>(),
            "seeds shift the phase"
        );
    }

    #[test]
    fn integrals_match_the_values_and_only_grow() {
        let l = Level::Range {
            min: 100,
            max: 300,
            period_s: 7.0,
        };
        let t0 = 1.7e9;
        // A Riemann sum over small steps agrees with the closed form.
        let steps = 70_000;
        let dt = 7.0 / f64::from(steps);
        let sum: f64 = (0..steps)
            .map(|i| {
                let t = t0 + (f64::from(i) + 0.5) * dt;
                let f = wave(t / 7.0, 9);
                (100.0 + 200.0 * f) * dt
            })
            .sum();
        let exact = l.integral(t0, t0 + 7.0, 9);
        assert!((sum - exact).abs() < 1e-3 * exact, "{sum} vs {exact}");
        assert!(
            (exact - 200.0 * 7.0).abs() < 1e-6 * exact,
            "one period averages to the mean"
        );
        let mut last = 0.0;
        for i in 0..100 {
            let v = l.integral(t0, t0 + f64::from(i) * 0.3, 9);
            assert!(v >= last);
            last = v;
        }
        assert_eq!(Level::Fixed(5).integral(10.0, 12.0, 0), 10.0);
    }

    #[test]
    fn ranges_parse_and_reject_nonsense() {
        #[derive(Deserialize)]
        struct T {
            v: Level,
        }
        let p = |s: &str| toml::from_str::<T>(s).map(|t| t.v);
        assert_eq!(p("v = 4").unwrap(), Level::Fixed(4));
        assert_eq!(
            p("v = { min = 1, max = 9 }").unwrap(),
            Level::Range {
                min: 1,
                max: 9,
                period_s: DEFAULT_PERIOD_S
            }
        );
        assert!(p("v = { min = 9, max = 1 }").is_err());
        assert!(p("v = { min = 1, max = 9, period_s = 0 }").is_err());
        assert!(p("v = { min = 1, max = 9, typo = 1 }").is_err());
        let e = p("v = 4.5").unwrap_err().to_string();
        assert!(e.contains("a whole number or a range"), "{e}");
        let e = p("v = -3").unwrap_err().to_string();
        assert!(e.contains("negative"), "{e}");
        let json = |s: &str| serde_json::from_str::<T>(s).map(|t| t.v);
        assert_eq!(json(r#"{"v": 7}"#).unwrap(), Level::Fixed(7));
        assert!(json(r#"{"v": {"min": 1, "max": 2, "period_s": 5}}"#).is_ok());
    }

    #[test]
    fn split_never_exceeds_the_total() {
        assert_eq!(split(90, &[1.0, 1.0, 1.0]), vec![30, 30, 30]);
        assert_eq!(split(10, &[1.0, 2.0]), vec![3, 6]);
        assert_eq!(split(50, &[0.0]), vec![0]);
        // A process alone has it all, whatever its weight.
        for t in 0..1000 {
            let w = process_weight(f64::from(t) * 0.37, 4242);
            assert_eq!(split(12, &[w]), vec![12], "weight {w}");
        }
        for t in 0..100 {
            let w: Vec<f64> = [7, 8, 9]
                .iter()
                .map(|&p| process_weight(f64::from(t), p))
                .collect();
            assert!(w.iter().all(|w| (0.4..=1.6).contains(w)));
            assert!(split(99, &w).iter().sum::<u32>() <= 99);
        }
        assert_eq!(sample_tick(1_234_567), 1_200_000);
    }
}
