//! What `gpuproc top` shows, as pure functions of a sample: the process rows, their sort
//! order, the filter, the tree of process families, who holds each GPU and process, and the
//! history behind the graphs.

use std::cmp::Ordering;
use std::collections::{HashMap, HashSet, VecDeque};

use gpuproc::gpu::{Device, LeaseRecord, Snapshot};

/// How many samples of history each GPU keeps (enough for the widest graph).
pub const HISTORY: usize = 512;

/// A process that is not on a GPU but matters to one that is: an ancestor shown in the
/// tree, or the holder of a lease.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostInfo {
    /// Parent pid.
    pub ppid: Option<u32>,
    /// User name (or uid).
    pub user: String,
    /// Command line.
    pub command: String,
}

/// One sample from the sampling thread: the snapshot and what gpuproc knows around it.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// The GPUs and their processes.
    pub snapshot: Snapshot,
    /// gpuproc's leases in force.
    pub leases: Vec<LeaseRecord>,
    /// For each lease (by id), what holds it: `run job`, `pick --hold`, `pool` ...
    pub lease_labels: HashMap<String, String>,
    /// Each GPU process's ancestors, nearest first, up to (not including) pid 1.
    pub ancestors: HashMap<u32, Vec<u32>>,
    /// The ancestors themselves.
    pub hosts: HashMap<u32, HostInfo>,
}

/// The columns the process table sorts by.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SortKey {
    /// GPU index, then pid.
    #[default]
    Gpu,
    /// Process id.
    Pid,
    /// User name.
    User,
    /// Per-process SM utilisation.
    Sm,
    /// GPU memory.
    GpuMemory,
    /// CPU use.
    Cpu,
    /// Resident host memory.
    HostMemory,
    /// Time since the process started.
    Runtime,
    /// Command line.
    Command,
}

impl SortKey {
    /// Every key, in the order `s` cycles through them.
    pub const ALL: [SortKey; 9] = [
        SortKey::Gpu,
        SortKey::Pid,
        SortKey::User,
        SortKey::Sm,
        SortKey::GpuMemory,
        SortKey::Cpu,
        SortKey::HostMemory,
        SortKey::Runtime,
        SortKey::Command,
    ];

    /// The next key (`forward`) or the previous one, wrapping around.
    pub fn cycle(self, forward: bool) -> SortKey {
        let n = Self::ALL.len();
        let i = Self::ALL.iter().position(|&k| k == self).unwrap_or(0);
        Self::ALL[if forward {
            (i + 1) % n
        } else {
            (i + n - 1) % n
        }]
    }

    /// The column title this key sorts.
    pub fn title(self) -> &'static str {
        match self {
            SortKey::Gpu => "GPU",
            SortKey::Pid => "PID",
            SortKey::User => "USER",
            SortKey::Sm => "%SM",
            SortKey::GpuMemory => "GPU-MEM",
            SortKey::Cpu => "%CPU",
            SortKey::HostMemory => "HOST-MEM",
            SortKey::Runtime => "TIME",
            SortKey::Command => "COMMAND",
        }
    }

    /// Whether the natural order is largest first (resources), rather than smallest first.
    pub fn descending(self) -> bool {
        matches!(
            self,
            SortKey::Sm
                | SortKey::GpuMemory
                | SortKey::Cpu
                | SortKey::HostMemory
                | SortKey::Runtime
        )
    }
}

/// One line of the process table: a process on one GPU (or MIG device).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Row {
    /// NVML index of the GPU.
    pub gpu: u32,
    /// The MIG device's index on its GPU, when the process runs on one.
    pub mig: Option<u32>,
    /// The pid here (`None` when the process is not visible from this PID namespace).
    pub pid: Option<u32>,
    /// The pid as NVML reports it.
    pub nvml_pid: u32,
    /// User name or uid; empty when unknown.
    pub user: String,
    /// SM utilisation, percent.
    pub sm: Option<u32>,
    /// GPU memory, bytes.
    pub gpu_memory: Option<u64>,
    /// CPU, percent of one core.
    pub cpu: Option<f64>,
    /// Resident host memory, bytes.
    pub host_memory: Option<u64>,
    /// Milliseconds since the process started.
    pub runtime_ms: Option<u64>,
    /// Command line (or NVML's pid in brackets when unknown).
    pub command: String,
    /// `G` for a graphics context, `C` compute, `C+G` both.
    pub kind: &'static str,
    /// What holds the process (a gpuproc lease, a `run` job, a pool), when gpuproc knows.
    pub holder: Option<String>,
}

