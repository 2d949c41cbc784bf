//! GPUs of remote pool workers: sampled on the worker's node, shown here.
//!
//! A remote worker's pid means nothing to this machine's NVML, so the worker samples its
//! own: every sampling interval it reads, through NVML on its node, the GPUs it was given
//! (`CUDA_VISIBLE_DEVICES`, as Slurm binds them) and the memory its process tree uses on
//! each, with the task it is running, and sends that as a [`Sample`] over a second
//! authenticated connection to its relay (the first one carries the pool's frames, which a
//! sampler thread must not interleave with). The relay writes the latest sample into the
//! worker's status page (after the words the worker loop uses) under a sequence lock, and
//! the driver reads it there as it reads a local worker's running task: no message to the
//! driver, no change to the pool's protocol.

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::worker;
use crate::connection::Connection;
use crate::sys::shm::Mapping;

/// One GPU of a remote worker: its NVML index on the worker's node, its UUID, and the
/// memory the worker's processes use on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct GpuSample {
    pub index: u32,
    pub uuid: String,
    pub memory: u64,
}

/// What a remote worker sends every sampling interval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Sample {
    /// The running task's sequence number + 1 (0: idle), as in the status page.
    pub running: u64,
    pub gpus: Vec<GpuSample>,
}

/// A remote worker's latest sample, as read from its status page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Seen {
    pub node: String,
    pub sample: Sample,
}

impl Seen {
    /// The memory the worker uses on all its GPUs.
    pub fn memory(&self) -> u64 {
        self.sample
            .gpus
            .iter()
            .fold(0u64, |sum, g| sum.saturating_add(g.memory))
    }
}

/// Where the sample starts in the status page (after the worker loop's words).
const AT: usize = 64;
/// At most this many GPUs per worker are shown.
const MAX_GPUS: usize = 16;
/// Bytes kept of a UUID (`GPU-` and 36 characters: 40) and of a node name.
const UUID_BYTES: usize = 48;
const NODE_BYTES: usize = 64;
const WORDS_PER_GPU: usize = 2 + UUID_BYTES / 8;
/// Words: version, running, GPU count, node (length + bytes), then the GPUs.
const NODE_WORD: usize = 3;
const GPU_WORD: usize = NODE_WORD + 1 + NODE_BYTES / 8;
const WORDS: usize = GPU_WORD + MAX_GPUS * WORDS_PER_GPU;
const _: () = assert!(AT + WORDS * 8 <= worker::PAGE_LEN);

fn word(page: &Mapping, i: usize) -> &std::sync::atomic::AtomicU64 {
    page.atomic_u64(AT + i * 8)
}

/// `text`'s first `n` bytes (cut at a character boundary), as little-endian words.
fn pack(text: &str, n: usize) -> (u64, Vec<u64>) {
    let mut end = text.len().min(n);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut bytes = text.as_bytes()[..end].to_vec();
    bytes.resize(n, 0);
    let words = bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    (end as u64, words)
}

fn unpack(len: u64, words: &[u64]) -> String {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    let len = usize::try_from(len).unwrap_or(usize::MAX).min(bytes.len());
    String::from_utf8_lossy(&bytes[..len]).into_owned()
}

/// Writes `node`'s `sample` into `page` (one writer: the relay's sampling thread).
pub(crate) fn write(page: &Mapping, node: &str, sample: &Sample) {
    let version = word(page, 0);
    version.fetch_add(1, Ordering::AcqRel); // odd: being written
    fence(Ordering::Release);
    let store = |i: usize, v: u64| word(page, i).store(v, Ordering::Relaxed);
    store(1, sample.running);
    let gpus = &sample.gpus[..sample.gpus.len().min(MAX_GPUS)];
    store(2, gpus.len() as u64);
    let (len, words) = pack(node, NODE_BYTES);
    store(NODE_WORD, len);
    for (k, w) in words.into_iter().enumerate() {
        store(NODE_WORD + 1 + k, w);
    }
    for (g, gpu) in gpus.iter().enumerate() {
        let at = GPU_WORD + g * WORDS_PER_GPU;
        let (len, words) = pack(&gpu.uuid, UUID_BYTES);
        store(at, u64::from(gpu.index) | (len << 32));
        store(at + 1, gpu.memory);
        for (k, w) in words.into_iter().enumerate() {
            store(at + 2 + k, w);
        }
    }
    version.fetch_add(1, Ordering::Release); // even: complete
}

