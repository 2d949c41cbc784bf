//! The state of `gpuproc top` between frames, and what each key does to it: no terminal and
//! no system calls here, so every interaction is a unit test.

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use super::model::{self, History, Row, Sample, SortKey, TreeLine, TreeNode};

/// A signal `top` can send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sig {
    /// SIGTERM.
    Term,
    /// SIGKILL.
    Kill,
    /// SIGINT.
    Int,
}

impl Sig {
    /// `TERM`, `KILL`, `INT`.
    pub fn name(self) -> &'static str {
        match self {
            Sig::Term => "TERM",
            Sig::Kill => "KILL",
            Sig::Int => "INT",
        }
    }
}

/// What the event loop must do after a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Redraw.
    Redraw,
    /// Leave.
    Quit,
    /// Send the signal to the pid (confirmed), then redraw.
    Signal(u32, Sig),
}

/// A question waiting for y/n.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confirm {
    /// The pid to signal.
    pub pid: u32,
    /// The signal.
    pub sig: Sig,
    /// What the process runs, for the question.
    pub command: String,
}

/// The whole state.
#[derive(Debug, Default)]
pub struct App {
    /// The latest sample.
    pub sample: Sample,
    /// Every sample's utilisation and memory.
    pub history: History,
    /// The process table's sort key.
    pub sort: SortKey,
    /// Reverse the key's natural direction.
    pub reverse: bool,
    /// The filter in force.
    pub filter: String,
    /// The filter being typed after `/`, until Enter or Esc.
    pub editing: Option<String>,
    /// Show process families.
    pub tree: bool,
    /// The selected process (by pid), kept across refreshes.
    pub selected: Option<u32>,
    /// The first table line shown.
    pub scroll: usize,
    /// A signal waiting for confirmation.
    pub confirm: Option<Confirm>,
    /// A one-line message (the outcome of a signal, an error).
    pub message: Option<String>,
    /// How many rows the table showed at the last draw (for page keys).
    pub page: usize,
    /// The sampling interval, for the status line.
    pub interval_s: f64,
}

/// A table line: a process row (index into the visible rows) or a tree ancestor.
#[derive(Debug, Clone, PartialEq)]
pub struct TableLine {
    /// Tree depth (0 outside the tree view).
    pub depth: usize,
    /// The row, or `None` for an ancestor line.
    pub row: Option<Row>,
    /// For an ancestor line: its pid.
    pub ancestor: Option<u32>,
}

impl App {
    /// Takes a new sample.
    pub fn update(&mut self, sample: Sample) {
        self.history.push(&sample.snapshot);
        self.sample = sample;
    }

    /// The filtered, sorted process rows, as table lines (in tree order with the tree on).
    pub fn lines(&self) -> Vec<TableLine> {
        let mut rows: Vec<Row> = model::rows(&self.sample)
            .into_iter()
            .filter(|r| model::matches(r, &self.filter))
            .collect();
        model::sort_rows(&mut rows, self.sort, self.reverse);
        if !self.tree {
            return rows
                .into_iter()
                .map(|row| TableLine {
                    depth: 0,
                    row: Some(row),
                    ancestor: None,
                })
                .collect();
        }
        model::tree(&rows, &self.sample.ancestors)
            .into_iter()
            .map(|TreeLine { depth, node }| match node {
                TreeNode::Row(i) => TableLine {
                    depth,
                    row: Some(rows[i].clone()),
                    ancestor: None,
                },
                TreeNode::Ancestor(pid) => TableLine {
                    depth,
                    row: None,
                    ancestor: Some(pid),
                },
            })
            .collect()
    }

    /// The pid of a table line (a row's shown pid, or the ancestor's).
    fn pid_of(line: &TableLine) -> Option<u32> {
        line.row.as_ref().map(Row::shown_pid).or(line.ancestor)
    }

    /// Index of the selected line in `lines`, if the selected pid is there.
    pub fn selected_index(&self, lines: &[TableLine]) -> Option<usize> {
        let pid = self.selected?;
        lines.iter().position(|l| Self::pid_of(l) == Some(pid))
    }

    fn move_selection(&mut self, by: isize) {
        let lines = self.lines();
        if lines.is_empty() {
            self.selected = None;
            return;
        }
        let last = lines.len() - 1;
        let next = match self.selected_index(&lines) {
            None if by < 0 => last,
            None => 0,
            Some(i) => i.saturating_add_signed(by).min(last),
        };
        self.selected = Self::pid_of(&lines[next]);
    }