impl Row {
    /// The pid to show and to signal: ours when visible, else NVML's.
    pub fn shown_pid(&self) -> u32 {
        self.pid.unwrap_or(self.nvml_pid)
    }
}

/// The label of a lease: what holds it, from its id's label when known.
fn lease_label(lease: &LeaseRecord, labels: &HashMap<String, String>) -> String {
    let pids: Vec<String> = lease.holders.iter().map(|h| h.pid.to_string()).collect();
    match labels.get(&lease.id) {
        Some(label) => format!("{label} (pid {})", pids.join(",")),
        None => format!("lease (pid {})", pids.join(",")),
    }
}

/// Who holds GPU `uuid`: the labels of the leases on it, or `None`.
pub fn gpu_holders(uuid: &str, sample: &Sample) -> Option<String> {
    let labels: Vec<String> = sample
        .leases
        .iter()
        .filter(|l| l.devices.iter().any(|d| d.uuid == uuid))
        .map(|l| lease_label(l, &sample.lease_labels))
        .collect();
    (!labels.is_empty()).then(|| labels.join(", "))
}

/// What holds process `pid`: the lease one of whose holders is the process or one of its
/// ancestors (a pool's workers are children of the process that leased their GPUs).
pub fn process_holder(pid: u32, sample: &Sample) -> Option<String> {
    let chain =
        std::iter::once(pid).chain(sample.ancestors.get(&pid).into_iter().flatten().copied());
    for p in chain {
        if let Some(lease) = sample
            .leases
            .iter()
            .find(|l| l.holders.iter().any(|h| h.pid == p))
        {
            let label = sample
                .lease_labels
                .get(&lease.id)
                .map(String::as_str)
                .unwrap_or("lease");
            return Some(if p == pid {
                label.to_string()
            } else {
                format!("{label} {p}")
            });
        }
    }
    None
}

/// What holds a lease, from the command lines of its holders and of their parents, in
/// that order: the gpuproc command that took it (`run`, `pick --hold`), else a program
/// that leased GPUs itself (a pool, a `Process::with_gpus`): `lease`.
pub fn holder_label(cmdlines: &[Vec<String>]) -> String {
    for cmdline in cmdlines {
        let is_gpuproc = cmdline
            .first()
            .and_then(|p| std::path::Path::new(p).file_name())
            .is_some_and(|n| n == "gpuproc");
        match cmdline.get(1).map(String::as_str) {
            Some("run") if is_gpuproc => return "run job".to_string(),
            Some("pick") if is_gpuproc => return "pick --hold".to_string(),
            _ => {}
        }
    }
    "lease".to_string()
}

/// The process rows of a sample, in snapshot order.
pub fn rows(sample: &Sample) -> Vec<Row> {
    let now = sample.snapshot.timestamp_ms;
    let mut out = Vec::new();
    for device in &sample.snapshot.devices {
        for p in device.processes.iter().flatten() {
            let host = p.host.as_ref();
            let mig = mig_index(device, p.gpu_instance_id, p.compute_instance_id);
            out.push(Row {
                gpu: device.index,
                mig,
                pid: p.pid,
                nvml_pid: p.nvml_pid,
                user: host
                    .and_then(|h| h.user.clone().or_else(|| h.uid.map(|u| u.to_string())))
                    .unwrap_or_default(),
                sm: p.utilization.and_then(|u| u.sm),
                gpu_memory: p.used_memory,
                cpu: host.and_then(|h| h.cpu_percent),
                host_memory: host.and_then(|h| h.rss_bytes),
                runtime_ms: host
                    .and_then(|h| h.started_ms)
                    .map(|s| now.saturating_sub(s)),
                command: host.map(|h| h.command()).unwrap_or_default(),
                kind: match p.kind {
                    gpuproc::gpu::ProcessKind::Compute => "C",
                    gpuproc::gpu::ProcessKind::Graphics => "G",
                    gpuproc::gpu::ProcessKind::ComputeAndGraphics => "C+G",
                },
                holder: p.pid.and_then(|pid| process_holder(pid, sample)),
            });
        }
    }
    out
}

