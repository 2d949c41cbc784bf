//! Scheduling policy, pure: which GPUs and slot number the next job gets, and whether a
//! finished job is retried. No processes, clocks or NVML here; the executor drives it.
//!
//! The model: each selected GPU has `per_gpu` shares; a job needing `n` GPUs takes one share
//! on each of `n` distinct GPUs. Slot numbers (`{%}`, 1-based) are handed out lowest-first
//! and returned when a job ends, like GNU parallel's. CPU-only runs have no GPUs and only
//! slot numbers.

use std::collections::{BTreeSet, VecDeque};

/// A job's turn: the job, its attempt, and where it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// Index into the job list.
    pub job: usize,
    /// 1 for the first run, 2 for the first retry, …
    pub attempt: u32,
    /// Positions (in the slot source's GPU list) of the GPUs given to the job.
    pub gpus: Vec<usize>,
    /// Slot number, 1-based.
    pub slot: usize,
}

/// The head job's turn, as [`Scheduler::next_with`] offers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Index into the job list.
    pub job: usize,
    /// How many GPUs it needs (at least 1).
    pub need: usize,
    /// Every GPU with a free share, best first (at least `need` of them).
    pub candidates: Vec<usize>,
    /// Those not used by the job's failed previous attempt, best first.
    pub preferred: Vec<usize>,
}

/// What became of a finished attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Done, successfully or not: no more attempts.
    Done,
    /// Queued again, preferably on other GPUs.
    Retry,
}

#[derive(Debug, Clone)]
struct Pending {
    job: usize,
    attempt: u32,
    /// GPUs of the previous attempt: a retry goes elsewhere when it can.
    avoid: Vec<usize>,
}

/// The scheduler's state.
#[derive(Debug)]
pub struct Scheduler {
    /// Free shares per GPU.
    free: Vec<usize>,
    /// Whether each GPU may be given out now (others' processes can make it unavailable).
    available: Vec<bool>,
    free_slots: BTreeSet<usize>,
    queue: VecDeque<Pending>,
    /// GPUs each job needs, by job index.
    needs: Vec<usize>,
    /// Retries each job may have, by job index.
    retries: Vec<u32>,
}

impl Scheduler {
    /// A scheduler for jobs needing `needs[i]` GPUs and allowed `retries[i]` retries, over
    /// `gpus` GPUs with `per_gpu` shares each and at most `max_slots` jobs at once.
    /// `skip[i]` jobs (already done, `--resume`) are never queued.
    pub fn new(
        needs: Vec<usize>,
        retries: Vec<u32>,
        skip: &[bool],
        gpus: usize,
        per_gpu: usize,
        max_slots: usize,
    ) -> Scheduler {
        let queue = (0..needs.len())
            .filter(|&i| !skip.get(i).copied().unwrap_or(false))
            .map(|job| Pending {
                job,
                attempt: 1,
                avoid: Vec::new(),
            })
            .collect();
        Scheduler {
            free: vec![per_gpu; gpus],
            available: vec![true; gpus],
            free_slots: (1..=max_slots.max(1)).collect(),
            queue,
            needs,
            retries,
        }
    }

    /// Marks GPU `gpu` as available or not for new jobs; running jobs are unaffected.
    pub fn set_available(&mut self, gpu: usize, available: bool) {
        if let Some(a) = self.available.get_mut(gpu) {
            *a = available;
        }
    }

    /// Jobs waiting for their turn (including retries).
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Drops every queued job (after an interrupt); running ones finish as they will.
    pub fn clear(&mut self) -> usize {
        let n = self.queue.len();
        self.queue.clear();
        n
    }

    /// The next job to start, if a slot and its GPUs are free. Jobs start in order: a job
    /// that needs more GPUs than are free waits, and those behind it wait too, so that
    /// a big job is never starved by small ones.
    pub fn next(&mut self) -> Option<Launch> {
        self.next_with(|request| {
            let mut chosen = request.candidates[..request.need].to_vec();
            chosen.sort_unstable();
            Some(chosen)
        })
    }