    /// Keeps the selected line inside the `rows` lines shown from `scroll`.
    pub fn scroll_to_selection(&mut self, lines: &[TableLine], rows: usize) {
        self.page = rows;
        let Some(i) = self.selected_index(lines) else {
            self.scroll = self.scroll.min(lines.len().saturating_sub(rows));
            return;
        };
        if i < self.scroll {
            self.scroll = i;
        } else if rows > 0 && i >= self.scroll + rows {
            self.scroll = i + 1 - rows;
        }
    }

    /// What a key does.
    pub fn key(&mut self, key: KeyEvent) -> Action {
        if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
            return Action::Quit;
        }
        if let Some(confirm) = self.confirm.take() {
            return match key.code {
                KeyCode::Char('y') | KeyCode::Char('Y') => Action::Signal(confirm.pid, confirm.sig),
                _ => {
                    self.message = Some("not sent".to_string());
                    Action::Redraw
                }
            };
        }
        if let Some(text) = self.editing.as_mut() {
            match key.code {
                KeyCode::Enter => {
                    self.editing = None;
                }
                KeyCode::Esc => {
                    self.editing = None;
                    self.filter.clear();
                }
                KeyCode::Backspace => {
                    text.pop();
                    self.filter = text.clone();
                }
                KeyCode::Char(c) => {
                    text.push(c);
                    self.filter = text.clone();
                }
                _ => {}
            }
            return Action::Redraw;
        }
        self.message = None;
        match key.code {
            KeyCode::Char('q') => return Action::Quit,
            KeyCode::Esc if self.filter.is_empty() => return Action::Quit,
            KeyCode::Esc => self.filter.clear(),
            KeyCode::Char('/') => self.editing = Some(self.filter.clone()),
            KeyCode::Char('s') | KeyCode::Char('>') => self.sort = self.sort.cycle(true),
            KeyCode::Char('S') | KeyCode::Char('<') => self.sort = self.sort.cycle(false),
            KeyCode::Char('r') => self.reverse = !self.reverse,
            KeyCode::Char('t') => self.tree = !self.tree,
            KeyCode::Char(c @ ('g' | 'p' | 'u' | 'm' | 'c' | 'h' | 'e' | 'n' | 'M')) => {
                let key = match c {
                    'g' => SortKey::Gpu,
                    'p' => SortKey::Pid,
                    'u' => SortKey::User,
                    'm' => SortKey::Sm,
                    'M' => SortKey::GpuMemory,
                    'c' => SortKey::Cpu,
                    'h' => SortKey::HostMemory,
                    'e' => SortKey::Runtime,
                    _ => SortKey::Command,
                };
                if self.sort == key {
                    self.reverse = !self.reverse;
                } else {
                    self.sort = key;
                    self.reverse = false;
                }
            }
            KeyCode::Up | KeyCode::Char('k') => self.move_selection(-1),
            KeyCode::Down | KeyCode::Char('j') => self.move_selection(1),
            KeyCode::PageUp => self.move_selection(-(self.page.max(1) as isize)),
            KeyCode::PageDown => self.move_selection(self.page.max(1) as isize),
            KeyCode::Home => self.move_selection(isize::MIN / 2),
            KeyCode::End => self.move_selection(isize::MAX / 2),
            KeyCode::Char(c @ ('T' | 'K' | 'I')) => {
                let sig = match c {
                    'T' => Sig::Term,
                    'K' => Sig::Kill,
                    _ => Sig::Int,
                };
                let lines = self.lines();
                match self.selected_index(&lines).map(|i| &lines[i]) {
                    Some(TableLine { row: Some(row), .. }) if row.pid.is_some() => {
                        self.confirm = Some(Confirm {
                            pid: row.shown_pid(),
                            sig,
                            command: row.command.clone(),
                        });
                    }
                    Some(TableLine {
                        ancestor: Some(pid),
                        ..
                    }) => {
                        let command = self
                            .sample
                            .hosts
                            .get(pid)
                            .map(|h| h.command.clone())
                            .unwrap_or_default();
                        self.confirm = Some(Confirm {
                            pid: *pid,
                            sig,
                            command,
                        });
                    }
                    _ => {
                        self.message =
                            Some("select a process on this host first (arrow keys)".to_string())
                    }
                }
            }
            _ => {}
        }
        Action::Redraw
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpuproc::gpu::{Device, GpuProcess, HostProcess, ProcessKind};

