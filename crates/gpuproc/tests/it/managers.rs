//! Managers' queues, locks, events, registered types, `SharedMemoryManager` and remote
//! managers, ported from CPython's `Lib/test/_test_multiprocessing.py` (`_TestQueue`,
//! `_TestLock`, `_TestEvent` with the manager type, `_TestMyManager`,
//! `_TestRemoteManager`, `_TestSharedMemory.test_shared_memory_SharedMemoryManager_*`).

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use gpuproc::managers::{
    ManagedDict, ManagedEvent, ManagedLock, ManagedObject, ManagedQueue, ManagedValue, Manager,
    Served, SharedMemoryManager,
};
use gpuproc::{Pool, Queue, StartMethod};

use crate::support::{self, TIMEOUT};

fn deadline(d: Duration) -> Instant {
    gpuproc::time::deadline(d).unwrap()
}

// ---- Queues: CPython's `_TestQueue.test_put`, `test_get` with a manager's queue ----

/// Puts 0..100 into a bounded queue (so it blocks while the parent is slow), then `None`.
fn produce(q: ManagedQueue<Option<u32>>) {
    for i in 0..100 {
        q.put_timeout(&Some(i), TIMEOUT).unwrap();
    }
    q.put(&None).unwrap();
}

/// A queue between two processes through its proxy: FIFO order, a bounded queue's
/// producer waits for room, `Empty` and `Full` after their timeouts.
#[test]
fn managed_queue_between_two_processes() {
    let manager = Manager::start().unwrap();
    let q: ManagedQueue<Option<u32>> = manager.queue(3).unwrap();
    assert!(q.empty().unwrap());
    assert!(q
        .get_timeout(Duration::from_millis(50))
        .unwrap_err()
        .is_queue_empty());
    let mut p = support::start(StartMethod::Spawn, produce, q.clone());
    let mut got = Vec::new();
    while let Some(i) = q.get_timeout(TIMEOUT).unwrap() {
        assert!(q.qsize().unwrap() <= 3);
        got.push(i);
    }
    p.join_timeout(TIMEOUT).unwrap();
    assert_eq!(got, (0..100).collect::<Vec<_>>());
    for i in 0..3 {
        q.try_put(&Some(i)).unwrap();
    }
    assert!(q.try_put(&Some(3)).unwrap_err().is_queue_full());
    assert!(q
        .put_timeout(&Some(3), Duration::from_millis(50))
        .unwrap_err()
        .is_queue_full());
    assert_eq!(q.qsize().unwrap(), 3);
    assert_eq!(q.try_get().unwrap(), Some(0));
}

/// A `get` that waits blocks neither the manager (another proxy, another object) nor
/// other threads using the same proxy; a `put` from one of them wakes it.
#[test]
fn a_blocked_get_blocks_nobody_else() {
    let manager = Manager::start().unwrap();
    let q: ManagedQueue<u8> = manager.queue(0).unwrap();
    let d: ManagedDict<u8, u8> = manager.dict().unwrap();
    std::thread::scope(|s| {
        let waiter = s.spawn(|| q.get_timeout(TIMEOUT));
        // The other thread's get holds one of the proxy's connections; these use others.
        d.set(&1, &1).unwrap();
        assert_eq!(d.get(&1).unwrap(), Some(1));
        assert_eq!(q.qsize().unwrap(), 0);
        q.put(&7).unwrap();
        assert_eq!(waiter.join().unwrap().unwrap(), 7);
    });
}

// ---- Locks: CPython's `_TestLock` with `manager.Lock()` ----

/// 100 read-modify-write steps of a managed value under the lock.
fn add_100_locked((lock, v): (ManagedLock, ManagedValue<u64>)) {
    for _ in 0..100 {
        let guard = lock.lock().unwrap();
        let x = v.get().unwrap();
        v.set(&(x + 1)).unwrap();
        guard.release().unwrap();
    }
}

