//! `gpuproc top`: a live view of the GPUs, their history and their processes, with sorting,
//! a filter, a tree of process families and signals, knowing which gpuproc lease or `run`
//! job holds each GPU and process.
//!
//! A sampling thread owns NVML and sends a [`model::Sample`] every interval; the UI thread
//! only waits for keys and samples, so a slow driver never freezes the screen.
//! [`model`] and [`app`] are pure (unit tested), [`view`] draws with ratatui.

pub mod app;
pub mod model;
pub mod sys;
pub mod view;

use std::io::{self, IsTerminal, Write};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context;
use crossterm::event::{self, Event, KeyEventKind};
use crossterm::terminal::{self, EnterAlternateScreen, LeaveAlternateScreen};
use crossterm::{cursor, execute};
use gpuproc::gpu::Gpus;
use ratatui::backend::{CrosstermBackend, TestBackend};
use ratatui::buffer::Buffer;
use ratatui::Terminal;

use crate::cli::TopArgs;
use app::{Action, App};
use model::Sample;

/// Takes one sample: the snapshot, the leases and what holds them, the process families.
pub fn sample(gpus: &Gpus) -> Result<Sample, gpuproc::gpu::GpuError> {
    let snapshot = gpus.snapshot()?;
    // Leases are advisory here: a missing or unreadable table shows none.
    let leases = gpuproc::gpu::leases()
        .map(|t| t.leases().to_vec())
        .unwrap_or_default();
    let lease_labels = leases
        .iter()
        .map(|l| {
            let holders = l.holders.iter().map(|h| h.pid);
            let parents = l.holders.iter().filter_map(|h| sys::ppid(h.pid));
            let cmdlines: Vec<Vec<String>> = holders.chain(parents).map(sys::cmdline).collect();
            (l.id.clone(), model::holder_label(&cmdlines))
        })
        .collect();
    let pids: Vec<u32> = snapshot
        .devices
        .iter()
        .flat_map(|d| d.processes.iter().flatten())
        .filter_map(|p| p.pid)
        .collect();
    let (ancestors, hosts) = sys::ancestry(pids);
    Ok(Sample {
        snapshot,
        leases,
        lease_labels,
        ancestors,
        hosts,
    })
}

/// Draws one frame of `app` at `width` x `height` into a buffer.
pub fn frame(app: &mut App, width: u16, height: u16) -> anyhow::Result<Buffer> {
    let mut terminal = Terminal::new(TestBackend::new(width, height))?;
    terminal.draw(|f| view::draw(f, app))?;
    Ok(terminal.backend().buffer().clone())
}

/// The buffer as text, one line per row, trailing spaces removed.
pub fn buffer_text(buffer: &Buffer) -> String {
    let width = usize::from(buffer.area.width);
    let mut out = String::new();
    for row in buffer.content.chunks(width.max(1)) {
        let line: String = row.iter().filter(|c| !c.skip).map(|c| c.symbol()).collect();
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The size for `--once`: the terminal's, else `$COLUMNS` x `$LINES`, else 80x24.
fn once_size() -> (u16, u16) {
    if io::stdout().is_terminal() {
        if let Ok(size) = terminal::size() {
            return size;
        }
    }
    let env = |k: &str, d: u16| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse::<u16>().ok())
            .filter(|&v| v >= 10)
            .unwrap_or(d)
    };
    (env("COLUMNS", 80), env("LINES", 24))
}

pub fn run(args: &TopArgs) -> anyhow::Result<()> {
    let gpus = Gpus::open()?;
    let mut app = App {
        tree: args.tree,
        filter: args.filter.clone().unwrap_or_default(),
        interval_s: args.interval,
        ..App::default()
    };
    if let Some(frames) = args.bench_frames {
        return bench(&gpus, &mut app, frames);
    }
    if args.once {
        app.update(sample(&gpus)?);
        let (width, height) = once_size();
        let text = buffer_text(&frame(&mut app, width, height)?);
        let mut out = io::stdout().lock();
        out.write_all(text.as_bytes())
            .and_then(|()| out.flush())
            .context("writing to standard output")?;
        return Ok(());
    }
    if !io::stdout().is_terminal() {
        anyhow::bail!("gpuproc top needs a terminal; use --once to print one frame");
    }
    interactive(gpus, app, crate::units::seconds(args.interval))
}

