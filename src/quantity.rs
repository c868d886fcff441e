//! Kubernetes resource quantities (pure): the grammar of `k8s.io/apimachinery/pkg/api/resource`,
//! so a value the API server would refuse is reported on the TaskQueue before any Deployment
//! write, and a value the server rewrote (`0.5` -> `500m`, `1024Mi` -> `1Gi`) still counts as the
//! same one when the operator checks its Deployment for drift.
//!
//! ```text
//! quantity  ::= [+-] number suffix
//! number    ::= digits | digits "." digits | digits "." | "." digits
//! suffix    ::= "" | m | k | M | G | T | P | E | Ki | Mi | Gi | Ti | Pi | Ei | (e|E) [+-] digits
//! ```

use std::cmp::Ordering;

/// A parsed quantity: `mantissa × 10^exp10`, with `mantissa` free of trailing zeros (so equal
/// values have equal representations).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quantity {
    negative: bool,
    mantissa: u128,
    exp10: i32,
}

/// The largest value the operator accepts for a resource (2^63 - 1, the API server's int64).
const MAX_VALUE: u128 = i64::MAX as u128;
/// More significant digits than this are refused (no real resource needs them).
const MAX_DIGITS: usize = 30;

impl Quantity {
    /// Parse one quantity; the error says what is wrong in words a user can act on.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("is empty; write a quantity such as `500m`, `2` or `1Gi`".into());
        }
        let (negative, rest) = match s.as_bytes()[0] {
            b'-' => (true, &s[1..]),
            b'+' => (false, &s[1..]),
            _ => (false, s),
        };
        let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let (number, suffix) = rest.split_at(num_len);
        let (int, frac) = number.split_once('.').unwrap_or((number, ""));
        if (int.is_empty() && frac.is_empty()) || frac.contains('.') {
            return Err(format!("{s:?} is not a quantity; write e.g. `500m`, `2` or `1Gi`"));
        }
        let (exp10, binary) = suffix_scale(suffix).ok_or_else(|| {
            format!("{s:?} has suffix {suffix:?}; use one of m, k, M, G, T, P, E, Ki, Mi, Gi, Ti, Pi, Ei (or none)")
        })?;
        let digits = format!("{int}{frac}");
        let significant = digits.trim_start_matches('0');
        if significant.len() > MAX_DIGITS {
            return Err(format!("{s:?} has more than {MAX_DIGITS} significant digits"));
        }
        let too_large = || format!("{s:?} is too large (the most is 2^63-1)");
        let mut mantissa: u128 =
            if significant.is_empty() { 0 } else { significant.parse().map_err(|_| too_large())? };
        for _ in 0..binary {
            mantissa = mantissa.checked_mul(1024).ok_or_else(too_large)?;
        }
        let frac_len = i32::try_from(frac.len()).map_err(|_| too_large())?;
        let mut q = Quantity { negative: negative && mantissa != 0, mantissa, exp10: exp10.saturating_sub(frac_len) };
        q.normalize();
        if q.integer_part().is_none_or(|v| v > MAX_VALUE) {
            return Err(too_large());
        }
        Ok(q)
    }

    pub fn is_negative(&self) -> bool {
        self.negative
    }

    fn normalize(&mut self) {
        if self.mantissa == 0 {
            self.exp10 = 0;
            return;
        }
        while self.mantissa % 10 == 0 {
            self.mantissa /= 10;
            self.exp10 = self.exp10.saturating_add(1);
        }
    }

    /// The value rounded down to an integer; None when it does not fit in a u128.
    fn integer_part(&self) -> Option<u128> {
        if self.exp10 >= 0 {
            10u128.checked_pow(u32::try_from(self.exp10).ok()?).and_then(|p| self.mantissa.checked_mul(p))
        } else {
            Some(10u128.checked_pow(self.exp10.unsigned_abs()).map_or(0, |p| self.mantissa / p))
        }
    }

    /// Compare magnitudes exactly where the numbers allow, else by their logarithm.
    fn cmp_magnitude(&self, other: &Self) -> Ordering {
        let e = self.exp10.min(other.exp10);
        let scaled =
            |q: &Self| 10u128.checked_pow(u32::try_from(q.exp10 - e).ok()?).and_then(|p| q.mantissa.checked_mul(p));
        match (scaled(self), scaled(other)) {
            (Some(a), Some(b)) => a.cmp(&b),
            _ => self.log10().total_cmp(&other.log10()),
        }
    }

    fn log10(&self) -> f64 {
        if self.mantissa == 0 {
            return f64::NEG_INFINITY;
        }
        (self.mantissa as f64).log10() + f64::from(self.exp10)
    }
}