fn mig_index(device: &Device, gi: Option<u32>, ci: Option<u32>) -> Option<u32> {
    let gi = gi?;
    device
        .mig
        .as_ref()?
        .instances
        .iter()
        .find(|m| m.gpu_instance_id == Some(gi) && (ci.is_none() || m.compute_instance_id == ci))
        .map(|m| m.index)
}

fn cmp_opt<T: PartialOrd>(a: &Option<T>, b: &Option<T>) -> Ordering {
    // Unknown values sort after known ones whichever the direction.
    match (a, b) {
        (Some(a), Some(b)) => a.partial_cmp(b).unwrap_or(Ordering::Equal),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    }
}

/// Sorts rows by `key`, in the key's natural direction (largest first for resources),
/// reversed with `reverse`; ties fall back to GPU and pid so the order is stable.
pub fn sort_rows(rows: &mut [Row], key: SortKey, reverse: bool) {
    let descending = key.descending() != reverse;
    rows.sort_by(|a, b| {
        let primary = match key {
            SortKey::Gpu => (a.gpu, a.mig).cmp(&(b.gpu, b.mig)),
            SortKey::Pid => a.shown_pid().cmp(&b.shown_pid()),
            SortKey::User => a.user.cmp(&b.user),
            SortKey::Sm => known_first(&a.sm, &b.sm, descending),
            SortKey::GpuMemory => known_first(&a.gpu_memory, &b.gpu_memory, descending),
            SortKey::Cpu => known_first(&a.cpu, &b.cpu, descending),
            SortKey::HostMemory => known_first(&a.host_memory, &b.host_memory, descending),
            SortKey::Runtime => known_first(&a.runtime_ms, &b.runtime_ms, descending),
            SortKey::Command => a.command.cmp(&b.command),
        };
        let primary = match key {
            // Already directed (unknowns last either way).
            SortKey::Sm
            | SortKey::GpuMemory
            | SortKey::Cpu
            | SortKey::HostMemory
            | SortKey::Runtime => primary,
            _ if descending => primary.reverse(),
            _ => primary,
        };
        primary
            .then((a.gpu, a.mig).cmp(&(b.gpu, b.mig)))
            .then(a.shown_pid().cmp(&b.shown_pid()))
    });
}

fn known_first<T: PartialOrd>(a: &Option<T>, b: &Option<T>, descending: bool) -> Ordering {
    match (a, b) {
        (Some(_), Some(_)) if descending => cmp_opt(b, a),
        _ => cmp_opt(a, b),
    }
}

/// Whether `row` matches the filter: every space-separated word of it (case-insensitive)
/// appears in the row's user, command, pid, holder, or is `gpu:N` naming its GPU.
pub fn matches(row: &Row, filter: &str) -> bool {
    let haystack = format!(
        "{} {} {} {}",
        row.user,
        row.command,
        row.shown_pid(),
        row.holder.as_deref().unwrap_or("")
    )
    .to_lowercase();
    filter.split_whitespace().all(|word| {
        let word = word.to_lowercase();
        match word.strip_prefix("gpu:") {
            Some(n) => n.parse::<u32>().is_ok_and(|n| n == row.gpu),
            None => haystack.contains(&word),
        }
    })
}

/// One line of the tree view: a process row or an ancestor that is on no GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TreeNode {
    /// `rows[i]`.
    Row(usize),
    /// An ancestor (by pid), shown to group its descendants.
    Ancestor(u32),
}

/// A tree line: its depth (0 for roots) and what it shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TreeLine {
    /// Nesting depth.
    pub depth: usize,
    /// The row or ancestor.
    pub node: TreeNode,
}

