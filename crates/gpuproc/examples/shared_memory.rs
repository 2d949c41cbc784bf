//! Python's `multiprocessing.shared_memory` example: a named block created by one process,
//! attached by name from another, changed there and read back.
//!
//! ```python
//! from multiprocessing import shared_memory
//! shm_a = shared_memory.SharedMemory(create=True, size=10)
//! shm_a.buf[:4] = bytearray([22, 33, 44, 55])
//! shm_a.buf[4] = 100
//! shm_b = shared_memory.SharedMemory(shm_a.name)     # here: in another process
//! print(list(shm_b.buf[:5]))
//! shm_b.buf[:5] = b'howdy'
//! shm_b.close()
//! print(bytes(shm_a.buf[:5]).decode())
//! shm_a.close()
//! shm_a.unlink()
//! ```
//!
//! ```text
//! $ cargo run --example shared_memory
//! [22, 33, 44, 55, 100]
//! howdy
//! ```

use gpuproc::shm::SharedMemory;
use gpuproc::Process;

/// Runs in the child: attaches the block by name alone, as an unrelated process could.
fn modify(name: String) -> Result<(), String> {
    let mut shm_b = SharedMemory::attach(&name).map_err(|e| e.to_string())?;
    let mut first = [0u8; 5];
    shm_b.read_at(0, &mut first);
    println!("{:?}", first);
    shm_b.write_at(0, b"howdy");
    shm_b.close();
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    gpuproc::init();

    let mut shm_a = SharedMemory::create(10)?;
    shm_a.write_at(0, &[22, 33, 44, 55]);
    shm_a.buf()[4].store(100, std::sync::atomic::Ordering::Relaxed);

    let mut p = Process::new(modify, shm_a.name().to_string());
    p.start()?;
    p.join()??;

    let mut word = [0u8; 5];
    shm_a.read_at(0, &mut word);
    println!("{}", String::from_utf8_lossy(&word));

    shm_a.close();
    shm_a.unlink()?; // the creator would also unlink on drop; Python says it explicitly
    Ok(())
}
