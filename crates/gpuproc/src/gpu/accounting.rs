//! Per-job GPU accounting from periodic samples: when a process tree was on its GPUs, its
//! peak and mean memory, its mean SM utilisation and the energy its GPUs used meanwhile.
//!
//! The samples are [`ProcessUsage`]s read by [`Gpus::usage_detailed`](super::Gpus::usage_detailed)
//! (about once a second by `gpuproc run` and by a pool's GPU sampler); [`GpuAccountant`]
//! folds them into a [`GpuAccounting`] in constant memory. The arithmetic is pure and
//! tested on its own: [`Mean`] (a time-weighted mean over irregular sample intervals, for
//! a window that is only known to have ended when the next sample on the GPU arrives) and
//! [`counter_delta`] (an energy counter that wraps or is reset).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::types::ProcessUsage;

/// What a process tree did on its GPUs, from samples (see [`GpuAccountant`]).
///
/// The *window* runs from the first to the last sample in which one of its processes had
/// a context on a GPU; every figure describes the samples inside it. Samples inside the
/// window in which no process was on a GPU count as 0 memory and 0% SM.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GpuAccounting {
    /// The first sample on a GPU, milliseconds since the Unix epoch (`None`: never seen on
    /// one, and then every other figure is `None` too).
    pub first_ms: Option<u64>,
    /// The last sample on a GPU, milliseconds since the Unix epoch.
    pub last_ms: Option<u64>,
    /// Samples inside the window.
    pub samples: u64,
    /// The most GPU memory in use at one sample, all GPUs together, bytes.
    pub peak_memory: Option<u64>,
    /// The time-weighted mean of the memory in use over the window (trapezoids between
    /// consecutive samples; a window of one instant: that sample), bytes.
    pub mean_memory: Option<u64>,
    /// The time-weighted mean SM utilisation over the window, percent of one GPU: at each
    /// sample the mean, over the GPUs the processes were on, of their SM utilisation there
    /// (from the driver's per-process samples). `None` where the GPUs have no per-process
    /// figures (MIG mode, before Maxwell).
    pub mean_sm_percent: Option<f64>,
    /// Energy the GPUs used while the processes were on them, millijoules: the difference
    /// of each device's energy counter between consecutive samples on it, summed. Only
    /// attributed when no other process was seen on those GPUs in any sample of the window
    /// ([`shared`](GpuAccounting::shared) false): the counter measures the whole device,
    /// so with others on it the energy is not the job's alone. Also `None` when a device
    /// has no energy counter (before Volta; `nvmlDeviceGetTotalEnergyConsumption`
    /// unsupported), or with fewer than two consecutive samples on any device.
    pub energy_mj: Option<u64>,
    /// Whether another process (another user's, another job's, a process in another PID
    /// namespace) was seen on one of the GPUs during the window.
    pub shared: bool,
}

/// A time-weighted mean of samples taken at irregular times, over a window that closes at
/// the last sample pushed with `in_window`: later samples are held back and count only once
/// a sample in the window follows them.
///
/// Between consecutive samples the value is taken to move linearly (the trapezoid rule);
/// a stretch with an unknown value at either end is left out. With no stretch of positive
/// length (one sample, or several at the same instant), the mean is the plain mean of the
/// known values.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Mean {
    started: bool,
    last: Option<(u64, Option<f64>)>,
    /// Integral (value times milliseconds) and its length, up to the window's last sample.
    area: f64,
    span_ms: u64,
    /// Known values up to the window's last sample, for windows of no length.
    sum: f64,
    count: u64,
    /// The same since the window's last sample, held back.
    held_area: f64,
    held_span_ms: u64,
    held_sum: f64,
    held_count: u64,
}

impl Mean {
    /// Adds the value `value` (`None`: unknown) sampled at `t_ms`; `in_window` when the
    /// sample belongs to the window (it extends the window to `t_ms`). Samples before the
    /// window's first are ignored, and so is a sample older than the previous one.
    pub fn push(&mut self, t_ms: u64, value: Option<f64>, in_window: bool) {
        if !self.started {
            if !in_window {
                return;
            }
            self.started = true;
        }
        if let Some((t0, v0)) = self.last {
            if t_ms < t0 {
                return;
            }
            if let (Some(v0), Some(v1)) = (v0, value) {
                let dt = t_ms - t0;
                // Exact as f64 below 2^53 ms (285,000 years).
                self.held_area += (v0 + v1) / 2.0 * dt as f64;
                self.held_span_ms = self.held_span_ms.saturating_add(dt);
            }
        }
        if let Some(v) = value {
            self.held_sum += v;
            self.held_count += 1;
        }
        self.last = Some((t_ms, value));
        if in_window {
            self.area += std::mem::take(&mut self.held_area);
            self.span_ms = self
                .span_ms
                .saturating_add(std::mem::take(&mut self.held_span_ms));
            self.sum += std::mem::take(&mut self.held_sum);
            self.count += std::mem::take(&mut self.held_count);
        }
    }

