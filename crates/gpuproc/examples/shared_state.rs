//! Python's "Sharing state between processes": a `Value` and an `Array` in shared memory,
//! changed by a child process and read back by the parent.
//!
//! ```python
//! from multiprocessing import Process, Value, Array
//!
//! def f(n, a):
//!     n.value = 3.1415927
//!     for i in range(len(a)):
//!         a[i] = -a[i]
//!
//! if __name__ == '__main__':
//!     num = Value('d', 0.0)
//!     arr = Array('i', range(10))
//!
//!     p = Process(target=f, args=(num, arr))
//!     p.start()
//!     p.join()
//!
//!     print(num.value)
//!     print(arr[:])
//! ```
//!
//! ```text
//! $ cargo run --example shared_state
//! 3.1415927
//! [0, -1, -2, -3, -4, -5, -6, -7, -8, -9]
//! ```

use gpuproc::shm::{SharedArray, SharedValue};
use gpuproc::Process;

// The literal is Python's, not an approximation of pi.
#[allow(clippy::approx_constant)]
fn f((n, a): (SharedValue<f64>, SharedArray<i32>)) {
    n.set(3.1415927);
    for i in 0..a.len() {
        a.set(i, -a.get(i).expect("in bounds"));
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    gpuproc::init();

    let num = SharedValue::new(0.0f64)?; // Value('d', 0.0)
    let arr = SharedArray::from_slice(&(0..10).collect::<Vec<i32>>())?; // Array('i', range(10))

    let mut p = Process::new(f, (num.clone(), arr.clone()));
    p.start()?;
    p.join()?;

    println!("{}", num.get());
    println!("{:?}", arr.to_vec());
    Ok(())
}
