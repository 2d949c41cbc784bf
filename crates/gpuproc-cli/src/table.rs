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
    /// Add lines under each GPU with PCIe, NVLink, BAR1, video engines, energy, clock
    /// event reasons and ECC pages.
    pub details: bool,
}

/// The width detail lines are wrapped to.
const DETAIL_WIDTH: usize = 80;

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
        if style.details && device.error.is_none() {
            for line in detail_lines(device, DETAIL_WIDTH) {
                let _ = writeln!(out, "{}", p.paint("90", &line));
            }
        }
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

/// KiB/s as a short rate: `900 KiB/s`, `12.5 MiB/s`, `2.3 GiB/s`.
fn rate(kib_per_s: u64) -> String {
    match kib_per_s {
        k if k < 1024 => format!("{k} KiB/s"),
        k if k < 1024 * 1024 => format!("{:.1} MiB/s", k as f64 / 1024.0),
        k => format!("{:.1} GiB/s", k as f64 / (1024.0 * 1024.0)),
    }
}

/// The details of a device as short parts (`PCIe 5x16 of 5x16`, `NVLink 18/18`, ...), in a
/// fixed order; parts the device does not report are left out.
pub fn detail_parts(d: &Device) -> Vec<String> {
    let mut parts = Vec::new();
    let known = |v: Option<u32>| v.map_or("?".to_string(), |v| v.to_string());
    if let Some(pcie) = d.pcie {
        parts.push(format!(
            "PCIe gen {} x{} (max gen {} x{})",
            known(pcie.generation),
            known(pcie.width),
            known(pcie.max_generation),
            known(pcie.max_width)
        ));
        if let (Some(tx), Some(rx)) = (pcie.tx_kib_per_s, pcie.rx_kib_per_s) {
            parts.push(format!(
                "tx {} rx {}",
                rate(u64::from(tx)),
                rate(u64::from(rx))
            ));
        }
    }
    if let Some(nvlink) = &d.nvlink {
        parts.push(format!(
            "NVLink {}/{} up",
            nvlink.active(),
            nvlink.links.len()
        ));
    }
    if let Some(bar1) = d.bar1_memory {
        parts.push(format!(
            "BAR1 {} / {} MiB",
            bar1.used / MIB,
            bar1.total / MIB
        ));
    }
    match (d.encoder_utilization, d.decoder_utilization) {
        (None, None) => {}
        (enc, dec) => parts.push(format!("enc {} % dec {} %", known(enc), known(dec))),
    }
    if let Some(mj) = d.total_energy_mj {
        parts.push(format!("energy {:.1} kWh", mj as f64 / 3.6e9));
    }
    if let Some(reasons) = &d.clock_event_reasons {
        if !reasons.reasons.is_empty() {
            parts.push(format!("clocks: {}", reasons.reasons.join(",")));
        }
    }
    if let Some(ecc) = d.ecc_errors {
        parts.push(format!(
            "ECC corrected {} uncorrected {}",
            ecc.volatile_corrected
                .map_or("?".to_string(), |v| v.to_string()),
            ecc.volatile_uncorrected
                .map_or("?".to_string(), |v| v.to_string())
        ));
    }
    if let Some(rows) = d.remapped_rows {
        let mut part = format!(
            "remapped rows {} + {}",
            rows.correctable, rows.uncorrectable
        );
        if rows.pending {
            part.push_str(" (reset pending)");
        }
        if rows.failure {
            part.push_str(" (FAILED)");
        }
        parts.push(part);
    }
    if let Some(pages) = d.retired_pages {
        let mut part = format!("retired pages {} + {}", pages.single_bit, pages.double_bit);
        if pages.pending == Some(true) {
            part.push_str(" (pending)");
        }
        parts.push(part);
    }
    parts
}