    /// The mean over the window; `None` when it has no known value.
    pub fn value(&self) -> Option<f64> {
        if self.span_ms > 0 {
            Some(self.area / self.span_ms as f64)
        } else if self.count > 0 {
            Some(self.sum / self.count as f64)
        } else {
            None
        }
    }
}

/// How much an energy counter advanced from `before` to `after`.
///
/// The counter only grows while the driver stays loaded. A smaller reading means it started
/// again: a `u64` that wrapped (`before` within [`WRAP_MARGIN`] of `u64::MAX`: what was left
/// to the top, plus `after`), or a driver reloaded, which starts it from 0 (then `after` is
/// what it has counted since, the most that can be attributed).
pub fn counter_delta(before: u64, after: u64) -> u64 {
    if after >= before {
        after - before
    } else if u64::MAX - before <= WRAP_MARGIN {
        (u64::MAX - before).saturating_add(after).saturating_add(1)
    } else {
        after
    }
}

/// How close to `u64::MAX` a counter must have been for a smaller reading to count as a wrap
/// rather than a reset (2^32 mJ: over an hour of a 1 kW device).
pub const WRAP_MARGIN: u64 = 1 << 32;

#[derive(Debug, Clone, Default, PartialEq)]
struct DeviceEnergy {
    /// The counter at the previous sample on the device (`None`: not on it then).
    last: Option<u64>,
    /// Millijoules counted so far.
    total: u64,
    /// Stretches counted.
    stretches: u64,
    /// A sample on the device had no counter.
    unknown: bool,
}

/// Folds samples of one process tree's GPU use into a [`GpuAccounting`], in constant memory.
///
/// ```no_run
/// use gpuproc::gpu::{self, GpuAccountant};
/// let mut accountant = GpuAccountant::default();
/// let pid = std::process::id();
/// for _ in 0..3 {
///     accountant.record(gpu::now_ms(), &gpu::global()?.usage_detailed(pid, true)?);
///     std::thread::sleep(std::time::Duration::from_secs(1));
/// }
/// println!("{:?}", accountant.accounting());
/// # Ok::<(), gpu::GpuError>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuAccountant {
    first_ms: Option<u64>,
    last_ms: Option<u64>,
    samples: u64,
    held_samples: u64,
    peak: Option<u64>,
    memory: Mean,
    sm: Mean,
    energy: BTreeMap<u32, DeviceEnergy>,
    shared: bool,
}

impl GpuAccountant {
    /// Adds the sample `usage`, taken at `t_ms` (milliseconds since the Unix epoch).
    /// Samples must come in time order; an older one than the last is ignored.
    pub fn record(&mut self, t_ms: u64, usage: &ProcessUsage) {
        if self.last_ms.is_some_and(|last| t_ms < last) {
            return;
        }
        let on_gpu = !usage.devices.is_empty();
        let memory = usage.total_memory();
        // The mean over the devices with a figure; `None` when none has one.
        let known: Vec<u32> = usage.devices.iter().filter_map(|d| d.sm_percent).collect();
        let sm = if on_gpu {
            (!known.is_empty())
                .then(|| known.iter().map(|&v| f64::from(v)).sum::<f64>() / known.len() as f64)
        } else {
            Some(0.0)
        };
        self.memory.push(t_ms, Some(memory as f64), on_gpu);
        self.sm.push(t_ms, sm, on_gpu);
        if self.first_ms.is_none() && !on_gpu {
            return;
        }
        self.held_samples += 1;
        if !on_gpu {
            for e in self.energy.values_mut() {
                e.last = None;
            }
            return;
        }
        self.first_ms.get_or_insert(t_ms);
        self.last_ms = Some(t_ms);
        self.samples += std::mem::take(&mut self.held_samples);
        self.peak = Some(self.peak.unwrap_or(0).max(memory));
        self.shared |= usage.devices.iter().any(|d| d.other_processes > 0);
        // A device the processes left: its next stretch starts when they are back.
        let on: Vec<u32> = usage.devices.iter().map(|d| d.index).collect();
        for (index, e) in &mut self.energy {
            if !on.contains(index) {
                e.last = None;
            }
        }
        for d in &usage.devices {
            let e = self.energy.entry(d.index).or_default();
            match d.total_energy_mj {
                Some(now) => {
                    if let Some(before) = e.last {
                        e.total = e.total.saturating_add(counter_delta(before, now));
                        e.stretches += 1;
                    }
                    e.last = Some(now);
                }
                None => {
                    e.unknown = true;
                    e.last = None;
                }
            }
        }
    }

