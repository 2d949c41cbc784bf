//! gpuproc: Python's `multiprocessing` for Rust, with GPU information from any process.
//!
//! # A first example
//!
//! Python's documentation opens with this:
//!
//! ```python
//! from multiprocessing import Process
//!
//! def f(name):
//!     print('hello', name)
//!
//! if __name__ == '__main__':
//!     p = Process(target=f, args=('bob',))
//!     p.start()
//!     p.join()
//! ```
//!
//! In Rust:
//!
//! ```
//! fn f(name: String) {
//!     println!("hello {name}");
//! }
//!
//! # fn main() -> Result<(), gpuproc::ProcessError> {
//! gpuproc::init(); // first line of main: Python's `if __name__ == '__main__':`
//! let mut p = gpuproc::Process::new(f, "bob".to_string());
//! p.start()?;
//! p.join()?;
//! # Ok(())
//! # }
//! ```
//!
//! # The one line of set-up
//!
//! A child process is this same executable, so it needs a way to tell "I am a child" from
//! "I am the program". In Python that is `if __name__ == '__main__':`. In gpuproc it is
//! [`init()`], the first line of `main`: in the program it returns at once; in a child (or
//! the fork server) it runs the child's work and exits, never returning. Code before it runs
//! in every child too, so put nothing before it.
//!
//! In tests, where libtest owns `main`, write [`enable_test_support!()`] once per test
//! binary (for example at the top of `tests/it/main.rs`).
//!
//! # Async runtimes and threads started before `init`
//!
//! The fork server is a copy of the program that must have a single thread when it forks.
//! With `#[tokio::main]` (or any code that starts a thread before `init()` runs), the
//! runtime's threads exist before the first line of `main`, in the fork server too. Put
//! [`init_before_main!()`] at the top level of the program instead: it runs [`init`]
//! from a constructor, before `main` and before any runtime starts.
//!
//! ```ignore
//! gpuproc::init_before_main!();
//!
//! #[tokio::main]
//! async fn main() {
//!     let mut p = gpuproc::Process::new(|x: u64| x * x, 7);
//!     p.start().unwrap();
//!     // join blocks: call it from spawn_blocking in async code.
//!     let r = tokio::task::spawn_blocking(move || p.join()).await.unwrap();
//!     assert_eq!(r.unwrap(), 49);
//! }
//! ```
//!
//! Without it, a fork server that finds other threads refuses to fork, and
//! [`Process::start`] fails with a [`ProcessError::ForkServer`] that names this fix
//! ([`StartMethod::Spawn`] works either way).
//!
//! # Start methods
//!
//! As in Python ([`StartMethod`], [`set_start_method`], [`Process::with_start_method`]):
//! - **ForkServer** (default): a single-threaded copy of the program, started once on first
//!   use, forks each child. Fast, and safe in multi-threaded programs.
//! - **Fork**: forks this process directly. Fastest, sees the parent's memory, but refused
//!   when the parent has more than one thread (forking a multi-threaded program can leave a
//!   lock held for ever in the child) unless explicitly allowed.
//! - **Spawn**: re-runs the executable for every child. Slowest, simplest.
//!
//! # Arguments and results
//!
//! A target is a plain `fn(A) -> R` (or a closure capturing nothing). `A` and `R` cross
//! process boundaries as serde data (postcard); several arguments travel as a tuple. Code is
//! never sent: the child runs the same executable and finds the function by its offset.
//!
//! # Big data
//!
//! How a value travels, and what it costs:
//! - **Serde data** (arguments and results of processes and pool tasks, channel messages) is
//!   encoded in postcard's format by gpuproc's own serializer, which takes vectors and
//!   slices of numbers whole: a `Vec<f32>`, `Vec<u8>`, `&[f64]` or `Box<[i8]>` is one copy
//!   each way, and vectors of wider integers (`u32` token ids, `i64` offsets) one tight
//!   varint loop, wherever they sit in the value (a `Batch { ids: Vec<u32>, x: Vec<f32>,
//!   name: String }` takes that path for both vectors). A vector of plain structs
//!   (`#[repr(C)]`, [`bytemuck::Pod`]) takes it too when its field is marked
//!   `#[serde(with = "gpuproc::pod")]` (see [`pod`]): 8.5-13x faster than element by
//!   element for 4 MiB of 12-byte points on the 2-core machine. Other sequences (of strings, of unmarked structs,
//!   `VecDeque`, sets) go element by element. In a pool, plain fixed-width data
//!   (numbers, `bool`, `char`, and tuples, arrays and structs of them) goes at a fixed width
//!   with one length for a whole chunk, a few nanoseconds per item. `String` and [`Bytes`]
//!   are one block of bytes.
//! - **Transport**: a pool's chunk of arguments, or a worker's run of results, of more than
//!   256 KiB is written straight into a reused memfd, sealed against shrinking, and read in
//!   place by the other side: no copy through the socket (a worker reuses its memfd of
//!   results once the caller has decoded them). A pool's `map` over 4 MiB `Vec<f32>` items
//!   moves 5-7 GB/s of arguments with 2 workers (returning a sum; 3.7-4.5 GB/s when each
//!   result is 4 MiB too), against 0.25-0.6 GB/s for Python's `Pool.map` over numpy arrays
//!   on the same machine (`benchmarks/`, bench_pool section (e)). A channel message over 64 KiB goes
//!   through a sealed memfd in the same way. A process's argument and result, and smaller
//!   chunks, go over a Unix socket (a kernel copy each way). `map` and `imap` keep at most
//!   three chunks per worker (at least 32 MiB) of arguments in flight, so an input of any
//!   size streams through bounded memory.
//! - **Handles** to shared memory ([`SharedSlice`], [`SharedArray`], [`SharedValue`],
//!   [`SharedMemory`]), like channels and locks, travel as a file descriptor (`SCM_RIGHTS`):
//!   the receiver maps the same memory, whatever its size. A [`SharedSlice`] of 4 MiB goes
//!   through a queue in about 16 µs; making one costs about what writing fresh memory does
//!   (0.4 s per GiB on the same machine), once, however many times it is sent.
//!
//! When to use which: small items need nothing (plain data is already fast). Large byte
//! buffers: [`Bytes`]. Large arrays of numbers sent to workers or returned by them:
//! [`SharedSlice`] (make it once, or fill it in place with [`SharedSlice::build`], and send
//! the handle; the worker reads a plain `&[T]`). Data every task reads: put it in shared
//! memory once, hand it to each worker once through [`PoolBuilder::initializer`] (kept in a
//! `static OnceLock`), and map over ids or row ranges, so that tasks carry a few bytes
//! each (`examples/big_data.rs`). Arrays that several processes write: [`SharedArray`]
//! (with its lock) or a named [`SharedMemory`] block read and written through typed views
//! ([`SharedMemory::view`]).
//!
//! | | copies | who may write | passed how | read as | typical use |
//! |---|---|---|---|---|---|
//! | [`Bytes`] | one into each message and one out (a channel message over 64 KiB, a pool chunk over 256 KiB: one, through a memfd) | its owner (it is a `Vec<u8>`) | by value, in any message | `&[u8]` | byte payloads: files, images, encoded blobs |
//! | [`SharedSlice<T>`](SharedSlice) | one when made (none with [`build`](SharedSlice::build)), none when sent | nobody once made (the memory is sealed) | a descriptor, in any message | a plain `&[T]` | large read-only arrays as task arguments, results and queue items |
//! | [`SharedArray<T>`](SharedArray) | one when made, none when sent | every holder, one element at a time (atomic), a lock for several steps | a descriptor, in any message | atomic `get`, bulk `to_vec` / `copy_to_slice` | state that workers update; Python's `Array` |
//! | [`SharedMemory`] | none (the creator fills it) | every process that attaches it | by name (any process, related or not), or a descriptor in a message | atomic bytes ([`buf`](SharedMemory::buf)), typed [`view`](SharedMemory::view)s | data already in shared memory, blocks shared with other programs; Python's `shared_memory` |
//!
//! # Panics, exit codes and signals
//!
//! A child's panic comes back as [`ProcessError::Panicked`] with the message and location;
//! a child that exits or is killed before returning is [`ProcessError::Exited`] or
//! [`ProcessError::Killed`]; [`Process::exitcode`] follows Python (negative signal number;
//! 1 after a panic, as after Python's uncaught exception). Children write to the parent's
//! standard output and error.
//!
//! # When the target returns
//!
//! The child sends the result, flushes standard output and error, and ends at once with
//! `_exit`: as when Rust's `main` returns, threads the target started end with it, without
//! running further; unlike a return from `main`, `atexit` handlers and the C library's exit
//! processing do not run either (Python's children end with `os._exit` too). Join the
//! threads, and flush or close what must be finished, before the target returns.
//!
//! # Default start method in a child
//!
//! As in Python, a child's [`get_start_method`] is the method that started it, so its own
//! children are started the same way.
//!
//! # Process names
//!
//! A child named with [`Process::with_name`] carries that name as its operating-system
//! name (the first 15 bytes, as `ps`, `top` and `/proc/PID/comm` show it); an unnamed
//! child is `gpuproc-worker`, the fork server `gpuproc-forksrv`.
//!
//! # Errors
//!
//! Each area has one error type ([`ProcessError`], [`PoolError`], [`ChannelError`],
//! [`connection::ConnectionError`], [`SyncError`], [`ShmError`], [`gpu::GpuError`],
//! [`gpu::PickError`]). Its `Display` is one
//! sentence about what failed; the underlying cause (an OS error, say) is its
//! [`source()`](std::error::Error::source) and is not repeated in the message, so reports
//! that print the chain (`anyhow`'s `{:#}`) show each cause once. Its `Debug` (what
//! `fn main() -> Result<..>`, `unwrap()` and `expect()` print) is the message followed by
//! every cause: `{e:?}` is the whole story in one line.
//!
//! # Children never outlive their parent
//!
//! Each child dies with its parent, even when the parent is killed with SIGKILL: through
//! `PR_SET_PDEATHSIG` where the parent is a thread that lives as long as the program (the
//! main thread, or the fork server, which exits on EOF of its own control socket when the
//! program is gone), otherwise (a child started from a thread that may exit first) through
//! EOF on its control socket. Dropping a [`Process`] that was not joined kills and reaps it.
//!
//! The fork server ignores SIGINT, as Python's does, so a Ctrl-C that the program handles
//! does not end it. If someone kills it (SIGKILL), its running children die with it: their
//! [`Process::join`] returns [`ProcessError::ForkServer`] saying so, and
//! [`Process::exitcode`] is -9 (SIGKILL). A child that had already returned, panicked or
//! called `std::process::exit` (with the GNU C library) keeps its result and its exit code.
//! (Watching the program from each child instead would cost a thread per child, and more
//! than doubles the time to start one.)
//!
//! # Connections between programs
//!
//! [`connection`] is Python's `multiprocessing.connection`: a [`connection::Listener`] on a
//! Unix socket or a TCP port, [`connection::Client`] to reach it, both authenticated with a
//! shared authkey (Python's HMAC challenge-response, required for TCP). Bytes interoperate
//! with Python's `Listener` and `Client`.
//!
//! # Remote computers
//!
//! Python's `multiprocessing` reaches other machines through `multiprocessing.connection`
//! (a `Listener` and a `Client` sharing an authkey) and managers over TCP, and leaves
//! starting the processes there to the user. gpuproc has the connections (module
//! [`connection`], wire-compatible with Python's) and also starts the processes, through
//! the engine the cluster already runs: a [`Launcher`] given to a pool
//! ([`PoolBuilder::launcher`]) or to one process ([`Process::launcher`]).
//! [`Launcher::slurm`] makes each worker a Slurm job step (`srun`; inside an allocation, a
//! step of it; outside one, its own allocation), with the options of [`Slurm`]
//! (`Slurm::new().gpus(1)` gives each worker one GPU, which it sees through
//! `CUDA_VISIBLE_DEVICES`); [`Launcher::command`] starts each through any command line
//! (`["ssh", "node3"]`) for sites without Slurm. The API is the local one, and so are the
//! promises, with one difference: a worker that is lost (its node fails, its step is
//! cancelled, it is killed, the network drops: TCP keep-alive notices within about 30 s)
//! fails the tasks it had in flight, each with [`PoolError::WorkerLost`] naming the node and
//! what happened (or runs them again, with [`PoolBuilder::retries`]), since which of them
//! was running is not known on this side; it is replaced, and the map goes on. A lost
//! [`Process`] fails `join` with [`ProcessError::WorkerLost`] and has the exit code
//! [`LOST_EXITCODE`] (255). The pool's end, `terminate`, or this process's death ends every
//! worker (`srun` cancels its step; a remote worker also ends as soon as its connection
//! does).
//!
//! ```no_run
//! # gpuproc::init();
//! use gpuproc::{Launcher, Pool, Slurm};
//!
//! fn train(seed: u64) -> f64 { seed as f64 }
//!
//! let pool = Pool::builder()
//!     .processes(8)
//!     .launcher(Launcher::slurm(Slurm::new().gpus(1).time("2:00:00")))
//!     .build()?;
//! let scores = pool.map(train, 0..64u64)?;
//! # Ok::<(), gpuproc::PoolError>(())
//! ```
//!
//! ## Running across a Slurm allocation
//!
//! Ask for the nodes, then run the program inside the allocation; each worker becomes a
//! step on one of its nodes, with the GPUs Slurm binds to it:
//!
//! ```sh
//! salloc -N 2 --gpus-per-node 4        # or the same lines in an sbatch script
//! ./target/release/my-program          # Pool::builder().processes(8)
//!                                      #   .launcher(Launcher::slurm(Slurm::new().gpus(1)))
//! ```
//!
//! The executable must be at the same path on the nodes (a shared filesystem, or copied
//! with `sbcast`; or [`pool::Slurm::bcast`] has Slurm copy it as each worker starts), and the nodes must reach this machine over TCP
//! ([`Launcher::connect_back_to`] names the address; by default this host's name).
//! `examples/remote_pool.rs` runs this on the project's one-node cluster
//! (`scripts/slurm-local up`). On each worker [`gpu::assigned`] names its node and the GPUs
//! Slurm bound (by UUID); [`PoolBuilder::gpus_per_worker`] with a Slurm launcher asks Slurm
//! for them with each step. Each remote worker samples the GPU memory of its process tree
//! through NVML on its own node and sends the samples back, so [`Pool::gpu_usage`] shows
//! every worker's node, GPUs (NVML index and UUID) and memory, and
//! [`Pool::map_with_gpu_memory`] each task's peak, as for local workers.
//!
//! ## What crosses the network, and what does not
//!
//! A remote worker is the same executable, started with a flag that [`init`] recognises, so
//! a task function travels as its offset in the executable, as it does to a local child; the
//! worker proves it runs the same build (the executable's GNU build id, else its SHA-256)
//! before it gets any work. Arguments, results, panics and exit codes cross the network
//! inline (shared memory does not cross machines). Values that hold descriptors (queues,
//! locks, pipes, shared memory, [`SharedSlice`]) cannot: such a task, process argument or
//! initializer argument is refused when submitted, naming its type, and such a result fails
//! as a [`PoolError::BadResult`]/[`ProcessError::BadResult`]. Task timeouts and GPU leases
//! ([`PoolBuilder::workers_per_gpu`], [`PoolBuilder::gpu_criteria`]) are for local pools: with
//! a remote launcher they are refused when the pool is built. Standard output and error of
//! remote workers go where the launcher sends them (`srun` and `ssh`: here).
//!
//! ## Security model
//!
//! - **Who can connect.** For each remote worker the pool listens on a TCP port (every
//!   interface, or the address given to [`Launcher::connect_back_to`]) only until that
//!   worker has connected, with a fresh random 32-byte key. The key goes to the launcher's
//!   command on its standard input: never on a command line or in the environment, which
//!   other users of the machine or the node can read (with Slurm it travels with `srun`'s
//!   standard input, over Slurm's own connection to the step). Both sides prove they hold
//!   the key with Python's mutual HMAC-SHA256 challenge-response before anything else is
//!   read or sent, so only that worker, started by this pool, gets work, and a worker only
//!   takes work from the pool that started it.
//! - **What a peer without the key can do.** Connect to the port and be refused: before
//!   authentication every message read is at most 256 bytes, nothing larger is allocated,
//!   and the handshake has a timeout, so it can delay one worker's start by that long and
//!   no more. It cannot run tasks, submit them, or read results.
//! - **What someone on the network path can do.** Read everything after the handshake:
//!   traffic is authenticated, not encrypted (as Python's connections are), so arguments and
//!   results are visible to anyone who can capture the packets. Someone who can also change
//!   packets in flight can change tasks after the handshake, including which function of
//!   the executable a worker calls: on a network you do not trust, run the pool over a
//!   tunnel (SSH, WireGuard) or within the cluster's private network. Encryption (TLS) is not
//!   part of gpuproc.
//! - The build check is for correctness (a worker from another build would call the wrong
//!   code), not a defence: anyone holding the key could claim any build.
//!
//! ## Python's names
//!
//! | Python | gpuproc |
//! |---|---|
//! | `connection.Listener(address, authkey=...)`, `backlog` | [`connection::Listener::bind`], [`connection::Listener::builder`] ([`backlog`](connection::ListenerBuilder::backlog), [`handshake_timeout`](connection::ListenerBuilder::handshake_timeout)) |
//! | addresses: `('host', port)`, a path, `'\0name'` | [`connection::Address::tcp`], [`connection::Address::unix`], [`connection::Address::abstract_name`] (a TCP address needs an authkey) |
//! | `Listener.accept()`, `Listener.address`, `Listener.close()` | [`accept`](connection::Listener::accept) (and [`accept_timeout`](connection::Listener::accept_timeout)), [`address`](connection::Listener::address), [`close`](connection::Listener::close); no `last_accepted` |
//! | `connection.Client(address, authkey=...)` | [`connection::Client::connect`], [`connect_timeout`](connection::Client::connect_timeout), [`connection::Client::builder`] |
//! | `authkey`, `current_process().authkey` | the key given to each listener and client; there is no process-wide key, so a TCP listener or client without one is refused ([`connection::ConnectionError::AuthkeyRequired`]) |
//! | `answer_challenge`, `deliver_challenge` | none as functions: `accept` and `connect` run both, each side challenging the other (HMAC-SHA256; Python 3.11's HMAC-MD5 accepted unless [`allow_md5(false)`](connection::ListenerBuilder::allow_md5)) |
//! | `AuthenticationError` | [`connection::ConnectionError::Authentication`] |
//! | `Connection.send`, `recv`, `send_bytes`, `recv_bytes`, `recv_bytes_into`, `poll`, `close` | the same names on [`connection::Connection`], with `_timeout` forms; values are postcard, not pickle, so only bytes interoperate with Python |
//! | `connection.wait` | [`connection::wait`] |
//! | `Manager()`, `SyncManager` | [`managers::Manager::start`]: a manager process on this machine (an abstract Unix socket with a random key) serving dicts, lists, namespaces and values to processes started from this one |
//! | `BaseManager(address=('host', port), authkey=...)`, `get_server().serve_forever()`, `connect()`, `register` | not yet: managers serve this machine only, and there is no registry of custom types |
//! | starting the remote process yourself (`ssh host python worker.py`) | [`Launcher::command`], [`Launcher::slurm`] with [`Process::launcher`] or [`PoolBuilder::launcher`] |
//!
//! # GPUs
//!
//! [`gpu`] reads NVML (never CUDA, so no context is created and it is safe before fork) from
//! any process: [`gpu::snapshot`] for every device and its processes, [`gpu::usage_of`] for
//! one process, [`gpu::assigned`] for the GPUs this process was given.
//!
//! Giving each worker its own GPU is one builder call; the GPUs are leased, so other pools
//! and `gpuproc pick` on the same machine cannot hand them out again:
//!
//! ```no_run
//! fn which_gpu(_: u32) -> String {
//!     std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_default()
//! }
//! # fn main() -> Result<(), gpuproc::PoolError> {
//! let pool = gpuproc::Pool::builder().processes(4).gpus_per_worker(1).build()?;
//! println!("{:?}", pool.map(which_gpu, 0..4u32)?); // four GPU-... UUIDs
//! # Ok(())
//! # }
//! ```
//!
//! [`Process::with_gpus`] does the same for one process.
//!
//! # Python's `multiprocessing`, name by name
//!
//! Every public name of Python's `multiprocessing` (its `__all__`) and
//! `multiprocessing.shared_memory`, with the submodule names Python programs import most,
//! and what to use in gpuproc. Where Rust has a better idiom, it is offered under a name a
//! Python user finds (search the docs for the Python name: most items carry it as an
//! alias).
//!
//! | Python | gpuproc |
//! |---|---|
//! | `Process` | [`Process`] (`sentinel` is [`Process::sentinel`], `close` is [`Process::close`]; on another machine through [`Process::launcher`]) |
//! | `current_process()` | [`current_process`] (a [`ProcessInfo`]: `name`, `pid`, `daemon`, [`is_alive`](ProcessInfo::is_alive), [`exitcode`](ProcessInfo::exitcode)) |
//! | `parent_process()` | [`parent_process`] |
//! | `active_children()` | [`active_children`] |
//! | `cpu_count()` | [`cpu_count`] ([`process_cpu_count`] for Python 3.13's `os.process_cpu_count()`) |
//! | `Pipe` | [`Pipe::new`], [`Pipe::simplex`] for `duplex=False`; ends are [`Connection`] |
//! | `Queue`, `JoinableQueue`, `SimpleQueue` | [`Queue`], [`JoinableQueue`], [`SimpleQueue`] ([`Queue::shutdown`] for Python 3.13's `shutdown`) |
//! | `Lock`, `RLock`, `Semaphore`, `BoundedSemaphore`, `Event`, `Condition`, `Barrier` | [`Lock`], [`RLock`], [`Semaphore`], [`BoundedSemaphore`], [`Event`], [`Condition`], [`Barrier`] (module [`sync`]) |
//! | `Value`, `Array` | [`SharedValue::new`], [`SharedArray::from_slice`] (each with its lock, [`SharedValue::get_lock`]) |
//! | `RawValue`, `RawArray` | [`SharedValue::new_unlocked`], [`SharedArray::from_slice_unlocked`] |
//! | `Pool` | [`Pool::new`], [`Pool::builder`] (`initializer`, `maxtasksperchild` and more; workers on other machines through [`Launcher`]); results are [`AsyncResult`] and [`Imap`]; `map_async`, `starmap_async` are [`Pool::map_async`], [`Pool::starmap_async`]; `callback`, `error_callback` are [`pool::Callbacks`] given to [`Pool::apply_async_with`], [`Pool::map_async_with`] |
//! | `Manager` | [`managers::Manager`]: a manager process serving shared dicts, lists, namespaces, values, queues, locks and events through typed proxies ([`managers::ManagedDict`], [`managers::ManagedList`], [`managers::ManagedNamespace`], [`managers::ManagedValue`], [`managers::ManagedQueue`], [`managers::ManagedLock`], [`managers::ManagedEvent`]); a lock whose holder died is released (Python keeps it locked) |
//! | `get_context` | [`get_context`] (a [`Context`]) |
//! | `get_start_method`, `set_start_method` | [`get_start_method`], [`set_start_method`] ([`Process::with_start_method`] and [`PoolBuilder::start_method`] for one process or pool) |
//! | `get_all_start_methods` | [`StartMethod::all`] |
//! | `ProcessError` | each area's error: [`ProcessError`], [`PoolError`], [`ChannelError`], [`SyncError`], [`ShmError`], [`connection::ConnectionError`] |
//! | `BufferTooShort` | [`ChannelError::BufferTooShort`] (from [`Connection::recv_bytes_into`]) and [`connection::ConnectionError::BufferTooShort`] (from [`connection::Connection::recv_bytes_into`]) |
//! | `TimeoutError` | each error's `Timeout` case (`is_timeout()`), e.g. [`ChannelError::Timeout`] |
//! | `AuthenticationError` | [`connection::ConnectionError::Authentication`] |
//! | `freeze_support` | none: it is for frozen Windows executables; [`init`] is the one line of set-up gpuproc needs |
//! | `set_executable` | none: a child always runs this same executable (`/proc/self/exe`), which is how it finds the function to call |
//! | `set_forkserver_preload` | none: the fork server is a copy of the whole program, with everything it links already loaded |
//! | `allow_connection_pickling`, `reducer` | none: values are serde data, and handles (connections, queues, locks, shared memory) always cross inside gpuproc's own messages, as descriptors ([`serialize_fd`], [`deserialize_fd`] for your own types) |
//! | `get_logger`, `log_to_stderr` | none: gpuproc reports through its errors, not a logger |
//! | `connection.wait` | [`connection::wait`] (and [`connection::wait_indices`]) over anything [`connection::Waitable`]: both kinds of connection, queues, [`Sentinel`]s, descriptors |
//! | `connection.Listener`, `connection.Client`, `connection.Connection` | [`connection::Listener`], [`connection::Client`], [`connection::Connection`] |
//! | `connection.answer_challenge`, `connection.deliver_challenge` | none as functions: [`connection::Listener`] and [`connection::Client`] run them |
//! | `pool.ThreadPool`, `dummy` | [`pool::ThreadPool`]: the [`Pool`] API on threads, with closures (its iterators are [`pool::ThreadImap`]) |
//! | `pool.AsyncResult`, `pool.MapResult`, `pool.TimeoutError` | [`AsyncResult`] (`AsyncResult<Vec<R>>` for `map_async`), [`PoolError`]'s timeout |
//! | `managers` (`BaseManager`, `SyncManager`, `SharedMemoryManager`, `Namespace`) | [`managers`]: `SyncManager` is [`managers::Manager`], `DictProxy` and `ListProxy` are [`managers::ManagedDict`] and [`managers::ManagedList`]; `Namespace` is [`managers::ManagedNamespace`]; `BaseManager(address, authkey)` is [`managers::Manager::builder`] (TCP with [`managers::ManagerBuilder::address`]), its `connect()` is [`managers::Manager::connect`]; `BaseManager.register` is [`managers::ManagerBuilder::register`] with a [`managers::Served`] type (proxies are [`managers::ManagedObject`]), and a `callable=` shared with remote clients is [`managers::Manager::publish`] and [`managers::Manager::lookup`]; `SharedMemoryManager` is [`managers::SharedMemoryManager`] |
//! | `resource_tracker` | automatic: a tracker process per program unlinks the named [`SharedMemory`] blocks (and [`shm::ShareableList`]s) of a process that was killed, with a warning naming them (see [`SharedMemory`], "Resource tracker") |
//! | `sharedctypes.synchronized`, `sharedctypes.copy` | none: [`SharedValue`] and [`SharedArray`] carry their lock already; copy out with [`SharedArray::to_vec`] |
//! | `util.Finalize`, `util.register_after_fork` | none: Rust's `Drop` releases resources; nothing runs after a fork but the child's target |
//! | `shared_memory.SharedMemory` | [`SharedMemory`] ([`SharedMemory::create_named`], [`SharedMemory::attach`], [`SharedMemory::create`] for an unnamed block) |
//! | `shared_memory.ShareableList` | [`shm::ShareableList`] of [`shm::Item`]s (each slot's type fixed at creation; gpuproc's own layout) |
//!
//! # Platform support
//!
//! Linux only (pidfds need Linux 5.3 or later).
//!
//! # Dependencies and what is written by hand
//!
//! System calls go through `rustix` (`fork` and `_exit` through `libc`, so that the C
//! library's fork handlers run), serialisation through `serde` (in postcard's format, with
//! `postcard` itself for its error type and as the reference the tests compare against),
//! NVML through
//! `nvml-wrapper`, the authentication of [`connection`] through RustCrypto's `hmac`, `sha2`,
//! `sha3` and `md-5` with `getrandom`, the layout checks behind [`pod`] through `bytemuck`.
//! Written here because no maintained crate does them: framing with file
//! descriptors over `SCM_RIGHTS` (the internal `ipc` module), the fork server, sending a
//! monomorphised `fn` between processes of the same executable, the serializer (postcard's
//! takes a `Vec<f32>` one element at a time, as serde hands it over; this one recognises
//! vectors of numbers by type and copies them whole, see the internal `codec` module, with
//! `typeid` for the type identities), and the pool's fixed-width
//! encoding of plain data (a serde format whose shape is checked item by item, so that a
//! chunk of numbers travels without a length per item; `bincode`'s fixed-int mode encodes
//! at a fixed width but cannot tell when every item of a chunk has the same layout).

