//! `parse_size`: human sizes for command-line arguments ("4096", "4K", "64KiB", "1M", "1G").
//!
//! Invariant: suffixes are binary (K = KiB = 1024), case-insensitive; overflow is an error.

/// A size argument that is not a size; the message says what is accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadSize(pub String);

/// Parses a size in bytes with an optional binary suffix: K/KiB/KB, M/MiB/MB, G/GiB/GB,
/// T/TiB/TB (all powers of 1024), or B.
pub fn parse_size(s: &str) -> Result<u64, BadSize> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    if num.is_empty() {
        return Err(BadSize(format!("invalid size {s:?}: expected a number with an optional suffix such as 4K, 64KiB, 1M, 1G")));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| BadSize(format!("invalid size {s:?}: number too large")))?;
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" | "kb" => 10,
        "m" | "mib" | "mb" => 20,
        "g" | "gib" | "gb" => 30,
        "t" | "tib" | "tb" => 40,
        other => {
            return Err(BadSize(format!(
                "invalid size {s:?}: unknown suffix {other:?} (use K, M, G or T, e.g. 64K)"
            )))
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| BadSize(format!("invalid size {s:?}: too large")))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert_eq!(parse_size(" 8 KiB "), Ok(8192));
        assert_eq!(parse_size("512B"), Ok(512));
    }

    #[test]
    fn bad_sizes() {
        for bad in [
            "",
            "K",
            "1.5M",
            "4X",
            "-1",
            "99999999999999999999",
            "16777216T",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert!(parse_size("4X").unwrap_err().0.contains("suffix"));
    }
}
