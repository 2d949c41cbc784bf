//! Process ids seen from inside and outside: the second example of the Python article
//! "Multiprocessing in Python". As there, the workers' lines and the parent's can come in
//! either order.
//!
//! ```text
//! $ cargo run --example process_ids
//! ID of main process: 28628
//! ID of process p1: 29305
//! ID of process p2: 29306
//! ID of process running worker1: 29305
//! ID of process running worker2: 29306
//! Both processes finished execution!
//! Process p1 is alive: false
//! Process p2 is alive: false
//! ```

use gpuproc::Process;

fn worker1(_: ()) {
    println!("ID of process running worker1: {}", std::process::id());
}

fn worker2(_: ()) {
    println!("ID of process running worker2: {}", std::process::id());
}

fn main() -> Result<(), gpuproc::ProcessError> {
    gpuproc::init();

    println!("ID of main process: {}", std::process::id());

    let mut p1 = Process::new(worker1, ());
    let mut p2 = Process::new(worker2, ());

    p1.start()?;
    p2.start()?;

    let pid = |p: &Process<(), ()>| p.pid().map_or("none".to_string(), |p| p.to_string());
    println!("ID of process p1: {}", pid(&p1));
    println!("ID of process p2: {}", pid(&p2));

    p1.join()?;
    p2.join()?;

    println!("Both processes finished execution!");
    println!("Process p1 is alive: {}", p1.is_alive());
    println!("Process p2 is alive: {}", p2.is_alive());
    Ok(())
}