    /// As [`next`](Self::next), but `choose` decides which of the candidate GPUs the head
    /// job gets (the executor leases them there). `choose` must return `need` distinct
    /// candidates, or `None` to leave the job at the head of the queue for now; it is not
    /// called for jobs that need no GPU.
    pub fn next_with<F>(&mut self, choose: F) -> Option<Launch>
    where
        F: FnOnce(&Request) -> Option<Vec<usize>>,
    {
        let head = self.queue.front()?;
        let need = self.needs[head.job];
        let slot = *self.free_slots.first()?;
        let gpus = if need == 0 {
            Vec::new()
        } else {
            let candidates = self.candidates(&head.avoid);
            if candidates.len() < need {
                return None;
            }
            let preferred = candidates
                .iter()
                .copied()
                .filter(|g| !head.avoid.contains(g))
                .collect();
            let request = Request {
                job: head.job,
                need,
                candidates,
                preferred,
            };
            let mut chosen = choose(&request)?;
            chosen.sort_unstable();
            chosen.dedup();
            if chosen.len() != need || !chosen.iter().all(|g| request.candidates.contains(g)) {
                return None;
            }
            chosen
        };
        let head = self.queue.pop_front()?;
        self.free_slots.remove(&slot);
        for &g in &gpus {
            self.free[g] -= 1;
        }
        Some(Launch {
            job: head.job,
            attempt: head.attempt,
            gpus,
            slot,
        })
    }

    /// GPUs with a free share, in order of preference: those not in `avoid` first, then the
    /// least loaded (most free shares), then the lowest position.
    fn candidates(&self, avoid: &[usize]) -> Vec<usize> {
        let mut candidates: Vec<usize> = (0..self.free.len())
            .filter(|&g| self.free[g] > 0 && self.available[g])
            .collect();
        candidates.sort_by_key(|&g| (avoid.contains(&g), std::cmp::Reverse(self.free[g]), g));
        candidates
    }

    /// Records that `launch` ended; `failed` when it exited non-zero, was killed by a signal
    /// or timed out. A failed attempt is queued again while the job has retries left and
    /// `stopping` is false.
    pub fn finish(&mut self, launch: &Launch, failed: bool, stopping: bool) -> Verdict {
        for &g in &launch.gpus {
            self.free[g] += 1;
        }
        self.free_slots.insert(launch.slot);
        if failed && !stopping && launch.attempt <= self.retries[launch.job] {
            self.queue.push_back(Pending {
                job: launch.job,
                attempt: launch.attempt + 1,
                avoid: launch.gpus.clone(),
            });
            Verdict::Retry
        } else {
            Verdict::Done
        }
    }
}

impl Scheduler {
    /// Queues `launch` again as the same attempt, at the back: it did not run to an end of
    /// its own (Slurm preempted it, or its node failed), so no retry is used up.
    pub fn requeue(&mut self, launch: &Launch) {
        for &g in &launch.gpus {
            if let Some(free) = self.free.get_mut(g) {
                *free += 1;
            }
        }
        self.free_slots.insert(launch.slot);
        self.queue.push_back(Pending {
            job: launch.job,
            attempt: launch.attempt,
            avoid: launch.gpus.clone(),
        });
    }
}

/// Where a simulated run puts jobs: see [`simulate_with`].
pub trait Placement {
    /// Chooses the head job's GPUs, as [`Scheduler::next_with`]'s `choose`.
    fn choose(&mut self, request: &Request) -> Option<Vec<usize>>;
    /// GPUs found unable ever to qualify, to be offered no more.
    fn unavailable(&self) -> Vec<usize> {
        Vec::new()
    }
    /// `launch` ended.
    fn finished(&mut self, _launch: &Launch) {}
}

/// The scheduler's own choice: the first `need` candidates.
struct FirstCandidates;

impl Placement for FirstCandidates {
    fn choose(&mut self, request: &Request) -> Option<Vec<usize>> {
        Some(request.candidates[..request.need].to_vec())
    }
}

/// The order a dry run would start jobs in, assuming every job succeeds and the oldest
/// running job always ends first.
pub fn simulate(scheduler: Scheduler) -> Vec<Launch> {
    simulate_with(scheduler, &mut FirstCandidates)
}