pub mod channel;
mod codec;
pub mod connection;
mod context;
mod errors;
pub mod gpu;

mod ipc;
pub mod managers;
pub mod pod;
pub mod pool;
mod process;
pub mod shm;
pub mod sync;
mod sys;
pub mod time;

pub use channel::{
    Bytes, ChannelError, Connection, JoinableQueue, Pipe, Queue, SendError, SimpleQueue,
};
pub use context::{get_context, Context};
pub use ipc::{deserialize_fd, serialize_fd};
pub use pool::{
    AsyncResult, Imap, Launcher, Pool, PoolBuilder, PoolError, Slurm, WorkerGpu, WorkerGpuUsage,
};
pub use process::{
    active_children, cpu_count, current_process, get_start_method, parent_process,
    process_cpu_count, set_start_method, ExitStatus, Process, ProcessError, ProcessInfo, Sentinel,
    StartMethod, LOST_EXITCODE,
};
pub use shm::{SharedArray, SharedMemory, SharedSlice, SharedValue, ShmError};
pub use sync::{Barrier, BoundedSemaphore, Condition, Event, Lock, RLock, Semaphore, SyncError};
pub use sys::signal_name;

/// The one line of set-up at the top of `main`: Python's `if __name__ == '__main__':`.
///
/// In the program itself it returns at once. In a child process (or the fork server) it does
/// the child's work and exits without returning, so nothing after it runs there, and nothing
/// should come before it.
///
/// ```no_run
/// # #![allow(clippy::needless_doctest_main)]
/// fn main() {
///     gpuproc::init();
///     // ... the program ...
/// }
/// ```
pub fn init() {
    process::init();
    pool::serve_if_remote_worker();
}

