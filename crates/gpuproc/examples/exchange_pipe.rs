//! Python's "Exchanging objects between processes: Pipes" example.
//!
//! ```python
//! from multiprocessing import Process, Pipe
//!
//! def f(conn):
//!     conn.send([42, None, 'hello'])
//!     conn.close()
//!
//! if __name__ == '__main__':
//!     parent_conn, child_conn = Pipe()
//!     p = Process(target=f, args=(child_conn,))
//!     p.start()
//!     print(parent_conn.recv())   # prints "[42, None, 'hello']"
//!     p.join()
//! ```
//!
//! ```text
//! $ cargo run --example exchange_pipe
//! [42, None, 'hello']
//! ```

use std::fmt;

use gpuproc::channel::{Connection, Pipe};
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

fn f(conn: Connection) {
    conn.send(&vec![Obj::Int(42), Obj::None, Obj::Str("hello".into())])
        .expect("send");
    conn.close();
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    gpuproc::init(); // Python's `if __name__ == '__main__':`

    let (parent_conn, child_conn) = Pipe::new()?;
    let mut p = Process::new(f, child_conn);
    p.start()?;
    println!("{:?}", parent_conn.recv::<Vec<Obj>>()?); // prints "[42, None, 'hello']"
    p.join()?;
    Ok(())
}
