//! Drawing `gpuproc top` with ratatui: the header, a panel per GPU, the process table and
//! the status line, laid out by [`model::layout`]. Drawing reads the [`App`] only.

use ratatui::layout::{Constraint, Layout as Split, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Paragraph, Row as TableRow, Sparkline, Table};
use ratatui::Frame;

use gpuproc::gpu::Device;

use super::app::{App, TableLine};
use super::model::{self, PanelMode};

const GIB: f64 = (1u64 << 30) as f64;
const MIB: u64 = 1 << 20;

/// Draws one frame.
pub fn draw(frame: &mut Frame<'_>, app: &mut App) {
    let area = frame.area();
    let [header, body, status] = Split::vertical([
        Constraint::Length(1),
        Constraint::Min(0),
        Constraint::Length(1),
    ])
    .areas(area);
    frame.render_widget(Paragraph::new(header_line(app)), header);

    let devices = &app.sample.snapshot.devices;
    let mig_lines: Vec<u16> = devices.iter().map(mig_count).collect();
    let layout = model::layout(body.width, body.height, &mig_lines);
    let [gpu_area, table_area] = Split::vertical([
        Constraint::Length(layout.gpu_lines),
        Constraint::Length(layout.table_lines),
    ])
    .areas(body);
    draw_gpus(frame, app, gpu_area, layout);
    draw_table(frame, app, table_area);
    frame.render_widget(Paragraph::new(status_line(app)), status);
}

fn mig_count(d: &Device) -> u16 {
    d.mig
        .as_ref()
        .filter(|m| m.enabled)
        .map_or(0, |m| u16::try_from(m.instances.len()).unwrap_or(u16::MAX))
}

fn header_line(app: &App) -> Line<'static> {
    let snap = &app.sample.snapshot;
    let mut spans = vec![
        Span::styled("gpuproc top", Style::new().add_modifier(Modifier::BOLD)),
        Span::raw("  "),
        Span::styled(snap.hostname.clone(), Style::new().fg(Color::Cyan)),
    ];
    if let Some(driver) = &snap.driver_version {
        spans.push(Span::raw(format!("  driver {driver}")));
    }
    if let Some(cuda) = snap.cuda_driver_version {
        spans.push(Span::raw(format!("  CUDA {cuda}")));
    }
    let procs: usize = snap
        .devices
        .iter()
        .map(|d| d.processes.as_ref().map_or(0, Vec::len))
        .sum();
    spans.push(Span::raw(format!(
        "  {} GPUs  {} processes",
        snap.devices.len(),
        procs
    )));
    if app.interval_s > 0.0 {
        spans.push(Span::styled(
            format!("  every {}s", app.interval_s),
            Style::new().fg(Color::DarkGray),
        ));
    }
    Line::from(spans)
}

fn status_line(app: &App) -> Line<'static> {
    if let Some(c) = &app.confirm {
        return Line::from(Span::styled(
            format!(
                "Send SIG{} to pid {} ({})? [y/N]",
                c.sig.name(),
                c.pid,
                truncate(&c.command, 40)
            ),
            Style::new().fg(Color::Black).bg(Color::Yellow),
        ));
    }
    if let Some(text) = &app.editing {
        return Line::from(vec![
            Span::styled("filter: ", Style::new().add_modifier(Modifier::BOLD)),
            Span::raw(format!("{text}_")),
            Span::styled(
                "  (Enter keeps, Esc clears)",
                Style::new().fg(Color::DarkGray),
            ),
        ]);
    }
    let mut spans = Vec::new();
    if let Some(message) = &app.message {
        spans.push(Span::styled(
            format!("{message}  "),
            Style::new().fg(Color::Yellow),
        ));
    }
    let arrow = if app.sort.descending() != app.reverse {
        "▼"
    } else {
        "▲"
    };
    spans.push(Span::raw(format!("sort {}{arrow}", app.sort.title())));
    if !app.filter.is_empty() {
        spans.push(Span::styled(
            format!("  filter \"{}\"", app.filter),
            Style::new().fg(Color::Magenta),
        ));
    }
    if app.tree {
        spans.push(Span::raw("  tree"));
    }
    spans.push(Span::styled(
        "  q quit  / filter  s sort  r reverse  t tree  ↑↓ select  T/K/I signal",
        Style::new().fg(Color::DarkGray),
    ));
    Line::from(spans)
}

