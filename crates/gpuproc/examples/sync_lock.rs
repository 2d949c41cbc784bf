//! Python's "Synchronization between processes": ten processes print under one lock, so
//! their lines never interleave.
//!
//! ```python
//! from multiprocessing import Process, Lock
//!
//! def f(l, i):
//!     l.acquire()
//!     try:
//!         print('hello world', i)
//!     finally:
//!         l.release()
//!
//! if __name__ == '__main__':
//!     lock = Lock()
//!     for num in range(10):
//!         Process(target=f, args=(lock, num)).start()
//! ```
//!
//! ```text
//! $ cargo run --example sync_lock
//! hello world 0
//! hello world 1
//! ...            (in whatever order the processes get the lock)
//! ```

use gpuproc::sync::Lock;
use gpuproc::Process;

fn f((l, i): (Lock, u32)) {
    // The guard is Python's try/finally: the lock is released when it goes out of scope.
    let _guard = l.lock().expect("locking");
    println!("hello world {i}");
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    gpuproc::init();

    let lock = Lock::new()?;
    let mut procs = Vec::new();
    for num in 0..10 {
        let mut p = Process::new(f, (lock.clone(), num));
        p.start()?;
        procs.push(p);
    }
    // Python joins non-daemonic children at exit; in Rust we say so.
    for mut p in procs {
        p.join()?;
    }
    Ok(())
}
