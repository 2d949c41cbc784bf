//! Sizes as Python callers write them (`min_free="10GiB"`), read as `gpuproc pick
//! --min-free` reads them.

/// Parses a byte count: a number (decimals allowed) and an optional unit. `K`, `M`, `G` and
/// `T`, alone or with `iB`, are powers of 1024; with `B`, powers of 1000 (as the `gpuproc`
/// command's `--min-free`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || format!("expected a size such as 10GiB, 500MiB or 1073741824, got {s:?}");
    let text = s.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().map_err(|_| bad())?;
    let multiplier: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "kb" => 1e3,
        "m" | "mib" => 1024.0 * 1024.0,
        "mb" => 1e6,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "gb" => 1e9,
        "t" | "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        "tb" => 1e12,
        _ => return Err(bad()),
    };
    let bytes = (value * multiplier).round();
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(bad());
    }
    // In range, checked above: the conversion is exact up to f64's precision.
    Ok(bytes as u64)
}