/// As [`simulate`], with `placement` choosing each job's GPUs as the run would. Jobs it
/// cannot place even with nothing running are left out (the run would wait for GPUs).
pub fn simulate_with(mut scheduler: Scheduler, placement: &mut impl Placement) -> Vec<Launch> {
    let mut order = Vec::new();
    let mut running: VecDeque<Launch> = VecDeque::new();
    loop {
        loop {
            let launch = scheduler.next_with(|request| placement.choose(request));
            for gpu in placement.unavailable() {
                scheduler.set_available(gpu, false);
            }
            let Some(launch) = launch else { break };
            order.push(launch.clone());
            running.push_back(launch);
        }
        match running.pop_front() {
            Some(done) => {
                scheduler.finish(&done, false, false);
                placement.finished(&done);
            }
            None => return order,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(jobs: usize, need: usize, gpus: usize, per_gpu: usize) -> Scheduler {
        let slots = if gpus == 0 { 2 } else { gpus * per_gpu };
        Scheduler::new(vec![need; jobs], vec![1; jobs], &[], gpus, per_gpu, slots)
    }

    #[test]
    fn a_requeued_attempt_keeps_its_number_and_its_retries() {
        // One job, one retry, one GPU: requeueing (Slurm preempted it) frees the GPU and
        // slot and runs the same attempt again; a failure after that still has its retry.
        let mut s = sched(1, 1, 1, 1);
        let first = s.next().expect("first attempt");
        assert_eq!(s.next(), None);
        s.requeue(&first);
        assert_eq!(s.queued(), 1);
        let again = s.next().expect("requeued attempt");
        assert_eq!((again.job, again.attempt, again.slot), (0, 1, first.slot));
        assert_eq!(s.finish(&again, true, false), Verdict::Retry);
        let retry = s.next().expect("the retry");
        assert_eq!(retry.attempt, 2);
        assert_eq!(s.finish(&retry, true, false), Verdict::Done);
        assert_eq!(s.queued(), 0);
    }

    #[test]
    fn spreads_over_gpus_then_shares() {
        let mut s = sched(10, 1, 3, 2);
        let launches: Vec<Launch> = std::iter::from_fn(|| s.next()).collect();
        assert_eq!(launches.len(), 6);
        let gpus: Vec<usize> = launches.iter().map(|l| l.gpus[0]).collect();
        assert_eq!(gpus, [0, 1, 2, 0, 1, 2]);
        let slots: Vec<usize> = launches.iter().map(|l| l.slot).collect();
        assert_eq!(slots, [1, 2, 3, 4, 5, 6]);
        assert!(s.next().is_none());
        s.finish(&launches[1], false, false);
        let next = s.next().unwrap();
        assert_eq!((next.job, next.gpus.clone(), next.slot), (6, vec![1], 2));
    }

    #[test]
    fn multi_gpu_jobs_take_distinct_gpus() {
        let mut s = sched(3, 2, 4, 1);
        let a = s.next().unwrap();
        let b = s.next().unwrap();
        assert_eq!((a.gpus.clone(), b.gpus.clone()), (vec![0, 1], vec![2, 3]));
        assert!(s.next().is_none());
        s.finish(&a, false, false);
        assert_eq!(s.next().unwrap().gpus, vec![0, 1]);
    }

    #[test]
    fn big_jobs_are_not_starved() {
        let mut s = Scheduler::new(vec![1, 2, 1], vec![0; 3], &[], 2, 1, 2);
        let first = s.next().unwrap();
        assert!(
            s.next().is_none(),
            "the 2-GPU job waits and the 1-GPU job behind it too"
        );
        s.finish(&first, false, false);
        assert_eq!(s.next().unwrap().job, 1);
    }

    #[test]
    fn retries_go_elsewhere_then_stop() {
        let mut s = Scheduler::new(vec![1], vec![1], &[], 2, 1, 2);
        let first = s.next().unwrap();
        assert_eq!(first.gpus, [0]);
        assert_eq!(s.finish(&first, true, false), Verdict::Retry);
        let second = s.next().unwrap();
        assert_eq!((second.attempt, second.gpus.clone()), (2, vec![1]));
        assert_eq!(s.finish(&second, true, false), Verdict::Done);
        assert!(s.next().is_none());
    }

    #[test]
    fn no_retry_when_stopping_or_succeeded() {
        let mut s = Scheduler::new(vec![0, 0], vec![3, 3], &[], 0, 1, 2);
        let a = s.next().unwrap();
        let b = s.next().unwrap();
        assert_eq!(s.finish(&a, true, true), Verdict::Done);
        assert_eq!(s.finish(&b, false, false), Verdict::Done);
        assert_eq!(s.queued(), 0);
    }

    #[test]
    fn cpu_only_uses_slot_numbers() {
        let mut s = sched(5, 0, 0, 1);
        let a = s.next().unwrap();
        let b = s.next().unwrap();
        assert!(s.next().is_none());
        assert_eq!((a.slot, b.slot), (1, 2));
        assert!(a.gpus.is_empty());
    }

    #[test]
    fn unavailable_gpus_are_skipped_and_skip_list_honoured() {
        let mut s = Scheduler::new(vec![1; 3], vec![0; 3], &[true, false, false], 2, 1, 2);
        s.set_available(0, false);
        let a = s.next().unwrap();
        assert_eq!((a.job, a.gpus.clone()), (1, vec![1]));
        assert!(s.next().is_none());
        s.set_available(0, true);
        assert_eq!(s.next().unwrap().gpus, [0]);
    }

    #[test]
    fn next_with_lets_the_chooser_decide_or_refuse() {
        let mut s = Scheduler::new(vec![1, 1, 0], vec![1; 3], &[], 3, 1, 3);
        assert!(
            s.next_with(|_| None).is_none(),
            "refused: the job stays queued"
        );
        assert_eq!(s.queued(), 3);
        let a = s
            .next_with(|r| {
                assert_eq!((r.job, r.need, r.candidates.clone()), (0, 1, vec![0, 1, 2]));
                Some(vec![2])
            })
            .unwrap();
        assert_eq!(a.gpus, [2]);
        // A choice outside the candidates (GPU 2 is taken) is refused.
        assert!(s.next_with(|_| Some(vec![2])).is_none());
        assert_eq!(s.finish(&a, true, false), Verdict::Retry);
        let b = s.next_with(|r| Some(vec![r.candidates[0]])).unwrap();
        assert_eq!(b.job, 1);
        // A job needing no GPU is not offered to the chooser.
        let c = s.next_with(|_| panic!("not asked")).unwrap();
        assert!(c.gpus.is_empty());
        // The retry prefers GPUs its failed attempt did not use.
        let d = s
            .next_with(|r| {
                assert_eq!(
                    (r.candidates.clone(), r.preferred.clone()),
                    (vec![1, 2], vec![1])
                );
                Some(r.preferred.clone())
            })
            .unwrap();
        assert_eq!((d.job, d.attempt, d.gpus.clone()), (0, 2, vec![1]));
    }

    #[test]
    fn clear_drops_the_queue() {
        let mut s = sched(4, 1, 1, 1);
        let _ = s.next().unwrap();
        assert_eq!(s.clear(), 3);
        assert!(s.next().is_none());
    }

    /// Prefers the highest position, records endings, refuses position 0 for ever.
    #[derive(Default)]
    struct Highest {
        ended: Vec<usize>,
    }

    impl Placement for Highest {
        fn choose(&mut self, request: &Request) -> Option<Vec<usize>> {
            let mut c: Vec<usize> = request
                .candidates
                .iter()
                .copied()
                .filter(|&g| g != 0)
                .collect();
            c.sort_unstable_by(|a, b| b.cmp(a));
            (c.len() >= request.need).then(|| c[..request.need].to_vec())
        }
        fn unavailable(&self) -> Vec<usize> {
            vec![0]
        }
        fn finished(&mut self, launch: &Launch) {
            self.ended.push(launch.job);
        }
    }

    #[test]
    fn simulation_places_as_told_and_leaves_out_what_cannot_be_placed() {
        let mut placement = Highest::default();
        let order = simulate_with(sched(4, 1, 3, 1), &mut placement);
        let gpus: Vec<usize> = order.iter().map(|l| l.gpus[0]).collect();
        assert_eq!(gpus, [2, 1, 2, 1]);
        assert_eq!(placement.ended, [0, 1, 2, 3]);
        // A job needing 3 GPUs when only 2 can ever be had is left out.
        let order = simulate_with(
            Scheduler::new(vec![1, 3], vec![0; 2], &[], 3, 1, 3),
            &mut Highest::default(),
        );
        assert_eq!(order.iter().map(|l| l.job).collect::<Vec<_>>(), [0]);
    }

    #[test]
    fn dry_run_order() {
        let order = simulate(sched(5, 1, 2, 1));
        let gpus: Vec<usize> = order.iter().map(|l| l.gpus[0]).collect();
        assert_eq!(gpus, [0, 1, 0, 1, 0]);
        assert_eq!(order.len(), 5);
    }
}
