//! Kubernetes memory quantities (`16Gi`, `512M`, `1e9`) as byte counts.
//!
//! The CRD's CEL rule rejects non-quantities at admission; this parser lets the operator
//! and the shim turn an accepted value into bytes, and re-check it when a value arrives by
//! another road (a Pod annotation written by hand).

use std::fmt;

/// Why a string is not a usable memory quantity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantityError {
    value: String,
    reason: &'static str,
}

impl fmt::Display for QuantityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} is not a memory quantity: {}",
            self.value, self.reason
        )
    }
}

impl std::error::Error for QuantityError {}

/// Parses a Kubernetes quantity into whole bytes, rounding fractions up.
///
/// Accepts binary suffixes (`Ki`..`Ei`), decimal ones (`k`, `M`, `G`, `T`, `P`, `E`),
/// exponents (`1e9`) and plain numbers. Negative values, milli-bytes (`m`) and values
/// beyond `u64` are refused.
pub fn parse_bytes(value: &str) -> Result<u64, QuantityError> {
    let err = |reason| QuantityError {
        value: value.to_owned(),
        reason,
    };
    let s = value.trim();
    if s.is_empty() {
        return Err(err("it is empty"));
    }
    if s.starts_with('-') {
        return Err(err("it is negative"));
    }
    let s = s.strip_prefix('+').unwrap_or(s);
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    if number.is_empty() || number == "." || number.matches('.').count() > 1 {
        return Err(err("it does not start with a number"));
    }
    let multiplier: f64 = match suffix {
        "" => 1.0,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "m" => return Err(err("memory cannot be given in milli-units")),
        exp if exp.starts_with(['e', 'E']) => {
            let e: i32 = exp[1..]
                .parse()
                .map_err(|_| err("its exponent is not an integer"))?;
            10f64.powi(e)
        }
        _ => {
            return Err(err(
                "its suffix is not one of Ki Mi Gi Ti Pi Ei k M G T P E",
            ));
        }
    };
    let n: f64 = number
        .parse()
        .map_err(|_| err("it does not start with a number"))?;
    let bytes = (n * multiplier).ceil();
    if !bytes.is_finite() || bytes > u64::MAX as f64 {
        return Err(err("it is too large"));
    }
    Ok(bytes as u64)
}

/// Formats a byte count the way Kubernetes prints it: the largest binary suffix that
/// divides it exactly (`16Gi`), else plain bytes.
pub fn format_bytes(bytes: u64) -> String {
    const SUFFIXES: [&str; 6] = ["Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    let mut value = bytes;
    let mut suffix = "";
    for s in SUFFIXES {
        if value == 0 || !value.is_multiple_of(1024) {
            break;
        }
        value /= 1024;
        suffix = s;
    }
    format!("{value}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_forms_kubernetes_accepts() {
        let cases = [
            ("16Gi", 16 << 30),
            ("128Mi", 128 << 20),
            ("1.5Gi", 3 << 29),
            ("1G", 1_000_000_000),
            ("512k", 512_000),
            ("1e9", 1_000_000_000),
            ("4096", 4096),
            ("+2Ki", 2048),
            ("0.5", 1),
        ];
        for (input, want) in cases {
            assert_eq!(parse_bytes(input), Ok(want), "{input}");
        }
    }

    #[test]
    fn refuses_what_is_not_memory() {
        for input in [
            "", "-1Gi", "lots", "12Gb", "100m", "1.2.3", "Gi", "1e", "99999Ei",
        ] {
            let e = parse_bytes(input).expect_err(input);
            assert!(e.to_string().contains("is not a memory quantity"), "{e}");
        }
    }

    #[test]
    fn formats_round_trip() {
        for bytes in [0, 1, 1023, 1024, 16 << 30, (16 << 30) + 1, 3 << 40] {
            assert_eq!(parse_bytes(&format_bytes(bytes)), Ok(bytes));
        }
        assert_eq!(format_bytes(16 << 30), "16Gi");
    }
}