impl PartialOrd for Quantity {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Quantity {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self.negative, other.negative) {
            (false, true) => Ordering::Greater,
            (true, false) => Ordering::Less,
            (false, false) => self.cmp_magnitude(other),
            (true, true) => other.cmp_magnitude(self),
        }
    }
}

/// (power of ten, power of 1024) a suffix stands for; None for an unknown suffix.
fn suffix_scale(suffix: &str) -> Option<(i32, u32)> {
    Some(match suffix {
        "" => (0, 0),
        "m" => (-3, 0),
        "k" => (3, 0),
        "M" => (6, 0),
        "G" => (9, 0),
        "T" => (12, 0),
        "P" => (15, 0),
        "E" => (18, 0),
        "Ki" => (0, 1),
        "Mi" => (0, 2),
        "Gi" => (0, 3),
        "Ti" => (0, 4),
        "Pi" => (0, 5),
        "Ei" => (0, 6),
        _ => {
            let exp = suffix.strip_prefix(['e', 'E'])?;
            let digits = exp.strip_prefix(['+', '-']).unwrap_or(exp);
            if digits.is_empty() || digits.len() > 4 || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            (exp.parse().ok()?, 0)
        }
    })
}

/// Whether two quantity strings mean the same amount (`0.5` and `500m`, `1024Mi` and `1Gi`).
pub fn same(a: &str, b: &str) -> bool {
    a == b || matches!((Quantity::parse(a), Quantity::parse(b)), (Ok(x), Ok(y)) if x == y)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grammar_of_the_api_server() {
        for ok in ["0", "1", "500m", "0.5", ".5", "5.", "+1", "1Gi", "1.5Gi", "2e3", "2E-3", "1k", "7Ei", "0.000000001"]
        {
            assert!(Quantity::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "1 Gi", "1gi", "1GB", "abc", "1..2", "--1", ".", "1e", "1e+", "1.2.3", "1Gi ", " 1", "∞"] {
            assert!(Quantity::parse(bad).is_err(), "{bad}");
        }
        assert!(Quantity::parse("-1").unwrap().is_negative());
        assert!(!Quantity::parse("-0").unwrap().is_negative());
        assert!(Quantity::parse("99999999999999999999999999999999999999").is_err(), "too many digits");
        assert!(Quantity::parse("9Ei").is_err(), "above 2^63-1");
        assert!(Quantity::parse("1e9999").is_err());
        assert!(Quantity::parse("1e-9999").is_ok(), "tiny values round up on the server");
    }

    #[test]
    fn equal_amounts_written_differently_are_the_same() {
        assert!(same("0.5", "500m"));
        assert!(same("1024Mi", "1Gi"));
        assert!(same("1e3", "1k"));
        assert!(same("1.5Gi", "1536Mi"));
        assert!(same("1", "1000m"));
        assert!(!same("1", "1001m"));
        assert!(!same("1Gi", "1G"));
        assert!(!same("x", "y"));
    }

    #[test]
    fn ordering() {
        let q = |s| Quantity::parse(s).unwrap();
        assert!(q("500m") < q("1"));
        assert!(q("1Gi") > q("1G"));
        assert!(q("-1") < q("0"));
        assert!(q("-2") < q("-1"));
        assert_eq!(q("2k").cmp(&q("2000")), Ordering::Equal);
        assert!(q("1e-30") < q("1e-29"));
    }
}