/// Makes gpuproc work in a test binary: write it once, at the top level of the test crate.
///
/// libtest owns `main` there, so this registers [`init`] to run before it (an `.init_array`
/// entry, Linux's constructor mechanism). The test binary then re-runs itself as the child.
///
/// ```ignore
/// gpuproc::enable_test_support!();
///
/// #[test]
/// fn squares() {
///     let mut p = gpuproc::Process::new(|x: u64| x * x, 7);
///     p.start().unwrap();
///     assert_eq!(p.join().unwrap(), 49);
/// }
/// ```
#[macro_export]
macro_rules! enable_test_support {
    () => {
        #[used]
        #[link_section = ".init_array"]
        static __GPUPROC_TEST_SUPPORT: extern "C" fn() = {
            extern "C" fn __gpuproc_test_support_init() {
                $crate::init();
            }
            __gpuproc_test_support_init
        };
    };
}

/// Runs [`init`] before `main`, from a constructor: write it once, at the top level of a
/// program whose `main` starts threads before its first line, as `#[tokio::main]` and
/// other async runtimes' attributes do (see the crate docs, "Async runtimes").
///
/// It is the same constructor as [`enable_test_support!`]; calling [`init`] again in `main`
/// does no harm.
///
/// ```ignore
/// gpuproc::init_before_main!();
///
/// #[tokio::main]
/// async fn main() { /* ... */ }
/// ```
#[macro_export]
macro_rules! init_before_main {
    () => {
        $crate::enable_test_support!();
    };
}

#[cfg(test)]
enable_test_support!();