/// Mutual exclusion across 4 processes: 4 x 100 increments, none lost.
#[test]
fn managed_lock_excludes_four_processes() {
    let manager = Manager::start().unwrap();
    let lock = manager.lock().unwrap();
    let v = manager.value(&0u64).unwrap();
    let pool = Pool::builder()
        .processes(4)
        .start_method(StartMethod::Spawn)
        .build()
        .unwrap();
    pool.map(add_100_locked, (0..4).map(|_| (lock.clone(), v.clone())))
        .unwrap();
    assert_eq!(v.get().unwrap(), 400);
    assert!(!lock.locked().unwrap());
    let g = lock.try_lock().unwrap().expect("a free lock");
    assert!(lock.locked().unwrap());
    assert!(lock.try_lock().unwrap().is_none());
    assert!(lock
        .lock_timeout(Duration::from_millis(50))
        .unwrap()
        .is_none());
    drop(g);
    assert!(!lock.locked().unwrap());
}

/// Takes the lock, says so, and dies holding it.
fn hold_lock_forever((lock, held): (ManagedLock, Queue<()>)) {
    let guard = lock.lock().unwrap();
    held.put(()).unwrap();
    std::mem::forget(guard);
    support::block_forever()
}

/// A process killed while holding a managed lock: the manager releases it when its
/// connection closes (Python's manager keeps it locked), and a waiter gets it.
#[test]
fn a_dead_holders_lock_is_released() {
    let manager = Manager::start().unwrap();
    let lock = manager.lock().unwrap();
    let held = Queue::new().unwrap();
    let mut p = support::start(
        StartMethod::Spawn,
        hold_lock_forever,
        (lock.clone(), held.clone()),
    );
    held.get_timeout(TIMEOUT).unwrap();
    assert!(lock.locked().unwrap());
    std::thread::scope(|s| {
        let waiter = s.spawn(|| lock.lock_timeout(TIMEOUT).map(|g| g.is_some()));
        p.kill().unwrap();
        assert!(p.join_timeout(TIMEOUT).is_err());
        assert!(waiter.join().unwrap().unwrap(), "the waiter got the lock");
    });
}

/// Sets, overwrites and removes keys of a dict without end; says so once started.
fn churn_forever((d, started): (ManagedDict<u64, Vec<u8>>, Queue<()>)) {
    d.set(&0, &vec![0; 10]).unwrap();
    started.put(()).unwrap();
    let mut i = 0u64;
    loop {
        i += 1;
        let _ = d.set(&(i % 500), &vec![i as u8; (i % 200) as usize]);
        if i % 3 == 0 {
            let _ = d.remove(&((i + 7) % 500));
        }
    }
}

/// Processes killed (SIGKILL) in the middle of using a dict in place: the dict stays
/// usable and its length is the number of keys it holds.
#[test]
fn dict_users_killed_mid_operation_leave_a_usable_dict() {
    let manager = Manager::start().unwrap();
    let d: ManagedDict<u64, Vec<u8>> = manager.dict().unwrap();
    let d = d.with_timeout(TIMEOUT);
    for round in 0..5 {
        let started = Queue::new().unwrap();
        let mut p = support::start(
            StartMethod::Fork,
            churn_forever,
            (d.clone(), started.clone()),
        );
        started.get_timeout(TIMEOUT).unwrap();
        // Let it churn for a moment of its own making: until it changed key 250.
        let seen = d.get(&250).unwrap();
        let by = deadline(TIMEOUT);
        while d.get(&250).unwrap() == seen {
            assert!(Instant::now() < by, "the writer made no progress");
        }
        p.kill().unwrap();
        assert!(p.join_timeout(TIMEOUT).is_err());
        let items = d.items().unwrap();
        assert_eq!(d.len().unwrap(), items.len(), "round {round}");
        d.set(&1_000, &vec![1; 3]).unwrap();
        assert_eq!(d.get(&1_000).unwrap(), Some(vec![1; 3]));
        assert_eq!(d.remove(&1_000).unwrap(), Some(vec![1; 3]));
    }
}

// ---- Events: CPython's `_TestEvent.test_event` with `manager.Event()` ----

/// Says it is about to wait, then waits; whether the event was set.
fn wait_for_event((e, waiting): (ManagedEvent, Queue<()>)) -> bool {
    waiting.put(()).unwrap();
    e.wait_timeout(TIMEOUT).unwrap()
}

