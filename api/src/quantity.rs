//! Kubernetes quantities (`16Gi`, `512M`, `1.5e9`, `2500m`), read exactly as the API
//! server reads them: the one quantity parser of the workspace.
//!
//! The CRD's CEL rule (`isQuantity`) rejects non-quantities at admission; this parser
//! lets the operator and the shim turn an accepted value into bytes or CPUs, and
//! re-check it when a value arrives by another road (a Pod annotation written by hand,
//! the shim's config file).
//!
//! The grammar is Kubernetes' (`k8s.io/apimachinery/pkg/api/resource`):
//!
//! ```text
//! quantity  ::= sign? number suffix
//! number    ::= digits | digits "." digits | digits "." | "." digits
//! suffix    ::= "" | binarySI | decimalSI | ("e" | "E") sign? digits
//! binarySI  ::= Ki | Mi | Gi | Ti | Pi | Ei
//! decimalSI ::= n | u | m | k | M | G | T | P | E
//! ```
//!
//! and so are the semantics: a value is kept to nano precision, rounded up (away from
//! zero), and capped at 2⁶³−1 units. Arithmetic is exact (decimal digits, never a
//! float), so `1.1Gi` is 1181116006.4 bytes, rounded up to 1181116007.
//!
//! Two deliberate differences, neither reachable through the CRD: a number without a
//! digit (`Gi`, `.`) is refused where Kubernetes reads zero, and an exponent beyond
//! `i32` saturates where Kubernetes lets it wrap around.

use std::fmt;

/// Nanos in one unit: Kubernetes keeps quantities to nine decimal places.
const NANOS_PER_UNIT: i128 = 1_000_000_000;
/// The largest magnitude Kubernetes represents, in nanos: 2⁶³−1 units.
const MAX_NANOS: i128 = i64::MAX as i128 * NANOS_PER_UNIT;
/// Digits of [`MAX_NANOS`]: a magnitude with more integer digits is capped.
const MAX_NANOS_DIGITS: usize = 28;

/// Why a string is not a usable quantity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not {what}: {reason}")]
pub struct QuantityError {
    value: String,
    what: &'static str,
    reason: &'static str,
}

impl QuantityError {
    fn new(value: &str, what: &'static str, reason: &'static str) -> Self {
        QuantityError {
            value: value.to_owned(),
            what,
            reason,
        }
    }

    fn about(mut self, what: &'static str) -> Self {
        self.what = what;
        self
    }
}

/// A Kubernetes quantity: an exact value in nano-units (rounded up, capped like the
/// API server does).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Quantity {
    nanos: i128,
    capped: bool,
}

impl Quantity {
    /// Parses a quantity in Kubernetes' grammar; no surrounding blanks.
    pub fn parse(text: &str) -> Result<Quantity, QuantityError> {
        const WHAT: &str = "a Kubernetes quantity";
        let err = |reason| QuantityError::new(text, WHAT, reason);
        let (negative, rest) = match text.as_bytes().first() {
            Some(b'-') => (true, &text[1..]),
            Some(b'+') => (false, &text[1..]),
            Some(_) => (false, text),
            None => return Err(err("it is empty")),
        };
        let int_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let (int_digits, rest) = rest.split_at(int_len);
        let (frac_digits, suffix) = match rest.strip_prefix('.') {
            Some(after) => {
                let len = after.bytes().take_while(u8::is_ascii_digit).count();
                after.split_at(len)
            }
            None => ("", rest),
        };
        if int_digits.is_empty() && frac_digits.is_empty() {
            return Err(err("it does not start with a number"));
        }
        let (exp10, exp2) = suffix_exponents(suffix).ok_or_else(|| {
            err("its suffix is not one of n u m k M G T P E Ki Mi Gi Ti Pi Ei, nor an exponent like e9")
        })?;
        let digits: Vec<u8> = int_digits
            .bytes()
            .chain(frac_digits.bytes())
            .map(|b| b - b'0')
            .collect();
        // The last digit's place, counted in nanos.
        let place = exp10
            .saturating_sub(frac_digits.len() as i64)
            .saturating_add(9);
        let (magnitude, capped) = ceil_scaled(&digits, place, exp2);
        Ok(Quantity {
            nanos: if negative { -magnitude } else { magnitude },
            capped,
        })
    }

    /// The value in nano-units (`1500m` → 1_500_000_000).
    pub fn nanos(&self) -> i128 {
        self.nanos
    }

    /// The value rounded up to whole units, as Kubernetes' `Value()` does for
    /// positive quantities (`1500m` → 2, `0.1` → 1).
    pub fn ceil_units(&self) -> i128 {
        let units = self.nanos.div_euclid(NANOS_PER_UNIT);
        if self.nanos.rem_euclid(NANOS_PER_UNIT) == 0 {
            units
        } else {
            units + 1
        }
    }