/// The latest sample written into `page`; `None` before the first one (or while a writer
/// keeps it busy, which a sampling interval makes rare).
pub(crate) fn read(page: &Mapping) -> Option<Seen> {
    for _ in 0..100 {
        let before = word(page, 0).load(Ordering::Acquire);
        if before == 0 {
            return None;
        }
        if before % 2 == 1 {
            std::hint::spin_loop();
            continue;
        }
        let load = |i: usize| word(page, i).load(Ordering::Relaxed);
        let n = usize::try_from(load(2)).unwrap_or(usize::MAX).min(MAX_GPUS);
        let node_words: Vec<u64> = (0..NODE_BYTES / 8)
            .map(|k| load(NODE_WORD + 1 + k))
            .collect();
        let node = unpack(load(NODE_WORD), &node_words);
        let gpus = (0..n)
            .map(|g| {
                let at = GPU_WORD + g * WORDS_PER_GPU;
                let head = load(at);
                let words: Vec<u64> = (0..UUID_BYTES / 8).map(|k| load(at + 2 + k)).collect();
                GpuSample {
                    index: (head & 0xffff_ffff) as u32,
                    uuid: unpack(head >> 32, &words),
                    memory: load(at + 1),
                }
            })
            .collect();
        let running = load(1);
        fence(Ordering::Acquire);
        if word(page, 0).load(Ordering::Relaxed) == before {
            return Some(Seen {
                node,
                sample: Sample { running, gpus },
            });
        }
    }
    None
}

/// For the driver: the memory a remote worker used on its GPUs and the task it was running
/// (its sequence number + 1) at its latest sample, with its node and GPUs written into
/// `usage`; `None` before its first sample.
pub(crate) fn read_into(
    page: &Mapping,
    usage: Option<&mut super::WorkerGpuUsage>,
) -> Option<(u64, u64)> {
    let seen = read(page)?;
    let memory = seen.memory();
    if let Some(u) = usage {
        u.devices = seen
            .sample
            .gpus
            .iter()
            .filter(|g| !g.uuid.is_empty())
            .map(|g| g.uuid.clone())
            .collect();
        u.gpus = seen
            .sample
            .gpus
            .iter()
            .map(|g| super::WorkerGpu {
                index: g.index,
                uuid: g.uuid.clone(),
                memory: g.memory,
            })
            .collect();
        u.node = seen.node;
    }
    Some((memory, seen.sample.running))
}

/// In the relay: writes each sample that arrives on `side` into `page` until the
/// connection ends.
pub(crate) fn receive(side: &Connection, page: &Mapping, node: &str) {
    while let Ok(sample) = side.recv::<Sample>() {
        write(page, node, &sample);
    }
}

/// In a remote worker: a thread that samples this process's GPUs every `every` and sends
/// them on `side`, until it cannot (no NVML on this node: nothing is sent, and the
/// connection is closed).
pub(crate) fn start_sampling(side: Connection, page: Arc<Mapping>, every: Duration) {
    let _ = std::thread::Builder::new()
        .name("gpuproc-gpu-sampler".into())
        .spawn(move || {
            let Ok(gpus) = crate::gpu::global() else {
                return;
            };
            // The GPUs given to this worker, when something gave it some.
            let given: Vec<(u32, String)> = match gpus.visible() {
                Ok(v) if v.cuda_visible_devices.is_some() => v
                    .devices
                    .iter()
                    .map(|d| (d.device.index, d.device.uuid.clone().unwrap_or_default()))
                    .collect(),
                _ => Vec::new(),
            };
            let me = std::process::id();
            loop {
                let used: Vec<(u32, Option<String>, u64)> = gpus
                    .usage_of(me, true)
                    .map(|u| {
                        u.devices
                            .into_iter()
                            .map(|d| (d.index, d.uuid, d.used_memory))
                            .collect()
                    })
                    .unwrap_or_default();
                let running = page.atomic_u64(worker::RUNNING_AT).load(Ordering::Acquire);
                let sample = Sample {
                    running,
                    gpus: merge(&given, &used),
                };
                if side.send(&sample).is_err() {
                    return;
                }
                std::thread::sleep(every);
            }
        });
}