/// `[████░░░░]` with `width` cells inside the brackets.
pub fn bar(fraction: f64, width: usize) -> String {
    let filled = ((fraction.clamp(0.0, 1.0) * width as f64).round() as usize).min(width);
    format!("[{}{}]", "█".repeat(filled), "░".repeat(width - filled))
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

fn level_colour(percent: u32) -> Color {
    match percent {
        p if p >= 90 => Color::Red,
        p if p >= 60 => Color::Yellow,
        _ => Color::Green,
    }
}

/// Temperature, power, fan, P-state, clocks and PCIe, as short parts.
fn figures(d: &Device, long: bool) -> Vec<Span<'static>> {
    let mut parts: Vec<Span<'static>> = Vec::new();
    let sep = || Span::raw("  ");
    if let Some(t) = d.temperature_c {
        let colour = if t >= 80 { Color::Red } else { Color::Reset };
        parts.push(Span::styled(format!("{t}°C"), Style::new().fg(colour)));
    }
    match (d.power_draw_mw, d.power_limit_mw) {
        (Some(p), Some(l)) => parts.push(Span::raw(format!("{}/{} W", p / 1000, l / 1000))),
        (Some(p), None) => parts.push(Span::raw(format!("{} W", p / 1000))),
        _ => {}
    }
    if let Some(f) = d.fan_speed_percent {
        parts.push(Span::raw(format!("fan {f}%")));
    }
    if long {
        if let Some(p) = d.performance_state {
            parts.push(Span::raw(format!("P{p}")));
        }
        if let (Some(sm), Some(mem)) = (d.clocks.sm_mhz, d.clocks.memory_mhz) {
            parts.push(Span::raw(format!("{sm}/{mem} MHz")));
        }
    }
    if let Some(pcie) = d.pcie {
        if let (Some(g), Some(w)) = (pcie.generation, pcie.width) {
            let mut text = format!("PCIe {g}x{w}");
            if long {
                if let (Some(rx), Some(tx)) = (pcie.rx_kib_per_s, pcie.tx_kib_per_s) {
                    text.push_str(&format!(" ↓{} ↑{}", rate(rx), rate(tx)));
                }
            }
            parts.push(Span::raw(text));
        }
    }
    if let Some(reasons) = &d.clock_event_reasons {
        if reasons.is_throttled() {
            parts.push(Span::styled("THROTTLED", Style::new().fg(Color::Red)));
        }
    }
    let mut out = Vec::new();
    for (i, p) in parts.into_iter().enumerate() {
        if i > 0 {
            out.push(sep());
        }
        out.push(p);
    }
    out
}

fn rate(kib_per_s: u32) -> String {
    let k = f64::from(kib_per_s);
    if k >= 1024.0 * 1024.0 {
        format!("{:.1}G/s", k / (1024.0 * 1024.0))
    } else if k >= 1024.0 {
        format!("{:.0}M/s", k / 1024.0)
    } else {
        format!("{k:.0}K/s")
    }
}

fn memory_text(d: &Device) -> String {
    match d.memory {
        Some(m) => format!("{:.1}/{:.1} GiB", m.used as f64 / GIB, m.total as f64 / GIB),
        None => "?".to_string(),
    }
}

fn bar_spans(label: &str, percent: Option<u32>, width: usize, tail: String) -> Vec<Span<'static>> {
    let colour = percent.map_or(Color::DarkGray, level_colour);
    vec![
        Span::raw(format!("{label} ")),
        Span::styled(
            bar(f64::from(percent.unwrap_or(0)) / 100.0, width),
            Style::new().fg(colour),
        ),
        Span::raw(format!(" {tail}")),
    ]
}

fn percent_text(p: Option<u32>) -> String {
    p.map_or("N/A".to_string(), |p| format!("{p:>3}%"))
}

fn mig_lines(d: &Device, width: usize) -> Vec<Line<'static>> {
    let Some(mig) = d.mig.as_ref().filter(|m| m.enabled) else {
        return Vec::new();
    };
    mig.instances
        .iter()
        .map(|m| {
            let name = m
                .name
                .as_deref()
                .and_then(|n| n.rsplit(' ').next())
                .unwrap_or("?");
            let (pct, text) = match m.memory {
                Some(mem) if mem.total > 0 => (
                    Some(u32::try_from(mem.used.saturating_mul(100) / mem.total).unwrap_or(100)),
                    format!(
                        "{:.1}/{:.1} GiB",
                        mem.used as f64 / GIB,
                        mem.total as f64 / GIB
                    ),
                ),
                _ => (None, "?".to_string()),
            };
            let mut spans = vec![Span::styled(
                format!(
                    " MIG {} {name:<8} GI {:<2}",
                    m.index,
                    m.gpu_instance_id.map_or("?".to_string(), |g| g.to_string())
                ),
                Style::new().fg(Color::Cyan),
            )];
            spans.extend(bar_spans(" MEM", pct, (width / 4).clamp(5, 20), text));
            Line::from(spans)
        })
        .collect()
}