/// The rows as a forest of process families, in the rows' order: each row under its
/// nearest ancestor that is shown, where the shown ancestors are the rows' processes and
/// the parents of rows that are on no GPU (a launcher and its workers).
///
/// `ancestors` maps a pid to its ancestors, nearest first. Rows of one process on several
/// GPUs are siblings; children attach to the first of them.
pub fn tree(rows: &[Row], ancestors: &HashMap<u32, Vec<u32>>) -> Vec<TreeLine> {
    let row_pids: HashSet<u32> = rows.iter().filter_map(|r| r.pid).collect();
    // Ancestors shown: direct parents of rows that are not rows themselves.
    let mut shown: HashSet<u32> = HashSet::new();
    for r in rows {
        if let Some(parent) = r
            .pid
            .and_then(|p| ancestors.get(&p))
            .and_then(|a| a.first())
        {
            if !row_pids.contains(parent) {
                shown.insert(*parent);
            }
        }
    }
    let parent_of = |pid: u32| -> Option<u32> {
        ancestors
            .get(&pid)?
            .iter()
            .copied()
            .find(|a| row_pids.contains(a) || shown.contains(a))
    };
    // Children per parent pid, in the rows' order.
    let mut children: HashMap<u32, Vec<TreeNode>> = HashMap::new();
    let mut roots: Vec<TreeNode> = Vec::new();
    let mut placed_ancestors: HashSet<u32> = HashSet::new();
    let mut first_row_of: HashMap<u32, usize> = HashMap::new();
    for (i, r) in rows.iter().enumerate() {
        let Some(pid) = r.pid else {
            roots.push(TreeNode::Row(i));
            continue;
        };
        first_row_of.entry(pid).or_insert(i);
        // Place the row, then each shown ancestor up the chain not placed yet.
        let mut node = TreeNode::Row(i);
        let mut at = pid;
        loop {
            match parent_of(at).filter(|&p| p != at) {
                Some(parent) => {
                    children.entry(parent).or_default().push(node);
                    if row_pids.contains(&parent) || !placed_ancestors.insert(parent) {
                        break;
                    }
                    node = TreeNode::Ancestor(parent);
                    at = parent;
                }
                None => {
                    roots.push(node);
                    break;
                }
            }
        }
    }
    struct Walk<'a> {
        rows: &'a [Row],
        first_row_of: &'a HashMap<u32, usize>,
        children: &'a HashMap<u32, Vec<TreeNode>>,
        expanded: HashSet<u32>,
        emitted: HashSet<usize>,
        out: Vec<TreeLine>,
    }
    impl Walk<'_> {
        fn walk(&mut self, node: TreeNode, depth: usize) {
            if let TreeNode::Row(i) = node {
                if !self.emitted.insert(i) {
                    return;
                }
            }
            self.out.push(TreeLine { depth, node });
            let pid = match node {
                TreeNode::Row(i) => match self.rows[i].pid {
                    // Children hang under the first row of a process only.
                    Some(p) if self.first_row_of.get(&p) == Some(&i) => p,
                    _ => return,
                },
                TreeNode::Ancestor(p) => p,
            };
            if !self.expanded.insert(pid) {
                return;
            }
            let children = self.children;
            for &child in children.get(&pid).into_iter().flatten() {
                self.walk(child, depth + 1);
            }
        }
    }
    let mut w = Walk {
        rows,
        first_row_of: &first_row_of,
        children: &children,
        expanded: HashSet::new(),
        emitted: HashSet::new(),
        out: Vec::new(),
    };
    for root in roots {
        w.walk(root, 0);
    }
    // Inconsistent ancestry (pids reused between reads) can leave a row unreached: show
    // it as a root rather than lose it.
    for i in 0..rows.len() {
        if !w.emitted.contains(&i) {
            w.walk(TreeNode::Row(i), 0);
        }
    }
    w.out
}

/// Utilisation and memory history of each GPU (percent, oldest first), by UUID or index.
#[derive(Debug, Clone, Default)]
pub struct History {
    series: HashMap<String, (VecDeque<u64>, VecDeque<u64>)>,
}

impl History {
    fn key(d: &Device) -> String {
        d.uuid.clone().unwrap_or_else(|| d.index.to_string())
    }

    /// Adds a sample of every device.
    pub fn push(&mut self, snapshot: &Snapshot) {
        for d in &snapshot.devices {
            let (util, mem) = self.series.entry(Self::key(d)).or_default();
            let push = |q: &mut VecDeque<u64>, v: u64| {
                if q.len() == HISTORY {
                    q.pop_front();
                }
                q.push_back(v);
            };
            push(util, u64::from(d.utilization.map_or(0, |u| u.gpu)));
            push(mem, memory_percent(d).map_or(0, u64::from));
        }
    }