    /// Whether the value is below zero.
    pub fn is_negative(&self) -> bool {
        self.nanos < 0
    }

    /// Whether the text asked for more than Kubernetes represents (2⁶³−1 units), so
    /// the value was capped there.
    pub fn is_capped(&self) -> bool {
        self.capped
    }
}

impl std::str::FromStr for Quantity {
    type Err = QuantityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Quantity::parse(s)
    }
}

/// The decimal and binary exponents a suffix stands for.
fn suffix_exponents(suffix: &str) -> Option<(i64, u32)> {
    Some(match suffix {
        "" => (0, 0),
        "n" => (-9, 0),
        "u" => (-6, 0),
        "m" => (-3, 0),
        "k" => (3, 0),
        "M" => (6, 0),
        "G" => (9, 0),
        "T" => (12, 0),
        "P" => (15, 0),
        "E" => (18, 0),
        "Ki" => (0, 10),
        "Mi" => (0, 20),
        "Gi" => (0, 30),
        "Ti" => (0, 40),
        "Pi" => (0, 50),
        "Ei" => (0, 60),
        _ => {
            let exponent = suffix.strip_prefix(['e', 'E'])?;
            let (negative, digits) = match exponent.as_bytes().first()? {
                b'-' => (true, &exponent[1..]),
                b'+' => (false, &exponent[1..]),
                _ => (false, exponent),
            };
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            // Far beyond any representable value either way: saturate.
            let magnitude = digits.parse::<i64>().unwrap_or(i64::from(i32::MAX));
            let magnitude = magnitude.min(i64::from(i32::MAX));
            (if negative { -magnitude } else { magnitude }, 0)
        }
    })
}

/// `ceil(digits × 10^place × 2^exp2)` and whether it was capped at [`MAX_NANOS`],
/// computed exactly on decimal digits.
fn ceil_scaled(digits: &[u8], place: i64, exp2: u32) -> (i128, bool) {
    let Some(first) = digits.iter().position(|d| *d != 0) else {
        return (0, false);
    };
    let last = digits.iter().rposition(|d| *d != 0).unwrap_or(first);
    let significant = &digits[first..=last];
    let place = place.saturating_add((digits.len() - 1 - last) as i64);
    // The value lies in [10^(top-1), 10^top) × 2^exp2, where `top` counts the digits
    // before the decimal point (negative: zeros after it).
    let top = place.saturating_add(significant.len() as i64);
    if top > MAX_NANOS_DIGITS as i64 {
        return (MAX_NANOS, true);
    }
    // 2^60 < 10^19: below 10^-19 the value stays under one nano, which rounds up to one.
    if top < -19 {
        return (1, false);
    }
    // Now |place| is bounded by the input length plus 48: spell the value out.
    let mut number: Vec<u8> = significant.to_vec();
    let fraction_len = if place >= 0 {
        number.extend(std::iter::repeat_n(0, place as usize));
        0
    } else {
        (-place) as usize
    };
    multiply(&mut number, 1u128 << exp2);
    let int_len = number.len().saturating_sub(fraction_len);
    let (int_part, fraction) = number.split_at(int_len);
    let int_part = match int_part.iter().position(|d| *d != 0) {
        Some(start) => &int_part[start..],
        None => &[],
    };
    if int_part.len() > MAX_NANOS_DIGITS {
        return (MAX_NANOS, true);
    }
    let mut value = int_part
        .iter()
        .fold(0i128, |acc, d| acc * 10 + i128::from(*d));
    if fraction.iter().any(|d| *d != 0) {
        value += 1;
    }
    if value > MAX_NANOS {
        (MAX_NANOS, true)
    } else {
        (value, false)
    }
}

/// Multiplies a big-endian decimal digit string by `factor` (at most 2⁶⁰) in place.
fn multiply(number: &mut Vec<u8>, factor: u128) {
    let mut carry: u128 = 0;
    for digit in number.iter_mut().rev() {
        let product = u128::from(*digit) * factor + carry;
        *digit = (product % 10) as u8;
        carry = product / 10;
    }
    let mut head = Vec::new();
    while carry > 0 {
        head.push((carry % 10) as u8);
        carry /= 10;
    }
    head.reverse();
    number.splice(0..0, head);
}

