//! Perl-style numbers for the `%`-macro language.
//!
//! MARS's macro processor is Perl, so arithmetic follows Perl: a string's numeric value is its
//! longest numeric prefix (`"12abc"` → 12, `"abc"` → 0, `"0x10"` → 0), integers stay exact in
//! the 64-bit signed/unsigned range and fall back to floating point beyond it, `/` yields a
//! fraction when the division is not exact, bit operations work on unsigned 64-bit values, and
//! floats print like Perl's `%.15g`.

use std::cmp::Ordering;

/// A Perl scalar's numeric value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Num {
    /// Exact integer, kept within `i64::MIN..=u64::MAX` (Perl's IV/UV range).
    Int(i128),
    /// Anything else.
    Float(f64),
}

const MIN: i128 = i64::MIN as i128;
const MAX: i128 = u64::MAX as i128;

fn int_or_float(v: Option<i128>, fallback: impl FnOnce() -> f64) -> Num {
    match v {
        Some(v) if (MIN..=MAX).contains(&v) => Num::Int(v),
        _ => Num::Float(fallback()),
    }
}

impl Num {
    /// Perl's numification of a string (leading whitespace, sign, digits, fraction, exponent;
    /// `Inf`/`NaN` words).
    pub fn parse(s: &str) -> Num {
        let t = s.trim_start_matches([' ', '\t', '\n', '\r', '\x0c', '\x0b']);
        let b = t.as_bytes();
        let mut i = 0;
        if i < b.len() && (b[i] == b'+' || b[i] == b'-') {
            i += 1;
        }
        let int_start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let int_digits = i - int_start;
        let mut is_float = false;
        if i < b.len() && b[i] == b'.' {
            let mut j = i + 1;
            while j < b.len() && b[j].is_ascii_digit() {
                j += 1;
            }
            if int_digits > 0 || j > i + 1 {
                is_float = true;
                i = j;
            }
        }
        if int_digits == 0 && !is_float {
            let rest = t[int_start..].to_ascii_lowercase();
            let neg = int_start > 0 && b[0] == b'-';
            if rest.starts_with("inf") {
                return Num::Float(if neg {
                    f64::NEG_INFINITY
                } else {
                    f64::INFINITY
                });
            }
            if rest.starts_with("nan") {
                return Num::Float(f64::NAN);
            }
            return Num::Int(0);
        }
        if i < b.len() && (b[i] == b'e' || b[i] == b'E') {
            let mut j = i + 1;
            if j < b.len() && (b[j] == b'+' || b[j] == b'-') {
                j += 1;
            }
            let exp_start = j;
            while j < b.len() && b[j].is_ascii_digit() {
                j += 1;
            }
            if j > exp_start {
                is_float = true;
                i = j;
            }
        }
        let text = &t[..i];
        if !is_float {
            if let Ok(v) = text.parse::<i128>() {
                if (MIN..=MAX).contains(&v) {
                    return Num::Int(v);
                }
            }
        }
        Num::Float(text.parse::<f64>().unwrap_or(0.0))
    }

    /// As a float.
    pub fn as_f64(self) -> f64 {
        match self {
            Num::Int(v) => v as f64,
            Num::Float(f) => f,
        }
    }

    /// Perl's conversion to an unsigned integer for bit operations (negative values wrap like
    /// IV → UV, floats saturate).
    pub fn as_u64(self) -> u64 {
        match self {
            Num::Int(v) if v < 0 => v as i64 as u64,
            Num::Int(v) => v as u64,
            Num::Float(f) if f < 0.0 => f as i64 as u64,
            Num::Float(f) => f as u64,
        }
    }

    /// Truncated towards zero and clamped to Perl's integer range, for `%` and shift counts.
    fn as_i128(self) -> i128 {
        match self {
            Num::Int(v) => v,
            Num::Float(f) => (f as i128).clamp(MIN, MAX),
        }
    }

    /// `a + b`.
    pub fn plus(self, o: Num) -> Num {
        match (self, o) {
            (Num::Int(a), Num::Int(b)) => int_or_float(a.checked_add(b), || a as f64 + b as f64),
            _ => Num::Float(self.as_f64() + o.as_f64()),
        }
    }

    /// `a - b`.
    pub fn minus(self, o: Num) -> Num {
        match (self, o) {
            (Num::Int(a), Num::Int(b)) => int_or_float(a.checked_sub(b), || a as f64 - b as f64),
            _ => Num::Float(self.as_f64() - o.as_f64()),
        }
    }

    /// `a * b`.
    pub fn times(self, o: Num) -> Num {
        match (self, o) {
            (Num::Int(a), Num::Int(b)) => int_or_float(a.checked_mul(b), || a as f64 * b as f64),
            _ => Num::Float(self.as_f64() * o.as_f64()),
        }
    }