    /// The accounting so far.
    pub fn accounting(&self) -> GpuAccounting {
        let energy_mj = if self.shared
            || self.energy.values().any(|e| e.unknown)
            || self.energy.values().all(|e| e.stretches == 0)
        {
            None
        } else {
            Some(
                self.energy
                    .values()
                    .fold(0u64, |acc, e| acc.saturating_add(e.total)),
            )
        };
        GpuAccounting {
            first_ms: self.first_ms,
            last_ms: self.last_ms,
            samples: self.samples,
            peak_memory: self.peak,
            mean_memory: self.memory.value().map(|m| m.round() as u64),
            mean_sm_percent: self.sm.value(),
            energy_mj,
            shared: self.shared,
        }
    }
}

/// Milliseconds since the Unix epoch, from the wall clock (0 before 1970).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::DeviceUsage;

    fn close(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() < 1e-9)
    }

    #[test]
    fn means_weigh_irregular_intervals_by_time() {
        let mut m = Mean::default();
        m.push(0, Some(10.0), true);
        m.push(1000, Some(20.0), true);
        m.push(3000, Some(20.0), true);
        // 15 over 1 s, then 20 over 2 s.
        assert!(close(m.value(), 55_000.0 / 3000.0), "{:?}", m.value());
    }

    #[test]
    fn means_hold_back_samples_after_the_window_until_it_grows() {
        let mut m = Mean::default();
        m.push(0, Some(5.0), false); // before the window: ignored
        assert_eq!(m.value(), None);
        m.push(1000, Some(10.0), true);
        assert!(close(m.value(), 10.0), "one sample: its value");
        m.push(2000, Some(30.0), true);
        m.push(3000, Some(0.0), false);
        assert!(close(m.value(), 20.0), "the window ends at 2 s");
        m.push(4000, Some(30.0), true);
        // 20 (1-2 s), 15 (2-3 s), 15 (3-4 s).
        assert!(close(m.value(), 50_000.0 / 3000.0), "{:?}", m.value());
        m.push(3500, Some(1000.0), true); // older than the last: ignored
        assert!(close(m.value(), 50_000.0 / 3000.0));
    }

    #[test]
    fn means_leave_out_unknown_stretches_and_instants() {
        let mut m = Mean::default();
        m.push(0, Some(40.0), true);
        m.push(1000, None, true);
        m.push(2000, Some(10.0), true);
        assert!(close(m.value(), 25.0), "no stretch: the plain mean");
        m.push(4000, Some(30.0), true);
        assert!(close(m.value(), 20.0), "only 2-4 s is known");
        let mut same = Mean::default();
        same.push(7, Some(1.0), true);
        same.push(7, Some(3.0), true);
        assert!(close(same.value(), 2.0));
        let mut unknown = Mean::default();
        unknown.push(0, None, true);
        unknown.push(10, None, true);
        assert_eq!(unknown.value(), None);
    }

    #[test]
    fn counters_that_wrap_or_restart() {
        assert_eq!(counter_delta(1000, 1500), 500);
        assert_eq!(counter_delta(7, 7), 0);
        // Reloaded driver: counting from 0 again.
        assert_eq!(counter_delta(5_000_000, 300), 300);
        // Wrapped: 10 to the top, 1 to 0, then 20.
        assert_eq!(counter_delta(u64::MAX - 10, 20), 31);
        assert_eq!(counter_delta(u64::MAX - WRAP_MARGIN, 20), WRAP_MARGIN + 21);
        assert_eq!(counter_delta(u64::MAX - WRAP_MARGIN - 1, 20), 20);
    }

    fn device(
        index: u32,
        memory: u64,
        sm: Option<u32>,
        others: usize,
        energy: Option<u64>,
    ) -> DeviceUsage {
        DeviceUsage {
            index,
            uuid: None,
            used_memory: memory,
            pids: vec![10],
            other_processes: others,
            sm_percent: sm,
            total_energy_mj: energy,
        }
    }

    fn usage(devices: Vec<DeviceUsage>) -> ProcessUsage {
        ProcessUsage {
            pid: 10,
            pids: vec![10],
            devices,
        }
    }

    #[test]
    fn a_job_alone_on_its_gpus() {
        let mut a = GpuAccountant::default();
        a.record(500, &usage(vec![])); // before it touched a GPU
        a.record(
            1000,
            &usage(vec![device(0, 100, Some(50), 0, Some(10_000))]),
        );
        a.record(
            2000,
            &usage(vec![
                device(0, 300, Some(70), 0, Some(10_400)),
                device(1, 100, Some(10), 0, Some(900)),
            ]),
        );
        a.record(
            4000,
            &usage(vec![device(0, 300, Some(70), 0, Some(11_200))]),
        );
        a.record(5000, &usage(vec![])); // after: outside the window
        let got = a.accounting();
        assert_eq!(
            (got.first_ms, got.last_ms, got.samples),
            (Some(1000), Some(4000), 3)
        );
        assert_eq!(got.peak_memory, Some(400));
        // Memory: 250 over 1 s (100 -> 400), 350 over 2 s (400 -> 300).
        assert_eq!(got.mean_memory, Some(317));
        // SM per sample: 50, (70 + 10) / 2 = 40, 70.
        assert!(
            close(got.mean_sm_percent, (45.0 + 2.0 * 55.0) / 3.0),
            "{got:?}"
        );
        // GPU 0: 400 + 800; GPU 1 seen once: no stretch.
        assert_eq!(got.energy_mj, Some(1200));
        assert!(!got.shared);
    }

    #[test]
    fn a_gap_inside_the_window_counts_as_idle_and_not_for_energy() {
        let mut a = GpuAccountant::default();
        a.record(0, &usage(vec![device(0, 100, Some(40), 0, Some(0))]));
        a.record(1000, &usage(vec![]));
        a.record(2000, &usage(vec![device(0, 100, Some(40), 0, Some(5_000))]));
        a.record(3000, &usage(vec![device(0, 100, Some(40), 0, Some(5_600))]));
        let got = a.accounting();
        assert_eq!(got.samples, 4);
        assert_eq!(got.mean_memory, Some(67)); // 50, 50, 100 over 3 s
        assert!(
            close(got.mean_sm_percent, (20.0 + 20.0 + 40.0) / 3.0),
            "{got:?}"
        );
        // Only the stretch 2-3 s was on the GPU from end to end.
        assert_eq!(got.energy_mj, Some(600));
    }

    #[test]
    fn energy_needs_the_gpus_alone_and_a_counter() {
        let mut shared = GpuAccountant::default();
        shared.record(0, &usage(vec![device(0, 1, Some(1), 0, Some(0))]));
        shared.record(1000, &usage(vec![device(0, 1, Some(1), 2, Some(100))]));
        shared.record(2000, &usage(vec![device(0, 1, Some(1), 0, Some(200))]));
        let got = shared.accounting();
        assert!(got.shared);
        assert_eq!(got.energy_mj, None);
        assert_eq!(got.peak_memory, Some(1));

        let mut no_counter = GpuAccountant::default();
        no_counter.record(0, &usage(vec![device(0, 1, None, 0, None)]));
        no_counter.record(1000, &usage(vec![device(0, 1, None, 0, None)]));
        let got = no_counter.accounting();
        assert_eq!((got.energy_mj, got.mean_sm_percent), (None, None));
        assert!(!got.shared);

        let mut once = GpuAccountant::default();
        once.record(0, &usage(vec![device(0, 1, Some(9), 0, Some(5))]));
        let got = once.accounting();
        assert_eq!(got.energy_mj, None, "one sample measures no energy");
        assert!(close(got.mean_sm_percent, 9.0));

        assert_eq!(
            GpuAccountant::default().accounting(),
            GpuAccounting::default()
        );
    }

    #[test]
    fn a_restarted_counter_counts_from_zero() {
        let mut a = GpuAccountant::default();
        a.record(0, &usage(vec![device(0, 1, Some(1), 0, Some(9_000))]));
        a.record(1000, &usage(vec![device(0, 1, Some(1), 0, Some(9_500))]));
        a.record(2000, &usage(vec![device(0, 1, Some(1), 0, Some(200))]));
        assert_eq!(a.accounting().energy_mj, Some(700));
    }
}
