//! Sizes and rates: one grammar for every flag and argument that takes one.
//!
//! ```text
//! SIZE := NUMBER [ ' ' ] [ UNIT ]        NUMBER := DIGITS [ '.' DIGITS ]
//! RATE := SIZE [ '/s' ]                  UNIT   := B | K | M | G | T, each optionally
//!                                                   followed by B or iB
//! ```
//!
//! Case does not matter and every unit is binary: `64K`, `64k`, `64KB`,
//! `64KiB` and `64kib` are all 65536 bytes. A decimal must come out as a whole
//! number of bytes (`1.5G` is fine, `1.3K` is not). The optional space lets a
//! value the CLI prints (`24.0 MiB/s`) be given back to it as it is.

/// What the grammar accepts, for `--help` and error messages.
pub(crate) const SIZE_GRAMMAR: &str =
    "a number with an optional binary unit K, M, G or T (also KB/KiB, any case; 1K = 1024), e.g. 4096, 64K, 1.5G, 10mb";
pub(crate) const RATE_GRAMMAR: &str =
    "bytes per second: a number with an optional binary unit K, M, G or T (also KB/KiB, any case; 1K = 1024) and an optional /s, e.g. 0, 500K, 100M/s, 1.5GiB/s";

/// Parses a size (no `/s`).
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    parse(s, false).map_err(|why| format!("invalid size {s:?}: {why}; expected {SIZE_GRAMMAR}"))
}

/// A size or "none" (no limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limit(pub(crate) Option<u64>);

/// Parses a limit: a size, or `none`.
pub(crate) fn parse_limit(s: &str) -> Result<Limit, String> {
    if s.trim().eq_ignore_ascii_case("none") {
        return Ok(Limit(None));
    }
    parse_size(s).map(|n| Limit(Some(n))).map_err(|e| format!("{e}, or none"))
}

/// Parses a rate in bytes per second (`/s` allowed).
pub(crate) fn parse_rate(s: &str) -> Result<u64, String> {
    parse(s, true).map_err(|why| format!("invalid rate {s:?}: {why}; expected {RATE_GRAMMAR}"))
}

fn parse(s: &str, rate: bool) -> Result<u64, &'static str> {
    let mut t = s.trim();
    if rate {
        if let Some(x) = t.strip_suffix("/s").or_else(|| t.strip_suffix("/S")) {
            // What is left is a size, trimmed as parse_size trims one ("0B /s").
            t = x.trim_end();
        }
    }
    let digits_end = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    let unit = unit.strip_prefix(' ').unwrap_or(unit);
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ if !rate && unit.contains('/') => return Err("a size takes no /s"),
        _ => return Err("unknown unit"),
    };
    let (int, frac) = match num.split_once('.') {
        Some((i, f)) => (i, f),
        None => (num, ""),
    };
    if int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err("no number");
    }
    if num.ends_with('.') {
        return Err("no digits after the decimal point");
    }
    let too_large = "too large";
    let whole: u64 = int.parse().map_err(|_| too_large)?;
    let mut bytes = whole.checked_mul(1u64 << shift).ok_or(too_large)?;
    if !frac.is_empty() {
        // Exact integer arithmetic: frac / 10^digits of a unit.
        if frac.len() > 12 {
            return Err("too many decimals");
        }
        let f: u128 = frac.parse().map_err(|_| "no number")?;
        let scaled = f * (1u128 << shift);
        let den = 10u128.pow(frac.len() as u32);
        if !scaled.is_multiple_of(den) {
            return Err("not a whole number of bytes");
        }
        let part = u64::try_from(scaled / den).map_err(|_| too_large)?;
        bytes = bytes.checked_add(part).ok_or(too_large)?;
    }
    Ok(bytes)
}