fn title(d: &Device) -> String {
    format!(" {} {} ", d.index, d.name.as_deref().unwrap_or("?"))
}

fn draw_gpus(frame: &mut Frame<'_>, app: &App, area: Rect, layout: model::Layout) {
    let devices = &app.sample.snapshot.devices;
    if area.height == 0 {
        return;
    }
    match layout.mode {
        PanelMode::Full => {
            let columns = usize::from(layout.columns.max(1));
            let mut y = area.y;
            for chunk in devices.chunks(columns) {
                let tallest = chunk.iter().map(mig_count).max().unwrap_or(0);
                let height = model::FULL_PANEL
                    .saturating_add(tallest)
                    .min(area.bottom().saturating_sub(y));
                let row = Rect::new(area.x, y, area.width, height);
                let cells = Split::horizontal(vec![Constraint::Fill(1); columns]).split(row);
                for (d, cell) in chunk.iter().zip(cells.iter()) {
                    full_panel(frame, app, d, *cell);
                }
                y = y.saturating_add(height);
            }
        }
        PanelMode::Compact => {
            let mut lines = Vec::new();
            for d in devices {
                lines.extend(compact_lines(app, d, usize::from(area.width)));
            }
            frame.render_widget(Paragraph::new(lines), area);
        }
        PanelMode::Line => {
            let shown = usize::from(area.height);
            let mut lines: Vec<Line<'static>> = devices
                .iter()
                .take(shown)
                .map(|d| one_line(d, usize::from(area.width)))
                .collect();
            if devices.len() > shown && shown > 0 {
                lines.pop();
                lines.push(Line::styled(
                    format!(
                        " … {} more GPUs (a taller terminal shows them)",
                        devices.len() - shown + 1
                    ),
                    Style::new().fg(Color::DarkGray),
                ));
            }
            frame.render_widget(Paragraph::new(lines), area);
        }
    }
}

fn fault_line(d: &Device) -> Option<Line<'static>> {
    d.error.as_ref().map(|f| {
        Line::from(Span::styled(
            f.message.clone(),
            Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        ))
    })
}

fn full_panel(frame: &mut Frame<'_>, app: &App, d: &Device, area: Rect) {
    let mut block = Block::bordered().title(Span::styled(
        title(d),
        Style::new().add_modifier(Modifier::BOLD),
    ));
    if let Some(holder) = d
        .uuid
        .as_deref()
        .and_then(|u| model::gpu_holders(u, &app.sample))
    {
        block = block.title_bottom(Span::styled(
            format!(" {holder} "),
            Style::new().fg(Color::Magenta),
        ));
    }
    let inner = block.inner(area);
    frame.render_widget(block, area);
    if inner.height == 0 {
        return;
    }
    if let Some(fault) = fault_line(d) {
        frame.render_widget(Paragraph::new(fault), inner);
        return;
    }
    let width = usize::from(inner.width);
    let half = width / 2;
    let bar_width = half.saturating_sub(24).clamp(4, 40);
    let util = d.utilization.map(|u| u.gpu);
    let mem = model::memory_percent(d);
    let mut lines = vec![Line::from(figures(d, true))];
    let mut bars = bar_spans("MEM ", mem, bar_width, memory_text(d));
    let used: usize = bars.iter().map(|s| s.content.chars().count()).sum();
    bars.push(Span::raw(" ".repeat(half.saturating_sub(used))));
    bars.extend(bar_spans("UTIL", util, bar_width, percent_text(util)));
    lines.push(Line::from(bars));
    let [text, graphs, migs] = Split::vertical([
        Constraint::Length(2),
        Constraint::Length(2),
        Constraint::Min(0),
    ])
    .areas(inner);
    frame.render_widget(Paragraph::new(lines), text);
    let [left, right] = Split::horizontal([Constraint::Fill(1), Constraint::Fill(1)]).areas(graphs);
    let (util_hist, mem_hist) = app.history.of(d, usize::from(left.width.max(right.width)));
    let tail = |v: &[u64], w: u16| v[v.len().saturating_sub(usize::from(w))..].to_vec();
    // Each graph under its bar: memory on the left, utilisation on the right.
    frame.render_widget(
        Sparkline::default()
            .data(tail(&mem_hist, left.width))
            .max(100)
            .style(Style::new().fg(Color::Yellow)),
        left,
    );
    frame.render_widget(
        Sparkline::default()
            .data(tail(&util_hist, right.width))
            .max(100)
            .style(Style::new().fg(Color::Green)),
        right,
    );
    frame.render_widget(Paragraph::new(mig_lines(d, width)), migs);
}