/// Restores the terminal when dropped, also when a panic unwinds.
struct Screen;

impl Screen {
    fn enter() -> io::Result<Screen> {
        terminal::enable_raw_mode()?;
        let screen = Screen;
        execute!(io::stdout(), EnterAlternateScreen, cursor::Hide)?;
        Ok(screen)
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let _ = execute!(io::stdout(), LeaveAlternateScreen, cursor::Show);
        let _ = terminal::disable_raw_mode();
    }
}

fn interactive(gpus: Gpus, mut app: App, interval: Duration) -> anyhow::Result<()> {
    let (samples_tx, samples) = mpsc::channel::<Result<Sample, String>>();
    let (stop, stopped) = mpsc::channel::<()>();
    let sampler = std::thread::Builder::new()
        .name("gpuproc-top-sampler".into())
        .spawn(move || loop {
            let s = sample(&gpus).map_err(|e| e.to_string());
            if samples_tx.send(s).is_err() {
                return;
            }
            match stopped.recv_timeout(interval) {
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                _ => return,
            }
        })
        .context("starting the sampling thread")?;

    let screen = Screen::enter().context("setting up the terminal")?;
    let mut terminal = Terminal::new(CrosstermBackend::new(io::stdout()))?;
    terminal.clear()?;
    let result = (|| -> anyhow::Result<()> {
        let mut dirty = true;
        loop {
            loop {
                match samples.try_recv() {
                    Ok(Ok(s)) => {
                        app.update(s);
                        dirty = true;
                    }
                    Ok(Err(e)) => {
                        app.message = Some(e);
                        dirty = true;
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        anyhow::bail!("the sampling thread stopped")
                    }
                }
            }
            if dirty {
                terminal.draw(|f| view::draw(f, &mut app))?;
                dirty = false;
            }
            if !event::poll(Duration::from_millis(50))? {
                continue;
            }
            match event::read()? {
                Event::Key(key) if key.kind != KeyEventKind::Release => match app.key(key) {
                    Action::Quit => return Ok(()),
                    Action::Signal(pid, sig) => app.message = Some(sys::signal(pid, sig)),
                    Action::Redraw => {}
                },
                Event::Resize(..) => {}
                _ => continue,
            }
            dirty = true;
        }
    })();
    drop(screen);
    drop(stop);
    let _ = sampler.join();
    result
}

/// `--bench-frames N`: N samples and N redraws at 200x60, printing the CPU time of each.
fn bench(gpus: &Gpus, app: &mut App, frames: u32) -> anyhow::Result<()> {
    let frames = frames.max(1);
    let mut sampling = Duration::ZERO;
    let mut drawing = Duration::ZERO;
    let mut terminal = Terminal::new(TestBackend::new(200, 60))?;
    let wall = Instant::now();
    for _ in 0..frames {
        let t = sys::thread_cpu_time();
        let s = sample(gpus)?;
        let u = sys::thread_cpu_time();
        app.update(s);
        terminal.draw(|f| view::draw(f, app))?;
        let v = sys::thread_cpu_time();
        sampling += u.saturating_sub(t);
        drawing += v.saturating_sub(u);
    }
    let snap = &app.sample.snapshot;
    let processes: usize = snap
        .devices
        .iter()
        .map(|d| d.processes.as_ref().map_or(0, Vec::len))
        .sum();
    println!(
        "{{\"gpus\":{},\"processes\":{},\"frames\":{frames},\"sample_cpu_ms\":{:.3},\"draw_cpu_ms\":{:.3},\"wall_ms\":{:.3}}}",
        snap.devices.len(),
        processes,
        sampling.as_secs_f64() * 1e3 / f64::from(frames),
        drawing.as_secs_f64() * 1e3 / f64::from(frames),
        wall.elapsed().as_secs_f64() * 1e3 / f64::from(frames),
    );
    Ok(())
}