/// `set` wakes every waiting process; `wait` with a timeout on a clear event says false.
#[test]
fn managed_event_wakes_waiters() {
    let manager = Manager::start().unwrap();
    let e = manager.event().unwrap();
    assert!(!e.is_set().unwrap());
    assert!(!e.wait_timeout(Duration::from_millis(50)).unwrap());
    let waiting = Queue::new().unwrap();
    let mut ps: Vec<_> = (0..3)
        .map(|_| {
            support::start(
                StartMethod::Spawn,
                wait_for_event,
                (e.clone(), waiting.clone()),
            )
        })
        .collect();
    for _ in 0..3 {
        waiting.get_timeout(TIMEOUT).unwrap();
    }
    e.set().unwrap();
    for p in &mut ps {
        assert!(p.join_timeout(TIMEOUT).unwrap());
    }
    assert!(e.is_set().unwrap());
    e.wait().unwrap();
    e.clear().unwrap();
    assert!(!e.is_set().unwrap());
}

// ---- Registered types: CPython's `_TestMyManager` ----

/// A type served by the manager.
struct Counter {
    total: i64,
    calls: u32,
}

#[derive(Debug, Serialize, Deserialize)]
enum CounterCall {
    Add(i64),
    Get,
    Panic,
}

impl Served for Counter {
    type Args = i64;
    type Call = CounterCall;
    type Reply = (i64, u32);
    fn create(start: i64) -> Self {
        Counter {
            total: start,
            calls: 0,
        }
    }
    fn call(&mut self, call: CounterCall) -> (i64, u32) {
        self.calls += 1;
        match call {
            CounterCall::Add(n) => self.total += n,
            CounterCall::Get => {}
            CounterCall::Panic => panic!("asked to panic"),
        }
        (self.total, self.calls)
    }
}

/// A type this manager was not built with.
struct Unregistered;

impl Served for Unregistered {
    type Args = ();
    type Call = ();
    type Reply = ();
    fn create((): ()) -> Self {
        Unregistered
    }
    fn call(&mut self, (): ()) {}
}

fn add_250(c: ManagedObject<Counter>) {
    for _ in 0..250 {
        c.call(&CounterCall::Add(1)).unwrap();
    }
}

/// A registered type, made in the manager and called from 4 processes; an unregistered
/// type is refused; a call that panics is an error and the instance stays usable.
#[test]
fn registered_type_called_from_four_processes() {
    let manager = Manager::builder().register::<Counter>().start().unwrap();
    let c = manager.create::<Counter>(&10).unwrap();
    let mut ps: Vec<_> = (0..4)
        .map(|_| support::start(StartMethod::Spawn, add_250, c.clone()))
        .collect();
    for p in &mut ps {
        p.join_timeout(TIMEOUT).unwrap();
    }
    assert_eq!(c.call(&CounterCall::Get).unwrap(), (1010, 1001));
    let e = c.call(&CounterCall::Panic).unwrap_err();
    assert!(e.to_string().contains("asked to panic"), "{e}");
    assert_eq!(c.call(&CounterCall::Get).unwrap().0, 1010);
    let e = manager.create::<Unregistered>(&()).unwrap_err();
    assert!(e.to_string().contains("not registered"), "{e}");
}

// ---- SharedMemoryManager: CPython's `test_shared_memory_SharedMemoryManager_basics` ----

fn in_dev_shm(name: &str) -> bool {
    std::path::Path::new("/dev/shm").join(name).exists()
}