fn compact_lines(app: &App, d: &Device, width: usize) -> Vec<Line<'static>> {
    let mut first = vec![Span::styled(
        format!(
            "{:>2} {}  ",
            d.index,
            truncate(d.name.as_deref().unwrap_or("?"), 28)
        ),
        Style::new().add_modifier(Modifier::BOLD),
    )];
    if let Some(fault) = fault_line(d) {
        first.extend(fault.spans);
        return vec![Line::from(first), Line::raw("")];
    }
    first.extend(figures(d, width >= 100));
    if let Some(holder) = d
        .uuid
        .as_deref()
        .and_then(|u| model::gpu_holders(u, &app.sample))
    {
        first.push(Span::styled(
            format!("  {holder}"),
            Style::new().fg(Color::Magenta),
        ));
    }
    let bar_width = (width / 2).saturating_sub(24).clamp(4, 40);
    let util = d.utilization.map(|u| u.gpu);
    let mut second = vec![Span::raw("   ")];
    second.extend(bar_spans(
        "MEM ",
        model::memory_percent(d),
        bar_width,
        memory_text(d),
    ));
    second.push(Span::raw("  "));
    second.extend(bar_spans("UTIL", util, bar_width, percent_text(util)));
    let mut out = vec![Line::from(first), Line::from(second)];
    out.extend(mig_lines(d, width));
    out
}

fn one_line(d: &Device, width: usize) -> Line<'static> {
    let name = d
        .name
        .as_deref()
        .unwrap_or("?")
        .trim_start_matches("NVIDIA ")
        .to_string();
    let mut spans = vec![Span::styled(
        format!("{:>2} {:<18} ", d.index, truncate(&name, 18)),
        Style::new().add_modifier(Modifier::BOLD),
    )];
    if let Some(fault) = fault_line(d) {
        spans.extend(fault.spans);
        return Line::from(spans);
    }
    let bar_width = width.saturating_sub(58).clamp(4, 30) / 2;
    let util = d.utilization.map(|u| u.gpu);
    let mem = model::memory_percent(d);
    spans.push(Span::raw(format!(
        "{:>4} {:>5} ",
        d.temperature_c.map_or("?".to_string(), |t| format!("{t}C")),
        d.power_draw_mw
            .map_or("?".to_string(), |p| format!("{}W", p / 1000)),
    )));
    spans.extend(bar_spans("MEM", mem, bar_width, percent_text(mem)));
    spans.push(Span::raw(" "));
    spans.extend(bar_spans("UTIL", util, bar_width, percent_text(util)));
    if let Some(m) = d.mig.as_ref().filter(|m| m.enabled) {
        spans.push(Span::styled(
            format!(" MIG×{}", m.instances.len()),
            Style::new().fg(Color::Cyan),
        ));
    }
    Line::from(spans)
}

/// `1h02m`, `3m07s`, `12s`, `2d03h`.
pub fn runtime(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// Bytes as `812M`, `34.0G`.
pub fn size(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1}G", bytes as f64 / GIB)
    } else {
        format!("{}M", bytes / MIB)
    }
}

/// Widths of the columns before COMMAND, which takes the rest.
const WIDTHS: [u16; 8] = [3, 7, 8, 3, 7, 4, 8, 6];

