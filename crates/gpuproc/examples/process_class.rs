//! The Python documentation's "The Process class" examples, in Rust.
//!
//! ```text
//! $ cargo run --example process_class
//! hello bob
//! main line
//! module name: process_class
//! parent process: 4100
//! process id: 4242
//! function f
//! module name: process_class
//! parent process: 4242
//! process id: 4250
//! hello bob
//! ```

use gpuproc::Process;

/// `def f(name): print('hello', name)`
fn hello(name: String) {
    println!("hello {name}");
}

/// `def info(title)`: prints the title, the module name, the parent's pid and our pid.
///
/// The parent is the process that started us (`gpuproc::parent_process()`); with the fork
/// server, the operating system's parent (`os.getppid()`) is the server instead, as in Python.
fn info(title: &str) {
    println!("{title}");
    println!("module name: {}", module_path!());
    let parent =
        gpuproc::parent_process().map_or_else(std::os::unix::process::parent_id, |p| p.pid);
    println!("parent process: {parent}");
    println!("process id: {}", std::process::id());
}

fn f(name: String) {
    info("function f");
    println!("hello {name}");
}

fn main() -> Result<(), gpuproc::ProcessError> {
    gpuproc::init();

    // The first example: start a process and wait for it.
    let mut p = Process::new(hello, "bob".to_string());
    p.start()?;
    p.join()?;

    // The second: show the individual process ids involved.
    info("main line");
    let mut p = Process::new(f, "bob".to_string());
    p.start()?;
    p.join()?;
    Ok(())
}