/// Human form of a byte count, e.g. `1.5 GiB`.
pub(crate) fn human(bytes: f64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{v:.0} {}", UNITS[i])
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// Human form of a duration in seconds, e.g. `1m05s`.
pub(crate) fn human_secs(s: f64) -> String {
    if !s.is_finite() {
        return "?".into();
    }
    let s = s.round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("64kib"), Ok(65536));
        assert_eq!(parse_size("64KB"), Ok(65536));
        assert_eq!(parse_size("10mb"), Ok(10 << 20));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("0.5k"), Ok(512));
        assert_eq!(parse_size("100 M"), Ok(100 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("0"), Ok(0));
        for bad in ["12Q", "", "K", "1.3K", "1.", ".5K", "1..5", "99999999999T", "-1", "1M/s", "1 2", "1  M", "fast"] {
            let e = parse_size(bad).expect_err(bad);
            assert!(e.contains("expected a number with an optional binary unit"), "{bad}: {e}");
        }
        assert!(parse_size("1M/s").unwrap_err().contains("a size takes no /s"));
        assert!(parse_size("1.3K").unwrap_err().contains("not a whole number of bytes"));
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("100M/s"), Ok(100 << 20));
        assert_eq!(parse_rate("64KB/s"), Ok(64 << 10));
        assert_eq!(parse_rate("24.0 MiB/s"), Ok(24 << 20));
        assert_eq!(parse_rate("1.5gib/S"), Ok(3 << 29));
        assert_eq!(parse_rate("0"), Ok(0));
        let e = parse_rate("10 per second").unwrap_err();
        assert!(e.starts_with("invalid rate \"10 per second\": unknown unit; expected bytes per second"), "{e}");
    }

    #[test]
    fn what_the_cli_prints_parses_back() {
        for v in [512u64, 1536, 24 << 20, 3 << 29] {
            let h = human(v as f64);
            assert_eq!(parse_size(&h), Ok(v), "{h}");
        }
    }

    #[test]
    fn human_forms() {
        assert_eq!(human(512.0), "512 B");
        assert_eq!(human(1536.0), "1.5 KiB");
        assert_eq!(human_secs(65.0), "1m05s");
    }
}

/// The grammar over generated input: every byte count written exactly in any
/// unit and spelling reads back as itself, overflow is an error, and no text
/// makes the parser panic.
#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    /// The spellings of the unit of 2^`shift` bytes.
    fn spellings(shift: u32) -> &'static [&'static str] {
        match shift {
            0 => &["", "b", "B"],
            10 => &["k", "K", "kb", "KB", "kib", "KiB"],
            20 => &["m", "M", "mb", "MB", "mib", "MiB"],
            30 => &["g", "G", "gb", "GB", "gib", "GiB"],
            _ => &["t", "T", "tb", "TB", "tib", "TiB"],
        }
    }

    /// `v` bytes in units of 2^`shift`, as an exact decimal (no trailing
    /// zeros), and its number of decimals.
    fn exact_decimal(v: u64, shift: u32) -> (String, usize) {
        let mask = (1u64 << shift) - 1;
        let mut digits = String::new();
        let mut rest = v & mask;
        while rest != 0 {
            let times10 = u128::from(rest) * 10;
            digits.push(char::from(b'0' + (times10 >> shift) as u8));
            rest = (times10 & u128::from(mask)) as u64;
        }
        let n = digits.len();
        if n == 0 {
            ((v >> shift).to_string(), 0)
        } else {
            (format!("{}.{digits}", v >> shift), n)
        }
    }

    proptest! {
        #[test]
        fn a_byte_count_written_exactly_in_any_unit_reads_back(
            // Low bits cleared at random, so most counts have few decimals.
            v in (any::<u64>(), 0u32..44).prop_map(|(x, z)| (x >> z) << z),
            unit in 0usize..5,
            spelling in 0usize..6,
            space in any::<bool>(),
            per_second in any::<bool>(),
        ) {
            let shift = [0u32, 10, 20, 30, 40][unit];
            let names = spellings(shift);
            let name = names[spelling % names.len()];
            let (number, decimals) = exact_decimal(v, shift);
            let sep = if space && !name.is_empty() { " " } else { "" };
            let text = format!("{number}{sep}{name}");
            let (size, rate) = (parse_size(&text), parse_rate(&format!("{text}{}", if per_second { "/s" } else { "" })));
            if decimals <= 12 {
                prop_assert_eq!(size, Ok(v), "{}", text);
                prop_assert_eq!(rate, Ok(v), "{}", text);
            } else {
                prop_assert!(size.as_ref().is_err_and(|e| e.contains("too many decimals")), "{}: {:?}", text, size);
            }
        }

        #[test]
        fn a_count_beyond_64_bits_is_refused(unit in 1usize..5, over in 1u64..1_000_000) {
            let shift = [0u32, 10, 20, 30, 40][unit];
            let q = (u64::MAX >> shift) + over.min(u64::MAX - (u64::MAX >> shift));
            let text = format!("{q}{}", spellings(shift)[1]);
            let got = parse_size(&text);
            prop_assert!(got.as_ref().is_err_and(|e| e.contains("too large")), "{}: {:?}", text, got);
        }

        #[test]
        fn any_text_is_a_size_or_an_error(text in "[0-9. kKmMgGtTbBiI/s]{0,14}|.{0,20}") {
            // No panic whatever the text; a size is also a rate, with or without /s.
            if let Ok(v) = parse_size(&text) {
                prop_assert_eq!(parse_rate(&text), Ok(v));
                prop_assert_eq!(parse_rate(&format!("{text}/s")), Ok(v));
            }
        }
    }
}