fn draw_table(frame: &mut Frame<'_>, app: &mut App, area: Rect) {
    if area.height == 0 {
        return;
    }
    let lines = app.lines();
    let rows_shown = usize::from(area.height.saturating_sub(1));
    app.scroll_to_selection(&lines, rows_shown);
    let selected = app.selected_index(&lines);
    let titles = [
        "GPU", "PID", "USER", "%SM", "GPU-MEM", "%CPU", "HOST-MEM", "TIME", "COMMAND",
    ];
    let header = TableRow::new(titles.iter().map(|t| {
        let style = if *t == app.sort.title() {
            Style::new().add_modifier(Modifier::BOLD | Modifier::UNDERLINED)
        } else {
            Style::new().add_modifier(Modifier::BOLD)
        };
        Span::styled(*t, style)
    }))
    .style(Style::new().bg(Color::DarkGray).fg(Color::White));
    let dash = || "-".to_string();
    let rows: Vec<TableRow<'static>> = lines
        .iter()
        .enumerate()
        .skip(app.scroll)
        .take(rows_shown)
        .map(|(i, line)| {
            let row = table_row(app, line, dash);
            if Some(i) == selected {
                row.style(Style::new().add_modifier(Modifier::REVERSED))
            } else {
                row
            }
        })
        .collect();
    let mut widths: Vec<Constraint> = WIDTHS.iter().map(|&w| Constraint::Length(w)).collect();
    widths.push(Constraint::Fill(1));
    let table = Table::new(rows, widths).header(header).column_spacing(1);
    frame.render_widget(table, area);
    if lines.is_empty() && area.height > 1 {
        let text = if app.filter.is_empty() {
            "no processes on any GPU"
        } else {
            "no process matches the filter"
        };
        frame.render_widget(
            Paragraph::new(Line::styled(
                format!(" {text}"),
                Style::new().fg(Color::DarkGray),
            )),
            Rect::new(area.x, area.y + 1, area.width, 1),
        );
    }
}

fn table_row(app: &App, line: &TableLine, dash: impl Fn() -> String) -> TableRow<'static> {
    let indent = if line.depth > 0 {
        format!("{}└ ", "  ".repeat(line.depth - 1))
    } else {
        String::new()
    };
    let Some(r) = &line.row else {
        // A tree ancestor on no GPU.
        let pid = line.ancestor.unwrap_or(0);
        let host = app.sample.hosts.get(&pid);
        return TableRow::new(vec![
            Span::raw(""),
            Span::raw(pid.to_string()),
            Span::raw(host.map(|h| h.user.clone()).unwrap_or_default()),
            Span::raw(""),
            Span::raw(""),
            Span::raw(""),
            Span::raw(""),
            Span::raw(""),
            Span::styled(
                format!(
                    "{indent}{}",
                    host.map(|h| h.command.clone()).unwrap_or_default()
                ),
                Style::new().fg(Color::DarkGray),
            ),
        ]);
    };
    let gpu = match r.mig {
        Some(m) => format!("{}/{m}", r.gpu),
        None => r.gpu.to_string(),
    };
    let pid = match r.pid {
        Some(p) => p.to_string(),
        None => format!("({})", r.nvml_pid),
    };
    let mut command = vec![Span::raw(indent)];
    if let Some(holder) = &r.holder {
        command.push(Span::styled(
            format!("[{holder}] "),
            Style::new().fg(Color::Magenta),
        ));
    }
    if r.kind != "C" {
        command.push(Span::styled(
            format!("{} ", r.kind),
            Style::new().fg(Color::Cyan),
        ));
    }
    command.push(Span::raw(if r.command.is_empty() {
        "?".to_string()
    } else {
        r.command.clone()
    }));
    TableRow::new(vec![
        Line::raw(gpu),
        Line::raw(pid).right_aligned(),
        Line::raw(truncate(&r.user, 8)),
        Line::raw(r.sm.map_or_else(&dash, |v| v.to_string())).right_aligned(),
        Line::raw(r.gpu_memory.map_or_else(&dash, size)).right_aligned(),
        Line::raw(r.cpu.map_or_else(&dash, |v| format!("{v:.0}"))).right_aligned(),
        Line::raw(r.host_memory.map_or_else(&dash, size)).right_aligned(),
        Line::raw(r.runtime_ms.map_or_else(&dash, runtime)).right_aligned(),
        Line::from(command),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(runtime(12_000), "12s");
        assert_eq!(runtime(187_000), "3m07s");
        assert_eq!(runtime(3_720_000), "1h02m");
        assert_eq!(runtime(2 * 86_400_000 + 3 * 3_600_000), "2d03h");
        assert_eq!(size(812 << 20), "812M");
        assert_eq!(size(34 << 30), "34.0G");
        assert_eq!(bar(0.5, 4), "[██░░]");
        assert_eq!(bar(7.0, 2), "[██]");
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(rate(900), "900K/s");
        assert_eq!(rate(2_400_000), "2.3G/s");
    }
}