/// The detail parts packed into lines of at most `width` columns (a part longer than that
/// stands alone), each indented by four spaces.
pub fn detail_lines(d: &Device, width: usize) -> Vec<String> {
    const INDENT: &str = "    ";
    let mut lines: Vec<String> = Vec::new();
    let mut line = String::new();
    for part in detail_parts(d) {
        let needed = if line.is_empty() {
            INDENT.len() + part.chars().count()
        } else {
            line.chars().count() + 2 + part.chars().count()
        };
        if !line.is_empty() && needed > width {
            lines.push(std::mem::take(&mut line));
        }
        if line.is_empty() {
            line.push_str(INDENT);
        } else {
            line.push_str("  ");
        }
        line.push_str(&part);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
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
    // The process's SM share, when the driver sampled it.
    let sm = process
        .utilization
        .and_then(|u| u.sm)
        .map(|sm| format!("  {}", p.paint("32", &format!("{sm:>3} %SM"))))
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "    └─ {}  {:>8}  {:>10}{sm}  {}",
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
    use gpuproc::gpu::{
        ClockEventReasons, DeviceFault, GpuErrorKind, HostProcess, Memory, NvLink, Pcie,
        ProcessKind, ProcessUtilization, RemappedRows, Utilization,
    };

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
            details: false,
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
            details: false,
        };
        let text = render(&snapshot(), &[], style);
        assert!(text.contains("\x1b[36m[0]\x1b[0m"));
        assert!(!text.contains("alice"));
        let empty = render(&Snapshot::default(), &[], style);
        assert!(empty.ends_with("no GPUs\n"));
    }

    #[test]
    fn details_fit_in_80_columns_and_processes_show_their_sm_share() {
        let mut snap = snapshot();
        let d = &mut snap.devices[0];
        d.pcie = Some(Pcie {
            generation: Some(5),
            max_generation: Some(5),
            width: Some(16),
            max_width: Some(16),
            tx_kib_per_s: Some(900),
            rx_kib_per_s: Some(2_400_000),
        });
        d.nvlink = Some(NvLink {
            links: vec![true, true, false],
            tx_kib: None,
            rx_kib: None,
        });
        d.bar1_memory = Some(Memory {
            total: 128 * 1024 * MIB,
            used: MIB,
            free: 128 * 1024 * MIB - MIB,
        });
        d.encoder_utilization = Some(12);
        d.decoder_utilization = None;
        d.total_energy_mj = Some(7_200_000_000);
        d.clock_event_reasons = Some(ClockEventReasons::from_mask(0x4 | 0x20));
        d.remapped_rows = Some(RemappedRows {
            correctable: 1,
            uncorrectable: 0,
            pending: true,
            failure: false,
        });
        d.processes.as_mut().unwrap()[0].utilization = Some(ProcessUtilization {
            sm: Some(45),
            ..ProcessUtilization::default()
        });
        let style = Style {
            colour: false,
            processes: true,
            details: true,
        };
        let text = render(&snap, &[], style);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            &lines[2..6],
            [
                "    PCIe gen 5 x16 (max gen 5 x16)  tx 900 KiB/s rx 2.3 GiB/s  NVLink 2/3 up",
                "    BAR1 1 / 131072 MiB  enc 12 % dec ? %  energy 2.0 kWh",
                "    clocks: sw_power_cap,sw_thermal_slowdown",
                "    remapped rows 1 + 0 (reset pending)",
            ],
            "{text}"
        );
        assert!(
            lines.iter().skip(2).all(|l| l.chars().count() <= 80),
            "{text}"
        );
        assert_eq!(
            lines[6],
            "    └─ alice          23411   34816 MiB   45 %SM  python train.py"
        );
        // A lost GPU has no detail lines; without the flag there are none at all.
        assert_eq!(lines[7], "[1] ?            GPU 1 is lost");
        let plain = render(
            &snap,
            &[],
            Style {
                details: false,
                ..style
            },
        );
        assert!(!plain.contains("PCIe"));
    }
}