/// Parses a memory quantity into whole bytes, rounding fractions up, as Kubernetes
/// does (`1.5Gi`, `128974848000m`, `1e9`, `16Gi`). Blanks around it are ignored.
/// Negative values and values beyond Kubernetes' largest (2⁶³−1) are refused.
pub fn parse_bytes(value: &str) -> Result<u64, QuantityError> {
    const WHAT: &str = "a memory quantity";
    let quantity = Quantity::parse(value.trim()).map_err(|e| e.about(WHAT))?;
    if quantity.is_negative() {
        return Err(QuantityError::new(value, WHAT, "it is negative"));
    }
    if quantity.is_capped() {
        return Err(QuantityError::new(
            value,
            WHAT,
            "it is larger than the largest quantity Kubernetes represents (2^63-1)",
        ));
    }
    u64::try_from(quantity.ceil_units())
        .map_err(|_| QuantityError::new(value, WHAT, "it is too large"))
}

/// Parses a CPU quantity into whole CPUs, rounding fractions up (`4`, `2500m` → 3,
/// `0.5` → 1). Blanks around it are ignored. Zero, negative and values beyond
/// `u32` are refused.
pub fn parse_cpus(value: &str) -> Result<u32, QuantityError> {
    const WHAT: &str = "a CPU count";
    let quantity = Quantity::parse(value.trim()).map_err(|e| e.about(WHAT))?;
    if quantity.is_negative() {
        return Err(QuantityError::new(value, WHAT, "it is negative"));
    }
    if quantity.nanos() == 0 {
        return Err(QuantityError::new(value, WHAT, "it is less than one CPU"));
    }
    u32::try_from(quantity.ceil_units())
        .map_err(|_| QuantityError::new(value, WHAT, "it is too large"))
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

impl fmt::Display for Quantity {
    /// The value in nano-units' plain decimal form (`1.5`, `1181116006.4`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.is_negative() { "-" } else { "" };
        let magnitude = self.nanos.unsigned_abs();
        let units = magnitude / NANOS_PER_UNIT as u128;
        let nanos = magnitude % NANOS_PER_UNIT as u128;
        if nanos == 0 {
            write!(f, "{sign}{units}")
        } else {
            let fraction = format!("{nanos:09}");
            write!(f, "{sign}{units}.{}", fraction.trim_end_matches('0'))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_the_forms_kubernetes_accepts() {
        let cases = [
            ("16Gi", 16 << 30),
            ("128Mi", 128 << 20),
            ("1.5Gi", 3 << 29),
            ("1.1Gi", 1_181_116_007), // 1181116006.4, rounded up
            ("1G", 1_000_000_000),
            ("512k", 512_000),
            ("1e9", 1_000_000_000),
            ("1E9", 1_000_000_000),
            ("1e+9", 1_000_000_000),
            ("1.5e3", 1500),
            ("15e-1", 2),
            ("1E", 1_000_000_000_000_000_000),
            ("1Ei", 1 << 60),
            ("4096", 4096),
            ("+2Ki", 2048),
            ("0.5", 1),
            (".5Ki", 512),
            ("5.Ki", 5120),
            ("00016Gi", 16 << 30),
            ("100m", 1),
            ("200000000000m", 200_000_000),
            ("134217728000000u", 134_217_728),
            ("134217728000000000n", 134_217_728),
            ("1n", 1),
            ("0", 0),
            ("-0", 0),
            ("0.000Gi", 0),
            ("9223372036854775807", i64::MAX as u64),
        ];
        for (input, want) in cases {
            assert_eq!(parse_bytes(input), Ok(want), "{input}");
        }
    }

    #[test]
    fn refuses_what_is_not_memory() {
        for input in [
            "", "-1Gi", "lots", "12Gb", "1.2.3", "Gi", "1e", "99999Ei", "1e3Ki", "1K", "1ki",
            "1 Gi", "1e1.5", "1e--3", ".", "+", "1e30",
        ] {
            let e = parse_bytes(input).expect_err(input);
            assert!(e.to_string().contains("is not a memory quantity"), "{e}");
        }
        let e = parse_bytes("99999Ei").expect_err("capped");
        assert!(e.to_string().contains("2^63-1"), "{e}");
        let e = parse_bytes("-1m").expect_err("negative");
        assert!(e.to_string().ends_with("it is negative"), "{e}");
    }

    #[test]
    fn quantities_keep_nano_precision_and_cap_like_kubernetes() {
        let cases = [
            ("1500m", 1_500_000_000, "1.5", 2, false),
            ("1n", 1, "0.000000001", 1, false),
            ("0.1n", 1, "0.000000001", 1, false), // rounded up to a nano
            ("1e-30", 1, "0.000000001", 1, false), // far below a nano, still not zero
            ("-1.5", -1_500_000_000, "-1.5", -1, false),
            (
                "1.1Gi",
                1_181_116_006_400_000_000,
                "1181116006.4",
                1_181_116_007,
                false,
            ),
            (
                "1e30",
                MAX_NANOS,
                "9223372036854775807",
                i64::MAX as i128,
                true,
            ),
            (
                "8Ei",
                MAX_NANOS,
                "9223372036854775807",
                i64::MAX as i128,
                true,
            ),
            (
                "7.9Ei",
                9_108_079_886_394_091_110_400_000_000,
                "9108079886394091110.4",
                9_108_079_886_394_091_111,
                false,
            ),
            (
                "7.99999999999999999999Ei",
                MAX_NANOS,
                "9223372036854775807",
                i64::MAX as i128,
                true,
            ),
        ];
        for (input, nanos, text, units, capped) in cases {
            let q = Quantity::parse(input).expect(input);
            assert_eq!(q.nanos(), nanos, "{input}");
            assert_eq!(q.to_string(), text, "{input}");
            assert_eq!(q.ceil_units(), units, "{input}");
            assert_eq!(q.is_capped(), capped, "{input}");
        }
        assert!(
            Quantity::parse(" 1Gi").is_err(),
            "blanks are not Kubernetes' grammar"
        );
    }

    #[test]
    fn cpu_counts_round_up() {
        let cases = [
            ("4", Ok(4)),
            ("2500m", Ok(3)),
            ("1000m", Ok(1)),
            ("1m", Ok(1)),
            ("0.5", Ok(1)),
            ("2e1", Ok(20)),
            (" 8 ", Ok(8)),
            ("0", Err("less than one CPU")),
            ("0m", Err("less than one CPU")),
            ("two", Err("does not start with a number")),
            ("-1", Err("negative")),
            ("99999999999", Err("too large")),
        ];
        for (input, want) in cases {
            match (parse_cpus(input), want) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{input}"),
                (Err(e), Err(needle)) => {
                    assert!(e.to_string().contains("is not a CPU count"), "{e}");
                    assert!(e.to_string().contains(needle), "{input}: {e}");
                }
                (got, want) => panic!("{input}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn formats_round_trip() {
        for bytes in [0, 1, 1023, 1024, 16 << 30, (16 << 30) + 1, 3 << 40] {
            assert_eq!(parse_bytes(&format_bytes(bytes)), Ok(bytes));
        }
        assert_eq!(format_bytes(16 << 30), "16Gi");
    }

    /// An independent oracle: `mantissa / 10^scale × 2^binary × 10^decimal`, rounded
    /// up, in u128 (the generated ranges keep it exact).
    fn oracle(mantissa: u64, scale: u32, binary: u32, decimal: i32) -> u128 {
        let mut numerator = u128::from(mantissa) << binary;
        let mut denominator = 10u128.pow(scale);
        if decimal >= 0 {
            numerator *= 10u128.pow(decimal as u32);
        } else {
            denominator *= 10u128.pow(decimal.unsigned_abs());
        }
        numerator.div_ceil(denominator)
    }

    proptest! {
        /// Every spelling of a number (fraction digits, each suffix, exponents) gives
        /// the exactly rounded byte count.
        #[test]
        fn bytes_match_exact_arithmetic(
            mantissa in 0u64..10_000_000,
            scale in 0u32..7,
            suffix in 0usize..16,
            exponent in -9i32..10,
            upper in any::<bool>(),
        ) {
            let digits = format!("{mantissa:0width$}", width = scale as usize + 1);
            let (int_part, frac_part) = digits.split_at(digits.len() - scale as usize);
            let number = if scale == 0 { int_part.to_owned() } else { format!("{int_part}.{frac_part}") };
            let suffixes: [(&str, u32, i32); 16] = [
                ("", 0, 0), ("n", 0, -9), ("u", 0, -6), ("m", 0, -3), ("k", 0, 3),
                ("M", 0, 6), ("G", 0, 9), ("T", 0, 12), ("P", 0, 15), ("E", 0, 18),
                ("Ki", 10, 0), ("Mi", 20, 0), ("Gi", 30, 0), ("Ti", 40, 0), ("Pi", 50, 0),
                ("Ei", 60, 0),
            ];
            let (text, binary, decimal) = if suffix == 0 {
                let e = if upper { "E" } else { "e" };
                (format!("{number}{e}{exponent}"), 0, exponent)
            } else {
                let (s, b, d) = suffixes[suffix];
                (format!("{number}{s}"), b, d)
            };
            let want = oracle(mantissa, scale, binary, decimal);
            match parse_bytes(&text) {
                Ok(got) => prop_assert_eq!(u128::from(got), want, "{}", text),
                Err(e) => prop_assert!(want > i64::MAX as u128, "{}: {}", text, e),
            }
        }
    }
}
