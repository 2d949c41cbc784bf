//! Python's "Exchanging objects between processes: Queues" example.
//!
//! ```python
//! from multiprocessing import Process, Queue
//!
//! def f(q):
//!     q.put([42, None, 'hello'])
//!
//! if __name__ == '__main__':
//!     q = Queue()
//!     p = Process(target=f, args=(q,))
//!     p.start()
//!     print(q.get())    # prints "[42, None, 'hello']"
//!     p.join()
//! ```
//!
//! ```text
//! $ cargo run --example exchange_queue
//! [42, None, 'hello']
//! ```

use std::fmt;

use gpuproc::channel::Queue;
use gpuproc::Process;
use serde::{Deserialize, Serialize};

/// A Python value of the kinds the example uses, printed the way Python prints it.
#[derive(Serialize, Deserialize)]
enum Obj {
    Int(i64),
    None,
    Str(String),
}

impl fmt::Debug for Obj {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Obj::Int(i) => write!(f, "{i}"),
            Obj::None => f.write_str("None"),
            Obj::Str(s) => write!(f, "'{s}'"),
        }
    }
}

fn f(q: Queue<Vec<Obj>>) {
    q.put(vec![Obj::Int(42), Obj::None, Obj::Str("hello".into())])
        .expect("put");
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    gpuproc::init(); // Python's `if __name__ == '__main__':`

    let q = Queue::new()?;
    let mut p = Process::new(f, q.clone());
    p.start()?;
    println!("{:?}", q.get()?); // prints "[42, None, 'hello']"
    p.join()?;
    Ok(())
}