    /// The last `n` samples of `device`'s utilisation and memory use, oldest first.
    pub fn of(&self, device: &Device, n: usize) -> (Vec<u64>, Vec<u64>) {
        let Some((util, mem)) = self.series.get(&Self::key(device)) else {
            return (Vec::new(), Vec::new());
        };
        let tail = |q: &VecDeque<u64>| q.iter().skip(q.len().saturating_sub(n)).copied().collect();
        (tail(util), tail(mem))
    }
}

/// Memory in use, percent of the total.
pub fn memory_percent(d: &Device) -> Option<u32> {
    let m = d.memory?;
    if m.total == 0 {
        return None;
    }
    u32::try_from(m.used.saturating_mul(100) / m.total).ok()
}

/// How the GPU panels are drawn, from the space there is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PanelMode {
    /// A bordered panel with bars, figures and history graphs.
    Full,
    /// Two lines: figures, then bars.
    Compact,
    /// One line per GPU.
    Line,
}

/// Where things go on the screen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// How each GPU is drawn.
    pub mode: PanelMode,
    /// GPU panels side by side.
    pub columns: u16,
    /// Lines given to the GPU area.
    pub gpu_lines: u16,
    /// Lines given to the process table (with its header).
    pub table_lines: u16,
}

/// Lines of a full panel: border, title and figures, memory and utilisation bars, two
/// lines of graphs, border; plus one line per MIG device.
pub const FULL_PANEL: u16 = 6;
/// Lines of a compact GPU entry (plus one per MIG device).
pub const COMPACT_PANEL: u16 = 2;
/// The fewest lines the process table keeps (header and a few rows) while GPUs shrink; it
/// also keeps a third of the height.
pub const MIN_TABLE: u16 = 6;
/// Width from which two full panels go side by side.
pub const TWO_COLUMNS: u16 = 160;

