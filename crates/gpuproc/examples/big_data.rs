//! Big data that is already in shared memory: the workers attach it once, and the tasks carry
//! only ids, so nothing but a few bytes per task crosses the workers' sockets. All safe code.
//!
//! Two ways to hold the data:
//! - a named [`SharedMemory`] block, which any process can attach by name (and write: read
//!   it through a typed [`view`](SharedMemory::view), element by element or in bulk);
//! - a [`SharedSlice`], sealed once filled, which every worker reads as a plain `&[f32]`.
//!
//! Both reach the workers through [`PoolBuilder::initializer`](gpuproc::PoolBuilder), which
//! runs once in each worker (replacements included) and keeps them in a `static OnceLock`.
//!
//! ```text
//! $ cargo run --release --example big_data
//! 64 rows of 16384 f32 (4 MiB), 2 workers
//! named block: row 0 sums to 8192, row 63 to 1040384, all 64 rows 33554432
//! sealed slice: row 0 sums to 8192, row 63 to 1040384, all 64 rows 33554432
//! both agree with the parent: true
//! ```

use std::sync::OnceLock;

use gpuproc::shm::SharedMemory;
use gpuproc::{Pool, SharedSlice};

const ROWS: usize = 64;
const COLS: usize = 16_384;

/// What each worker keeps: the named block, attached, and the sealed slice.
static BLOCK: OnceLock<SharedMemory> = OnceLock::new();
static SLICE: OnceLock<SharedSlice<f32>> = OnceLock::new();

/// Runs once in each worker: attaches the block by name, keeps the slice it was given.
fn attach((name, slice): (String, SharedSlice<f32>)) {
    let block = SharedMemory::attach(&name).expect("the parent created the block");
    let _ = BLOCK.set(block);
    let _ = SLICE.set(slice);
}

/// Task: the sum of row `row` of the named block.
fn row_sum_named(row: usize) -> Result<f64, String> {
    let block = BLOCK.get().ok_or("the initializer did not run")?;
    let data = block.view::<f32>().map_err(|e| e.to_string())?;
    let row = data
        .range(row * COLS..(row + 1) * COLS)
        .ok_or(format!("there is no row {row}"))?;
    Ok(row.iter().map(f64::from).sum())
}

/// Task: the sum of row `row` of the sealed slice, read in place as a `&[f32]`.
fn row_sum_sealed(row: usize) -> Result<f64, String> {
    let data = SLICE.get().ok_or("the initializer did not run")?;
    let row = data
        .get(row * COLS..(row + 1) * COLS)
        .ok_or(format!("there is no row {row}"))?;
    Ok(row.iter().copied().map(f64::from).sum())
}

/// Element `c` of row `r`: row `r` sums to `r * COLS + COLS / 2`.
fn value(r: usize, c: usize) -> f32 {
    (r + c % 2) as f32
}

fn report(what: &str, sums: &[f64]) {
    println!(
        "{what}: row 0 sums to {}, row {} to {}, all {ROWS} rows {}",
        sums[0],
        ROWS - 1,
        sums[ROWS - 1],
        sums.iter().sum::<f64>()
    );
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    gpuproc::init();

    // The named block, filled by the parent in one bulk copy per row.
    let block = SharedMemory::create(ROWS * COLS * std::mem::size_of::<f32>())?;
    let data = block.view::<f32>()?;
    for r in 0..ROWS {
        let row: Vec<f32> = (0..COLS).map(|c| value(r, c)).collect();
        data.range(r * COLS..(r + 1) * COLS)
            .ok_or("the block holds every row")?
            .copy_from_slice(&row);
    }

    // The sealed slice, filled in place, then read-only for everyone.
    let slice = SharedSlice::<f32>::build(ROWS * COLS, |buf| {
        for (i, x) in buf.iter_mut().enumerate() {
            *x = value(i / COLS, i % COLS);
        }
    })?;

    let pool = Pool::builder()
        .processes(2)
        .initializer(attach, (block.name().to_string(), slice.clone()))
        .build()?;
    println!(
        "{ROWS} rows of {COLS} f32 ({} MiB), {} workers",
        (ROWS * COLS * 4) >> 20,
        pool.processes()
    );

    let named: Vec<f64> = pool
        .map(row_sum_named, 0..ROWS)?
        .into_iter()
        .collect::<Result<_, _>>()?;
    report("named block", &named);
    let sealed: Vec<f64> = pool
        .map(row_sum_sealed, 0..ROWS)?
        .into_iter()
        .collect::<Result<_, _>>()?;
    report("sealed slice", &sealed);

    let expected: Vec<f64> = (0..ROWS).map(|r| (r * COLS + COLS / 2) as f64).collect();
    println!(
        "both agree with the parent: {}",
        named == expected && sealed == expected
    );
    pool.close();
    pool.join()?;
    Ok(()) // dropping `block`, its creator, unlinks the name
}
