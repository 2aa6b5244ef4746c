//! Sizes as users type them (8G, 512MiB, 1.5g) and as we print them (1.5 GiB).

/// Parses sizes like `8G`, `512M`, `1.5GiB`, `4096B`, `0`. A number without a unit is refused
/// (0 aside): `--ram-cache 4` meant 4G far more often than 4 bytes.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num.parse().map_err(|_| format!("`{s}`: expected a size like 8G or 512M"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" if v == 0.0 => 1u64,
        "" => return Err(format!("`{s}` has no unit: write {num}G, {num}M or {num}K ({num}B for bytes)")),
        "b" => 1u64,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        u => return Err(format!("`{s}`: unknown unit `{u}`")),
    };
    Ok((v * mult as f64) as u64)
}

/// A byte count in binary units with one decimal (`1.5 GiB`; plain bytes below 1 KiB).
pub fn fmt_bytes(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 { format!("{b} B") } else { format!("{v:.1} {}", U[i]) }
}
