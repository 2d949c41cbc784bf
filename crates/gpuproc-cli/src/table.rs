//! The gpustat-like table: a pure function from a snapshot to text.

use std::fmt::Write as _;

use gpuproc::gpu::{Device, GpuProcess, LeaseRecord, Snapshot};

/// How to draw the table.
#[derive(Debug, Clone, Copy)]
pub struct Style {
    /// Use ANSI colours.
    pub colour: bool,
    /// List processes under each GPU.
    pub processes: bool,
}

const BAR_WIDTH: usize = 20;
const MIB: u64 = 1 << 20;

struct Paint(bool);

impl Paint {
    fn paint(&self, code: &str, text: &str) -> String {
        if self.0 {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }
}

/// Renders the snapshot: a header line, one line per GPU (with who leased it, from `leases`),
/// its processes underneath.
pub fn render(snap: &Snapshot, leases: &[LeaseRecord], style: Style) -> String {
    let p = Paint(style.colour);
    let mut out = String::new();
    let mut header = vec![
        p.paint("1", &snap.hostname),
        local_time(snap.timestamp_ms / 1000),
    ];
    if let Some(driver) = &snap.driver_version {
        header.push(format!("driver {}", p.paint("1", driver)));
    }
    if let Some(cuda) = snap.cuda_driver_version {
        header.push(format!("CUDA {cuda}"));
    }
    let _ = writeln!(out, "{}", header.join("  "));
    if snap.devices.is_empty() {
        out.push_str("no GPUs\n");
    }
    let name_width = snap
        .devices
        .iter()
        .map(|d| d.name.as_deref().unwrap_or("?").chars().count())
        .max()
        .unwrap_or(0);
    let total_width = snap
        .devices
        .iter()
        .filter_map(|d| d.memory)
        .map(|m| (m.total / MIB).to_string().len())
        .max()
        .unwrap_or(1);
    for device in &snap.devices {
        device_line(&mut out, &p, device, name_width, total_width);
        if let Some(note) = device.uuid.as_deref().and_then(|u| lease_note(u, leases)) {
            let _ = writeln!(out, " └─ {}", p.paint("35", &note));
        }
        if style.processes {
            for process in device.processes.iter().flatten() {
                process_line(&mut out, &p, process);
            }
        }
    }
    out
}

fn device_line(out: &mut String, p: &Paint, d: &Device, name_width: usize, total_width: usize) {
    let index = p.paint("36", &format!("[{}]", d.index));
    let name = format!("{:<name_width$}", d.name.as_deref().unwrap_or("?"));
    let name = p.paint("34", &name);
    if let Some(fault) = &d.error {
        let _ = writeln!(out, "{index} {name}  {}", p.paint("1;31", &fault.message));
        return;
    }
    let temp = match d.temperature_c {
        Some(t) => {
            let text = format!("{t:>3}°C");
            p.paint(if t >= 80 { "1;31" } else { "31" }, &text)
        }
        None => "  ?°C".to_string(),
    };
    let util = match d.utilization {
        Some(u) => p.paint("32", &format!("{:>3} %", u.gpu)),
        None => "  ? %".to_string(),
    };
    let memory = match d.memory {
        Some(m) => {
            let fraction = if m.total == 0 {
                0.0
            } else {
                m.used as f64 / m.total as f64
            };
            format!(
                "{} {} / {} MiB",
                bar(p, fraction),
                p.paint("33", &format!("{:>total_width$}", m.used / MIB)),
                p.paint("33", &format!("{:>total_width$}", m.total / MIB)),
            )
        }
        None => format!("{} ? MiB", bar(p, 0.0)),
    };
    let mut line = format!("{index} {name}  {temp}  {util}  {memory}");
    match (d.power_draw_mw, d.power_limit_mw) {
        (Some(draw), Some(limit)) => {
            let _ = write!(line, "  {:>3} / {} W", draw / 1000, limit / 1000);
        }
        (Some(draw), None) => {
            let _ = write!(line, "  {:>3} W", draw / 1000);
        }
        _ => {}
    }
    if d.mig.as_ref().is_some_and(|m| m.enabled) {
        let count = d.mig.as_ref().map_or(0, |m| m.instances.len());
        let _ = write!(line, "  MIG x{count}");
    }
    let _ = writeln!(out, "{line}");
}

/// "leased by pid 12, 34 (2 of 2 shares)" for a GPU that `gpuproc pick`, a pool or a
/// process holds, or `None`.
fn lease_note(uuid: &str, leases: &[LeaseRecord]) -> Option<String> {
    let holding: Vec<&LeaseRecord> = leases
        .iter()
        .filter(|l| l.devices.iter().any(|d| d.uuid == uuid))
        .collect();
    if holding.is_empty() {
        return None;
    }
    let pids: Vec<String> = holding
        .iter()
        .flat_map(|l| l.holders.iter().map(|h| h.pid.to_string()))
        .collect();
    let limit = holding.iter().map(|l| l.max_per_gpu).min().unwrap_or(1);
    Some(format!(
        "leased by pid {} ({} of {limit} shares)",
        pids.join(", "),
        holding.len()
    ))
}

fn bar(p: &Paint, fraction: f64) -> String {
    let filled = ((fraction.clamp(0.0, 1.0) * BAR_WIDTH as f64).round() as usize).min(BAR_WIDTH);
    let colour = if fraction >= 0.9 { "31" } else { "33" };
    format!(
        "[{}{}]",
        p.paint(colour, &"█".repeat(filled)),
        "░".repeat(BAR_WIDTH - filled)
    )
}

fn process_line(out: &mut String, p: &Paint, process: &GpuProcess) {
    let user = process
        .host
        .as_ref()
        .and_then(|h| h.user.clone().or_else(|| h.uid.map(|u| u.to_string())))
        .unwrap_or_else(|| "?".to_string());
    let pid = match process.pid {
        Some(pid) => pid.to_string(),
        None => format!("({})", process.nvml_pid),
    };
    let memory = match process.used_memory {
        Some(bytes) => format!("{} MiB", bytes / MIB),
        None => "? MiB".to_string(),
    };
    let command = process
        .host
        .as_ref()
        .map(|h| h.command())
        .unwrap_or_else(|| "?".to_string());
    let _ = writeln!(
        out,
        "    └─ {}  {:>8}  {:>10}  {}",
        p.paint("90", &format!("{user:<10}")),
        p.paint("1", &pid),
        p.paint("33", &memory),
        command
    );
}

/// `YYYY-MM-DD HH:MM:SS` in local time.
fn local_time(unix_secs: u64) -> String {
    let t = unix_secs as libc::time_t;
    // SAFETY: `tm` is plain data; all-zero is a valid value for it to be overwritten.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers point at live locals of the right types; localtime_r is the
    // thread-safe variant and writes only through `tm`.
    let ok = unsafe { !libc::localtime_r(&t, &mut tm).is_null() };
    if !ok {
        return format!("@{unix_secs}");
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpuproc::gpu::{DeviceFault, GpuErrorKind, HostProcess, Memory, ProcessKind, Utilization};

    fn snapshot() -> Snapshot {
        Snapshot {
            hostname: "node1".into(),
            timestamp_ms: 0,
            driver_version: Some("550.54.15".into()),
            devices: vec![
                Device {
                    index: 0,
                    name: Some("NVIDIA H100".into()),
                    memory: Some(Memory {
                        total: 80 * 1024 * MIB,
                        used: 40 * 1024 * MIB,
                        free: 40 * 1024 * MIB,
                    }),
                    utilization: Some(Utilization {
                        gpu: 88,
                        memory: 40,
                    }),
                    temperature_c: Some(61),
                    power_draw_mw: Some(598_000),
                    power_limit_mw: Some(700_000),
                    processes: Some(vec![GpuProcess {
                        pid: Some(23411),
                        nvml_pid: 23411,
                        used_memory: Some(34 * 1024 * MIB),
                        kind: ProcessKind::Compute,
                        gpu_instance_id: None,
                        compute_instance_id: None,
                        utilization: None,
                        host: Some(HostProcess {
                            user: Some("alice".into()),
                            cmdline: vec!["python".into(), "train.py".into()],
                            ..HostProcess::default()
                        }),
                    }]),
                    ..Device::default()
                },
                Device {
                    index: 1,
                    error: Some(DeviceFault {
                        kind: GpuErrorKind::GpuLost,
                        message: "GPU 1 is lost".into(),
                    }),
                    ..Device::default()
                },
            ],
            ..Snapshot::default()
        }
    }

    #[test]
    fn leased_gpus_name_their_holders() {
        use gpuproc::gpu::{Holder, PickedDevice};
        let lease = |pid: u32, uuid: &str| LeaseRecord {
            id: format!("l{pid}"),
            boot_id: String::new(),
            created_ms: 0,
            max_per_gpu: 2,
            holders: vec![Holder {
                pid,
                start_ticks: 1,
            }],
            devices: vec![PickedDevice {
                index: 0,
                uuid: uuid.into(),
                name: None,
            }],
        };
        let leases = [lease(12, "GPU-a"), lease(34, "GPU-a"), lease(56, "GPU-b")];
        assert_eq!(
            lease_note("GPU-a", &leases).as_deref(),
            Some("leased by pid 12, 34 (2 of 2 shares)")
        );
        assert_eq!(lease_note("GPU-c", &leases), None);
    }

    #[test]
    fn plain_table() {
        let style = Style {
            colour: false,
            processes: true,
        };
        let text = render(&snapshot(), &[], style);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("node1  "), "{text}");
        assert!(lines[0].ends_with("driver 550.54.15"), "{text}");
        assert_eq!(
            lines[1],
            "[0] NVIDIA H100   61°C   88 %  [██████████░░░░░░░░░░] 40960 / 81920 MiB  598 / 700 W"
        );
        assert_eq!(
            lines[2],
            "    └─ alice          23411   34816 MiB  python train.py"
        );
        assert_eq!(lines[3], "[1] ?            GPU 1 is lost");
        assert!(!text.contains('\x1b'));
    }

    #[test]
    fn colour_and_no_processes() {
        let style = Style {
            colour: true,
            processes: false,
        };
        let text = render(&snapshot(), &[], style);
        assert!(text.contains("\x1b[36m[0]\x1b[0m"));
        assert!(!text.contains("alice"));
        let empty = render(&Snapshot::default(), &[], style);
        assert!(empty.ends_with("no GPUs\n"));
    }
}