    fn press(app: &mut App, code: KeyCode) -> Action {
        app.key(KeyEvent::new(code, KeyModifiers::NONE))
    }

    fn app() -> App {
        let process = |pid: u32, mem: u64, cmd: &str| GpuProcess {
            pid: Some(pid),
            nvml_pid: pid,
            used_memory: Some(mem),
            kind: ProcessKind::Compute,
            gpu_instance_id: None,
            compute_instance_id: None,
            utilization: None,
            host: Some(HostProcess {
                cmdline: vec![cmd.to_string()],
                ..HostProcess::default()
            }),
        };
        let mut app = App::default();
        let mut sample = Sample::default();
        sample.snapshot.devices = vec![
            Device {
                index: 0,
                processes: Some(vec![process(10, 5, "small"), process(11, 50, "big")]),
                ..Device::default()
            },
            Device {
                index: 1,
                processes: Some(vec![process(12, 20, "mid")]),
                ..Device::default()
            },
        ];
        app.update(sample);
        app
    }

    fn shown(app: &App) -> Vec<u32> {
        app.lines()
            .iter()
            .filter_map(|l| l.row.as_ref().map(Row::shown_pid))
            .collect()
    }

    #[test]
    fn sort_keys_filter_and_selection() {
        let mut app = app();
        assert_eq!(shown(&app), [10, 11, 12]);
        press(&mut app, KeyCode::Char('M'));
        assert_eq!(shown(&app), [11, 12, 10]);
        press(&mut app, KeyCode::Char('M'));
        assert_eq!(shown(&app), [10, 12, 11], "the same key again reverses");
        press(&mut app, KeyCode::Char('s'));
        assert_eq!(app.sort, SortKey::Cpu);

        // Filter: typed after '/', applied as typed, kept after Enter, cleared by Esc.
        press(&mut app, KeyCode::Char('/'));
        for c in "bi".chars() {
            press(&mut app, KeyCode::Char(c));
        }
        assert_eq!(shown(&app), [11]);
        press(&mut app, KeyCode::Backspace);
        assert_eq!(app.filter, "b");
        press(&mut app, KeyCode::Char('i'));
        press(&mut app, KeyCode::Enter);
        assert_eq!((app.editing.as_deref(), app.filter.as_str()), (None, "bi"));
        assert_eq!(press(&mut app, KeyCode::Char('q')), Action::Quit);
        press(&mut app, KeyCode::Esc);
        assert_eq!(app.filter, "");

        // Selection follows the pid across re-sorting.
        press(&mut app, KeyCode::Char('g'));
        press(&mut app, KeyCode::Down);
        press(&mut app, KeyCode::Down);
        assert_eq!(app.selected, Some(11));
        press(&mut app, KeyCode::Char('M'));
        let lines = app.lines();
        assert_eq!(app.selected_index(&lines), Some(0));
        press(&mut app, KeyCode::End);
        assert_eq!(app.selected, Some(10));
        press(&mut app, KeyCode::Home);
        assert_eq!(app.selected, Some(11));
    }

    #[test]
    fn signals_need_confirmation() {
        let mut app = app();
        // Nothing selected: a message, no question.
        assert_eq!(press(&mut app, KeyCode::Char('K')), Action::Redraw);
        assert!(app.confirm.is_none() && app.message.is_some());
        press(&mut app, KeyCode::Down);
        press(&mut app, KeyCode::Char('K'));
        let c = app.confirm.clone().unwrap();
        assert_eq!((c.pid, c.sig, c.command.as_str()), (10, Sig::Kill, "small"));
        // Anything but y declines.
        assert_eq!(press(&mut app, KeyCode::Char('n')), Action::Redraw);
        assert!(app.confirm.is_none());
        press(&mut app, KeyCode::Char('T'));
        assert_eq!(
            press(&mut app, KeyCode::Char('y')),
            Action::Signal(10, Sig::Term)
        );
        press(&mut app, KeyCode::Char('I'));
        assert_eq!(
            press(&mut app, KeyCode::Char('Y')),
            Action::Signal(10, Sig::Int)
        );
        assert_eq!(
            app.key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)),
            Action::Quit
        );
    }

    #[test]
    fn scrolling_keeps_the_selection_in_view() {
        let mut app = app();
        let lines = app.lines();
        app.selected = Some(12);
        app.scroll_to_selection(&lines, 2);
        assert_eq!(app.scroll, 1);
        app.selected = Some(10);
        app.scroll_to_selection(&lines, 2);
        assert_eq!(app.scroll, 0);
    }
}