/// Lays out `height` lines of `width` columns (the header and the status line excluded)
/// for GPUs with `mig_lines[i]` MIG devices each: the roomiest panel mode that leaves the
/// process table at least [`MIN_TABLE`] lines and a third of the height, two columns of
/// full panels on wide screens.
pub fn layout(width: u16, height: u16, mig_lines: &[u16]) -> Layout {
    let n = u16::try_from(mig_lines.len()).unwrap_or(u16::MAX);
    let room = height.saturating_sub(MIN_TABLE.max(height / 3));
    let lines_for = |per: u16, columns: u16| -> u16 {
        // Rows of panels: each row as tall as its tallest panel.
        mig_lines
            .chunks(usize::from(columns.max(1)))
            .map(|row| per.saturating_add(row.iter().copied().max().unwrap_or(0)))
            .fold(0u16, u16::saturating_add)
    };
    let columns = if width >= TWO_COLUMNS && n > 1 { 2 } else { 1 };
    let candidates = [
        (PanelMode::Full, FULL_PANEL, columns),
        (PanelMode::Full, FULL_PANEL, 1),
        (PanelMode::Compact, COMPACT_PANEL, 1),
    ];
    for (mode, per, cols) in candidates {
        let need = lines_for(per, cols);
        if need <= room {
            return Layout {
                mode,
                columns: cols,
                gpu_lines: need,
                table_lines: height - need,
            };
        }
    }
    // One line per GPU (MIG devices folded into it), as many as fit.
    let gpu_lines = n.min(room.max(height / 2));
    Layout {
        mode: PanelMode::Line,
        columns: 1,
        gpu_lines,
        table_lines: height.saturating_sub(gpu_lines),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpuproc::gpu::{GpuProcess, Holder, HostProcess, Memory, PickedDevice, ProcessKind};

    fn row(gpu: u32, pid: u32, user: &str, sm: Option<u32>, mem: u64, command: &str) -> Row {
        Row {
            gpu,
            pid: Some(pid),
            nvml_pid: pid,
            user: user.into(),
            sm,
            gpu_memory: Some(mem),
            command: command.into(),
            ..Row::default()
        }
    }

    fn pids(rows: &[Row]) -> Vec<u32> {
        rows.iter().map(|r| r.shown_pid()).collect()
    }

    #[test]
    fn sort_keys_order_and_direction() {
        let mut rows = vec![
            row(1, 30, "bob", Some(10), 5, "b"),
            row(0, 20, "alice", None, 9, "c"),
            row(0, 10, "carol", Some(80), 1, "a"),
        ];
        sort_rows(&mut rows, SortKey::Gpu, false);
        assert_eq!(pids(&rows), [10, 20, 30]);
        sort_rows(&mut rows, SortKey::Sm, false);
        // Largest first; unknown last.
        assert_eq!(pids(&rows), [10, 30, 20]);
        sort_rows(&mut rows, SortKey::Sm, true);
        assert_eq!(pids(&rows), [30, 10, 20], "reversed, unknown still last");
        sort_rows(&mut rows, SortKey::GpuMemory, false);
        assert_eq!(pids(&rows), [20, 30, 10]);
        sort_rows(&mut rows, SortKey::User, false);
        assert_eq!(pids(&rows), [20, 30, 10]);
        sort_rows(&mut rows, SortKey::User, true);
        assert_eq!(pids(&rows), [10, 30, 20]);
        sort_rows(&mut rows, SortKey::Command, false);
        assert_eq!(pids(&rows), [10, 30, 20]);
        assert_eq!(SortKey::Command.cycle(true), SortKey::Gpu);
        assert_eq!(SortKey::Gpu.cycle(false), SortKey::Command);
        assert_eq!(SortKey::Gpu.cycle(true), SortKey::Pid);
    }

    #[test]
    fn filter_words_all_match() {
        let r = Row {
            holder: Some("run job".into()),
            ..row(3, 4242, "alice", None, 0, "python train.py --lr 3")
        };
        assert!(matches(&r, ""));
        assert!(matches(&r, "TRAIN alice"));
        assert!(matches(&r, "gpu:3 4242"));
        assert!(matches(&r, "run"));
        assert!(!matches(&r, "gpu:2"));
        assert!(!matches(&r, "train bob"));
        assert!(!matches(&r, "gpu:x"));
    }

    #[test]
    fn tree_groups_families_under_a_launcher() {
        // 100 (launcher, no GPU) -> 101, 102 on GPUs; 102 -> 103 on a GPU; 200 alone;
        // 101 uses two GPUs.
        let rows = vec![
            row(0, 101, "u", None, 1, "worker"),
            row(1, 200, "u", None, 1, "other"),
            row(1, 103, "u", None, 1, "grandchild"),
            row(2, 102, "u", None, 1, "worker"),
            row(3, 101, "u", None, 1, "worker"),
        ];
        let ancestors: HashMap<u32, Vec<u32>> = [
            (101, vec![100, 50]),
            (102, vec![100, 50]),
            (103, vec![102, 100, 50]),
            (200, vec![60]),
            (100, vec![50]),
        ]
        .into_iter()
        .collect();
        let lines = tree(&rows, &ancestors);
        let shown: Vec<(usize, TreeNode)> = lines.iter().map(|l| (l.depth, l.node)).collect();
        assert_eq!(
            shown,
            vec![
                (0, TreeNode::Ancestor(100)),
                (1, TreeNode::Row(0)),
                (1, TreeNode::Row(3)),
                (2, TreeNode::Row(2)),
                (1, TreeNode::Row(4)),
                (0, TreeNode::Ancestor(60)),
                (1, TreeNode::Row(1)),
            ]
        );
        // Every row appears exactly once.
        let mut seen: Vec<usize> = lines
            .iter()
            .filter_map(|l| match l.node {
                TreeNode::Row(i) => Some(i),
                TreeNode::Ancestor(_) => None,
            })
            .collect();
        seen.sort_unstable();
        assert_eq!(seen, [0, 1, 2, 3, 4]);
        // Without ancestry every row is a root.
        assert!(tree(&rows, &HashMap::new()).iter().all(|l| l.depth == 0));
    }

    fn lease(id: &str, pid: u32, uuid: &str) -> LeaseRecord {
        LeaseRecord {
            id: id.into(),
            boot_id: String::new(),
            created_ms: 0,
            max_per_gpu: 1,
            holders: vec![Holder {
                pid,
                start_ticks: 1,
            }],
            devices: vec![PickedDevice {
                index: 0,
                uuid: uuid.into(),
                name: None,
            }],
        }
    }

    #[test]
    fn holders_of_gpus_and_processes() {
        let mut sample = Sample {
            leases: vec![lease("a", 500, "GPU-a"), lease("b", 600, "GPU-b")],
            ..Sample::default()
        };
        sample.lease_labels.insert("a".into(), "run job".into());
        sample.ancestors.insert(501, vec![500, 1]);
        assert_eq!(
            gpu_holders("GPU-a", &sample).as_deref(),
            Some("run job (pid 500)")
        );
        assert_eq!(
            gpu_holders("GPU-b", &sample).as_deref(),
            Some("lease (pid 600)")
        );
        assert_eq!(gpu_holders("GPU-c", &sample), None);
        assert_eq!(process_holder(500, &sample).as_deref(), Some("run job"));
        assert_eq!(process_holder(501, &sample).as_deref(), Some("run job 500"));
        assert_eq!(process_holder(600, &sample).as_deref(), Some("lease"));
        assert_eq!(process_holder(700, &sample), None);
        let cmd = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let run = cmd(&["/usr/bin/gpuproc", "run", "-j", "2"]);
        let pick = cmd(&["gpuproc", "pick", "--hold", "--", "sleep", "1"]);
        let sleep = cmd(&["sleep", "1"]);
        assert_eq!(holder_label(&[sleep.clone(), run]), "run job");
        assert_eq!(holder_label(&[pick, sleep.clone()]), "pick --hold");
        assert_eq!(holder_label(&[cmd(&["python", "run"]), sleep]), "lease");
        assert_eq!(holder_label(&[]), "lease");
    }

    #[test]
    fn rows_from_a_sample() {
        let mut sample = Sample::default();
        sample.snapshot.timestamp_ms = 10_000;
        sample.snapshot.devices = vec![Device {
            index: 2,
            processes: Some(vec![GpuProcess {
                pid: Some(7),
                nvml_pid: 7,
                used_memory: Some(1 << 30),
                kind: ProcessKind::Graphics,
                gpu_instance_id: None,
                compute_instance_id: None,
                utilization: None,
                host: Some(HostProcess {
                    uid: Some(1000),
                    user: None,
                    name: "x".into(),
                    started_ms: Some(4_000),
                    ..HostProcess::default()
                }),
            }]),
            ..Device::default()
        }];
        let r = &rows(&sample)[0];
        assert_eq!((r.gpu, r.kind, r.user.as_str()), (2, "G", "1000"));
        assert_eq!(r.runtime_ms, Some(6_000));
        assert_eq!(r.command, "x");
    }

    #[test]
    fn history_keeps_the_last_samples() {
        let mut h = History::default();
        let snap = Snapshot {
            devices: vec![Device {
                memory: Some(Memory {
                    total: 100,
                    used: 25,
                    free: 75,
                }),
                ..Device::default()
            }],
            ..Snapshot::default()
        };
        for _ in 0..HISTORY + 5 {
            h.push(&snap);
        }
        let (util, mem) = h.of(&snap.devices[0], 3);
        assert_eq!((util, mem), (vec![0, 0, 0], vec![25, 25, 25]));
        assert_eq!(h.of(&snap.devices[0], 10_000).0.len(), HISTORY);
    }

    #[test]
    fn layouts_adapt_to_the_screen() {
        // 80x24 less header and status line: 8 GPUs do not fit as panels.
        let l = layout(80, 22, &[0; 8]);
        assert_eq!(l.mode, PanelMode::Line);
        assert_eq!(l.gpu_lines + l.table_lines, 22);
        assert!(l.table_lines >= MIN_TABLE);
        // Two GPUs fit in full at 80x24.
        let l = layout(80, 22, &[0; 2]);
        assert_eq!((l.mode, l.columns, l.gpu_lines), (PanelMode::Full, 1, 12));
        // Four compact at 80x24.
        assert_eq!(layout(80, 22, &[0; 4]).mode, PanelMode::Compact);
        // A wide, tall screen: two columns of full panels.
        let l = layout(200, 60, &[0; 8]);
        assert_eq!((l.mode, l.columns, l.gpu_lines), (PanelMode::Full, 2, 24));
        // MIG devices add lines.
        assert_eq!(layout(80, 40, &[3, 0]).gpu_lines, 15);
        // Tiny screens never underflow.
        let l = layout(10, 3, &[0; 16]);
        assert!(l.gpu_lines + l.table_lines <= 3);
        let l = layout(80, 22, &[]);
        assert_eq!(l.gpu_lines, 0);
    }
}