/// Waits (until `by`) for every name to be gone from /dev/shm; those left.
fn gone_by(names: &[String], by: Instant) -> Vec<String> {
    loop {
        let left: Vec<String> = names.iter().filter(|n| in_dev_shm(n)).cloned().collect();
        if left.is_empty() || Instant::now() >= by {
            return left;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Attaches a block made by the manager, by name, and writes to it.
fn write_block(name: String) {
    let b = gpuproc::shm::SharedMemory::attach(&name).unwrap();
    b.write_at(0, b"child");
}

/// Blocks and lists made by a `SharedMemoryManager` are usable from other processes and
/// gone from /dev/shm once `shutdown` returns; and after the manager is SIGKILLed, within
/// 1 s of its end.
#[test]
fn shared_memory_manager_unlinks_at_shutdown_and_after_sigkill() {
    let mut smm = SharedMemoryManager::start().unwrap();
    let block = smm.shared_memory(4096).unwrap();
    let list = smm.shareable_list([1i64, 2, 3]).unwrap();
    let strings = smm.shareable_list_with_capacity(["a", "b"], 32).unwrap();
    let names = vec![
        block.name().to_string(),
        list.name().to_string(),
        strings.name().to_string(),
    ];
    assert!(names.iter().all(|n| in_dev_shm(n)), "{names:?}");
    let mut p = support::start(StartMethod::Spawn, write_block, names[0].clone());
    p.join_timeout(TIMEOUT).unwrap();
    let mut seen = [0u8; 5];
    block.read_at(0, &mut seen);
    assert_eq!(&seen, b"child");
    strings.set(0, "a longer string").unwrap();
    assert_eq!(list.get(2).unwrap(), gpuproc::shm::Item::Int(3));
    // Dropping what this process attached unlinks nothing.
    drop((block, list, strings));
    assert!(names.iter().all(|n| in_dev_shm(n)));
    smm.shutdown();
    let left: Vec<_> = names.iter().filter(|n| in_dev_shm(n)).collect();
    assert!(left.is_empty(), "left after shutdown: {left:?}");

    let mut smm = SharedMemoryManager::start().unwrap();
    let names: Vec<String> = vec![
        smm.shared_memory(64).unwrap().name().into(),
        smm.shareable_list([1.5f64]).unwrap().name().into(),
    ];
    assert!(names.iter().all(|n| in_dev_shm(n)));
    let pid = smm.pid().unwrap();
    // SAFETY: a plain system call on a child process we started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let ended = support::wait_all_ended(&[pid], deadline(TIMEOUT));
    assert!(ended.is_empty(), "the manager never ended");
    let left = gone_by(&names, deadline(Duration::from_secs(1)));
    assert!(left.is_empty(), "left after SIGKILL: {left:?}");
    smm.shutdown();
}

// ---- Remote managers: CPython's `_TestRemoteManager` ----

/// Another program's side: connects by address and key, looks up the published queue and
/// dict, and squares each job into the dict.
fn remote_client((address, key): (String, Vec<u8>)) -> Result<usize, String> {
    let m = Manager::connect(
        address
            .parse::<gpuproc::connection::Address>()
            .map_err(|e| e.to_string())?,
        &key,
    )
    .map_err(|e| e.to_string())?;
    let jobs: ManagedQueue<Option<u64>> = m.lookup("jobs").map_err(|e| e.to_string())?;
    let results: ManagedDict<u64, u64> = m.lookup("results").map_err(|e| e.to_string())?;
    let mut n = 0;
    while let Some(j) = jobs.get_timeout(TIMEOUT).map_err(|e| e.to_string())? {
        results.set(&j, &(j * j)).map_err(|e| e.to_string())?;
        n += 1;
    }
    Ok(n)
}

/// A manager on 127.0.0.1 with an authkey, used by a process that knows only its address
/// and key; a wrong key is an authentication error, a wrong type a refusal.
#[test]
fn remote_manager_over_tcp_loopback() {
    let key = b"abracadabra".to_vec();
    let manager = Manager::builder()
        .address(("127.0.0.1", 0))
        .authkey(&key)
        .start()
        .unwrap();
    let address = manager.address();
    assert!(address.is_tcp(), "{address}");
    let jobs: ManagedQueue<Option<u64>> = manager.queue(0).unwrap();
    let results: ManagedDict<u64, u64> = manager.dict().unwrap();
    manager.publish("jobs", &jobs).unwrap();
    manager.publish("results", &results).unwrap();
    for j in 0..10 {
        jobs.put(&Some(j)).unwrap();
    }
    jobs.put(&None).unwrap();
    let mut p = support::start(
        StartMethod::Spawn,
        remote_client,
        (address.to_string(), key.clone()),
    );
    assert_eq!(p.join_timeout(TIMEOUT).unwrap(), Ok(10));
    assert_eq!(results.len().unwrap(), 10);
    assert_eq!(results.get(&9).unwrap(), Some(81));

    let e = Manager::connect(address.clone(), b"wrong key").unwrap_err();
    assert!(e.is_authentication(), "{e}");
    let m = Manager::connect(address, &key).unwrap();
    assert_eq!(m.pid(), None);
    let e = m.lookup::<ManagedQueue<String>>("jobs").unwrap_err();
    assert!(e.to_string().contains("published as"), "{e}");
    assert!(m.lookup::<ManagedDict<u64, u64>>("nothing").is_err());
    drop(m); // leaves the manager running
    assert_eq!(results.get(&3).unwrap(), Some(9));
}