    /// `a / b`; `None` on division by zero.
    pub fn divide(self, o: Num) -> Option<Num> {
        if o.as_f64() == 0.0 {
            return None;
        }
        Some(match (self, o) {
            (Num::Int(a), Num::Int(b)) if a % b == 0 => int_or_float(a.checked_div(b), || 0.0),
            _ => Num::Float(self.as_f64() / o.as_f64()),
        })
    }

    /// `a % b` with the sign of `b` (Perl); `None` on modulus zero.
    pub fn modulo(self, o: Num) -> Option<Num> {
        let (a, b) = (self.as_i128(), o.as_i128());
        if b == 0 {
            return None;
        }
        // Perl: the result has the sign of the right operand. |r| < |b| and opposite signs,
        // so `r + b` cannot overflow.
        let r = a % b;
        Some(Num::Int(if r != 0 && (r < 0) != (b < 0) {
            r + b
        } else {
            r
        }))
    }

    /// Bit operation on unsigned 64-bit values.
    pub fn bits(self, o: Num, f: impl FnOnce(u64, u64) -> u64) -> Num {
        Num::Int(f(self.as_u64(), o.as_u64()) as i128)
    }

    /// `a << b` (negative shifts go the other way, shifting out everything gives 0).
    pub fn shift_left(self, o: Num) -> Num {
        let a = self.as_u64();
        let n = o.as_i128();
        let v = if n >= 64 || n <= -64 {
            0
        } else if n >= 0 {
            a << n
        } else {
            a >> -n
        };
        Num::Int(v as i128)
    }

    /// `a >> b`.
    pub fn shift_right(self, o: Num) -> Num {
        let n = o.as_i128();
        self.shift_left(Num::Int(n.checked_neg().unwrap_or(i128::MAX)))
    }

    /// Numeric comparison; `None` when a NaN is involved.
    pub fn compare(self, o: Num) -> Option<Ordering> {
        match (self, o) {
            (Num::Int(a), Num::Int(b)) => Some(a.cmp(&b)),
            _ => self.as_f64().partial_cmp(&o.as_f64()),
        }
    }
}

impl std::fmt::Display for Num {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Num::Int(v) => write!(f, "{v}"),
            Num::Float(v) => f.write_str(&perl_g(v)),
        }
    }
}

/// Perl's default float output, `%.15g`.
fn perl_g(v: f64) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    if v.is_infinite() {
        return if v > 0.0 { "Inf".into() } else { "-Inf".into() };
    }
    if v == 0.0 {
        return "0".into();
    }
    let sci = format!("{v:.14e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if !(-4..15).contains(&exp) {
        let m = strip_zeros(mantissa);
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{m}e{sign}{:02}", exp.abs())
    } else {
        let decimals = (14 - exp).max(0) as usize;
        strip_zeros(&format!("{v:.decimals$}"))
    }
}

fn strip_zeros(s: &str) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> Num {
        Num::parse(s)
    }

    #[test]
    fn numification() {
        assert_eq!(n("12abc"), Num::Int(12));
        assert_eq!(n("  -7"), Num::Int(-7));
        assert_eq!(n("abc"), Num::Int(0));
        assert_eq!(n(""), Num::Int(0));
        assert_eq!(n("0x10"), Num::Int(0));
        assert_eq!(n("1,5"), Num::Int(1));
        assert_eq!(n("2.5e1x"), Num::Float(25.0));
        assert_eq!(n(".5"), Num::Float(0.5));
        assert_eq!(n("1e"), Num::Int(1));
        assert_eq!(n("18446744073709551615"), Num::Int(u64::MAX as i128));
        assert!(matches!(n("18446744073709551616"), Num::Float(_)));
    }

    #[test]
    fn arithmetic_like_perl() {
        assert_eq!(n("7").divide(n("2")).unwrap().to_string(), "3.5");
        assert_eq!(n("6").divide(n("2")).unwrap().to_string(), "3");
        assert_eq!(
            n("1").divide(n("3")).unwrap().to_string(),
            "0.333333333333333"
        );
        assert_eq!(n("-7").modulo(n("3")).unwrap().to_string(), "2");
        assert_eq!(n("7").modulo(n("-3")).unwrap().to_string(), "-2");
        assert!(n("1").divide(n("0")).is_none());
        assert_eq!(n("-1").bits(n("255"), |a, b| a & b).to_string(), "255");
        assert_eq!(n("1").shift_left(n("64")).to_string(), "0");
        assert_eq!(n("256").shift_right(n("4")).to_string(), "16");
        assert_eq!(n("1e20").to_string(), "1e+20");
        assert_eq!(n("0.0001").to_string(), "0.0001");
        assert_eq!(n("0.00001").to_string(), "1e-05");
        assert_eq!(
            n("9223372036854775807").plus(n("1")).to_string(),
            "9223372036854775808"
        );
        assert_eq!(
            n("18446744073709551615").plus(n("1")).to_string(),
            "1.84467440737096e+19"
        );
    }
}
