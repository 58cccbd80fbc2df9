/// Sizes on the command line: a number with an optional `K`, `M`, `G`, `T` or `P` suffix in
/// powers of 1024 (MARS and LVM habit), optionally followed by `i`/`iB`/`B` (`4GiB`, `4G`, `4GB`
/// all mean 4·1024³).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("size {0:?} is not a number with an optional K/M/G/T/P suffix")]
    Syntax(String),
    #[error("size {0:?} does not fit into 64 bits")]
    Overflow(String),
}

pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits_end);
    if num.is_empty() {
        return Err(SizeError::Syntax(s.to_owned()));
    }
    let n: u64 = num.parse().map_err(|_| SizeError::Overflow(s.to_owned()))?;
    let suffix = suffix.trim();
    let unit = suffix
        .strip_suffix("iB")
        .or_else(|| suffix.strip_suffix('B'))
        .or_else(|| suffix.strip_suffix('i'))
        .unwrap_or(suffix);
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" if suffix.is_empty() || suffix == "B" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        "P" => 50,
        _ => return Err(SizeError::Syntax(s.to_owned())),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| SizeError::Overflow(s.to_owned()))
}

/// Human-readable size with a binary unit, e.g. `1.50 GiB`.
pub fn format_size(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("2M"), Ok(2 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1GB"), Ok(1 << 30));
        assert_eq!(parse_size("3T"), Ok(3 << 40));
        assert!(matches!(parse_size(""), Err(SizeError::Syntax(_))));
        assert!(matches!(parse_size("G"), Err(SizeError::Syntax(_))));
        assert!(matches!(parse_size("1X"), Err(SizeError::Syntax(_))));
        assert!(matches!(parse_size("-1"), Err(SizeError::Syntax(_))));
        assert!(matches!(
            parse_size("99999999999P"),
            Err(SizeError::Overflow(_))
        ));
        assert_eq!(format_size(1536 << 20), "1.50 GiB");
        assert_eq!(format_size(10), "10 B");
    }
}