/// The GPUs to show for a worker: those it was given (with the memory it uses on each),
/// then any other it uses memory on.
fn merge(given: &[(u32, String)], used: &[(u32, Option<String>, u64)]) -> Vec<GpuSample> {
    let memory_on = |index: u32| {
        used.iter()
            .filter(|u| u.0 == index)
            .fold(0u64, |sum, u| sum.saturating_add(u.2))
    };
    let mut gpus: Vec<GpuSample> = given
        .iter()
        .map(|(index, uuid)| GpuSample {
            index: *index,
            uuid: uuid.clone(),
            memory: memory_on(*index),
        })
        .collect();
    for (index, uuid, memory) in used {
        if *memory > 0 && !gpus.iter().any(|g| g.index == *index) {
            gpus.push(GpuSample {
                index: *index,
                uuid: uuid.clone().unwrap_or_default(),
                memory: *memory,
            });
        }
    }
    gpus
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page() -> Mapping {
        Mapping::anonymous("test-page", worker::PAGE_LEN).unwrap()
    }

    #[test]
    fn samples_round_trip_through_the_status_page() {
        let page = page();
        assert_eq!(read(&page), None, "nothing written yet");
        let sample = Sample {
            running: 42,
            gpus: vec![
                GpuSample {
                    index: 2,
                    uuid: "GPU-12345678-1234-1234-1234-123456789abc".into(),
                    memory: 300 << 20,
                },
                GpuSample {
                    index: 3,
                    uuid: String::new(),
                    memory: 0,
                },
            ],
        };
        write(&page, "gpu-node-07", &sample);
        let seen = read(&page).unwrap();
        assert_eq!(seen.node, "gpu-node-07");
        assert_eq!(seen.sample, sample);
        assert_eq!(seen.memory(), 300 << 20);
        // A later, smaller sample replaces it whole.
        let later = Sample {
            running: 0,
            gpus: vec![],
        };
        write(&page, "gpu-node-07", &later);
        assert_eq!(read(&page).unwrap().sample, later);
    }

    #[test]
    fn long_names_and_many_gpus_are_cut_not_overflowed() {
        let page = page();
        let node = "é".repeat(40); // 80 bytes: cut at a character boundary
        let gpus: Vec<GpuSample> = (0..40)
            .map(|i| GpuSample {
                index: i,
                uuid: "x".repeat(100),
                memory: u64::MAX,
            })
            .collect();
        write(&page, &node, &Sample { running: 1, gpus });
        let seen = read(&page).unwrap();
        assert_eq!(seen.node, "é".repeat(32));
        assert_eq!(seen.sample.gpus.len(), MAX_GPUS);
        assert!(seen.sample.gpus.iter().all(|g| g.uuid.len() == UUID_BYTES));
        assert_eq!(seen.memory(), u64::MAX, "sums saturate");
    }

    #[test]
    fn given_gpus_come_first_then_others_in_use() {
        let given = [(1, "GPU-b".to_string())];
        let used = [
            (0, Some("GPU-a".to_string()), 5),
            (1, None, 7),
            (3, None, 0),
        ];
        assert_eq!(
            merge(&given, &used),
            [
                GpuSample {
                    index: 1,
                    uuid: "GPU-b".into(),
                    memory: 7
                },
                GpuSample {
                    index: 0,
                    uuid: "GPU-a".into(),
                    memory: 5
                },
            ]
        );
    }
}
