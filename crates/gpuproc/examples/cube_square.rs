//! Two processes, one printing a square and one a cube: the first example of the Python
//! article "Multiprocessing in Python", line for line.
//!
//! ```text
//! $ cargo run --example cube_square
//! Square: 100
//! Cube: 1000
//! Done!
//! ```

use gpuproc::Process;

fn print_cube(num: i64) {
    println!("Cube: {}", num * num * num);
}

fn print_square(num: i64) {
    println!("Square: {}", num * num);
}

fn main() -> Result<(), gpuproc::ProcessError> {
    gpuproc::init(); // Python's `if __name__ == "__main__":`

    let mut p1 = Process::new(print_square, 10);
    let mut p2 = Process::new(print_cube, 10);

    p1.start()?;
    // Python's article prints the square first; joining p1 before starting p2 keeps that
    // order on every machine.
    p1.join()?;
    p2.start()?;
    p2.join()?;

    println!("Done!");
    Ok(())
}
