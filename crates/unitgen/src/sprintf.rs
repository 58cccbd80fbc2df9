//! Perl's `sprintf` for `%sprintf{FORMAT}{ARG}…` (MARS passes the format and the evaluated
//! arguments straight to Perl).
//!
//! A conversion is `%` [`N$`] [flags `-+ 0#`] [width `N` or `*`] [`.precision`, `N` or `*`]
//! [size `h hh l ll q L V`, ignored] and one of `% c s d i u o x X b B e E f F g G`. Arguments
//! are Perl scalars: numbers are parsed as Perl does ([`crate::num`]), a missing argument is
//! `""`/0. Anything else (an unknown conversion, a lone `%` at the end) is copied as it is,
//! which is what Perl prints too (with a warning). Widths and precisions are capped at
//! [`MAX_WIDTH`] so that a template cannot ask for gigabytes of padding.

use crate::num::Num;

/// Largest width or precision honoured.
pub const MAX_WIDTH: usize = 4096;

#[derive(Default)]
struct Spec {
    left: bool,
    plus: bool,
    space: bool,
    zero: bool,
    alt: bool,
    width: usize,
    precision: Option<usize>,
}

fn num(arg: Option<&String>) -> f64 {
    Num::parse(arg.map(String::as_str).unwrap_or("")).as_f64()
}

fn int(arg: Option<&String>) -> i128 {
    match Num::parse(arg.map(String::as_str).unwrap_or("")) {
        Num::Int(i) => i,
        Num::Float(f) if f.is_nan() => 0,
        Num::Float(f) => f.trunc().clamp(i128::MIN as f64, i128::MAX as f64) as i128,
    }
}

/// Pads `body` (already with its sign/prefix in `sign`) to the width.
fn pad(spec: &Spec, sign: &str, body: &str, zero_ok: bool) -> String {
    let len = sign.chars().count() + body.chars().count();
    if len >= spec.width {
        return format!("{sign}{body}");
    }
    let fill = spec.width - len;
    if spec.left {
        format!("{sign}{body}{}", " ".repeat(fill))
    } else if spec.zero && zero_ok {
        format!("{sign}{}{body}", "0".repeat(fill))
    } else {
        format!("{}{sign}{body}", " ".repeat(fill))
    }
}

fn sign_of(spec: &Spec, negative: bool) -> &'static str {
    if negative {
        "-"
    } else if spec.plus {
        "+"
    } else if spec.space {
        " "
    } else {
        ""
    }
}

/// `d.ddde±XX` with `p` digits after the point.
fn exp_form(v: f64, p: usize, upper: bool) -> String {
    let s = format!("{v:.p$e}");
    let (mant, exp) = s.split_once('e').unwrap_or((&s, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let e = if upper { 'E' } else { 'e' };
    let sign = if exp < 0 { '-' } else { '+' };
    format!("{mant}{e}{sign}{:02}", exp.abs())
}

fn strip_zeros(s: &str) -> String {
    if !s.contains('.') {
        return s.to_string();
    }
    let (mant, exp) = match s.find(['e', 'E']) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, ""),
    };
    let mant = mant.trim_end_matches('0').trim_end_matches('.');
    format!("{mant}{exp}")
}

fn float(spec: &Spec, conv: char, v: f64) -> String {
    let upper = conv.is_ascii_uppercase();
    if !v.is_finite() {
        let body = if v.is_nan() { "NaN" } else { "Inf" };
        return pad(spec, sign_of(spec, v < 0.0), body, false);
    }
    let p = spec.precision.unwrap_or(6).min(MAX_WIDTH);
    let a = v.abs();
    let body = match conv {
        'f' | 'F' => format!("{a:.p$}"),
        'e' | 'E' => exp_form(a, p, upper),
        _ => {
            // %g: precision = significant digits (0 counts as 1); %e form when the exponent
            // is below -4 or not below the precision; trailing zeros go unless `#`.
            let p = p.max(1);
            let exp = if a == 0.0 {
                0
            } else {
                let e = exp_form(a, p - 1, false);
                e.rsplit_once('e')
                    .and_then(|(_, x)| x.parse::<i32>().ok())
                    .unwrap_or(0)
            };
            let s = if exp < -4 || exp >= p as i32 {
                exp_form(a, p - 1, upper)
            } else {
                let decimals = (p as i32 - 1 - exp).max(0) as usize;
                format!("{a:.decimals$}")
            };
            if spec.alt {
                s
            } else {
                strip_zeros(&s)
            }
        }
    };
    let negative = v.is_sign_negative() && v != 0.0;
    pad(spec, sign_of(spec, negative), &body, true)
}

fn integer(spec: &Spec, conv: char, arg: Option<&String>) -> String {
    let v = int(arg);
    let (negative, digits, prefix) = match conv {
        'd' | 'i' => (v < 0, v.unsigned_abs().to_string(), ""),
        _ => {
            // Perl's unsigned conversions see the 64-bit two's complement of a negative.
            let u = if v < 0 {
                (v as i64) as u64 as u128
            } else {
                v as u128
            };
            match conv {
                'u' => (false, u.to_string(), ""),
                'o' => (false, format!("{u:o}"), if spec.alt { "0" } else { "" }),
                'x' => (
                    false,
                    format!("{u:x}"),
                    if spec.alt && u != 0 { "0x" } else { "" },
                ),
                'X' => (
                    false,
                    format!("{u:X}"),
                    if spec.alt && u != 0 { "0X" } else { "" },
                ),
                'b' => (
                    false,
                    format!("{u:b}"),
                    if spec.alt && u != 0 { "0b" } else { "" },
                ),
                _ => (
                    false,
                    format!("{u:b}"),
                    if spec.alt && u != 0 { "0B" } else { "" },
                ),
            }
        }
    };
    let mut digits = digits;
    if let Some(p) = spec.precision {
        if p == 0 && v == 0 {
            digits.clear();
        } else if digits.len() < p {
            digits = format!("{}{digits}", "0".repeat(p - digits.len()));
        }
    }
    let sign = if matches!(conv, 'd' | 'i') {
        sign_of(spec, negative)
    } else {
        ""
    };
    pad(
        spec,
        &format!("{sign}{prefix}"),
        &digits,
        spec.precision.is_none(),
    )
}

/// Formats like Perl's `sprintf(fmt, args…)`.
pub fn sprintf(fmt: &str, args: &[String]) -> String {
    let b = fmt.as_bytes();
    let mut out = String::new();
    let mut next_arg = 0usize;
    let mut i = 0;
    let mut plain = 0;
    while i < b.len() {
        if b[i] != b'%' {
            i += 1;
            continue;
        }
        out.push_str(&fmt[plain..i]);
        let start = i;
        i += 1;
        let mut spec = Spec::default();
        // Explicit index `N$`.
        let mut explicit = None;
        let digits_end = |mut j: usize| {
            while j < b.len() && b[j].is_ascii_digit() {
                j += 1;
            }
            j
        };
        let j = digits_end(i);
        if j > i && j < b.len() && b[j] == b'$' {
            explicit = fmt[i..j].parse::<usize>().ok().filter(|n| *n > 0);
            i = j + 1;
        }
        while i < b.len() {
            match b[i] {
                b'-' => spec.left = true,
                b'+' => spec.plus = true,
                b' ' => spec.space = true,
                b'0' => spec.zero = true,
                b'#' => spec.alt = true,
                _ => break,
            }
            i += 1;
        }
        let mut take = |explicit: &mut Option<usize>| -> Option<&String> {
            match explicit.take() {
                Some(n) => args.get(n - 1),
                None => {
                    next_arg += 1;
                    args.get(next_arg - 1)
                }
            }
        };
        if i < b.len() && b[i] == b'*' {
            let w = int(take(&mut None));
            if w < 0 {
                spec.left = true;
            }
            spec.width = (w.unsigned_abs() as usize).min(MAX_WIDTH);
            i += 1;
        } else {
            let j = digits_end(i);
            spec.width = fmt[i..j].parse::<usize>().unwrap_or(0).min(MAX_WIDTH);
            i = j;
        }
        if i < b.len() && b[i] == b'.' {
            i += 1;
            if i < b.len() && b[i] == b'*' {
                let p = int(take(&mut None));
                spec.precision = (p >= 0).then(|| (p as usize).min(MAX_WIDTH));
                i += 1;
            } else {
                let j = digits_end(i);
                spec.precision = Some(fmt[i..j].parse::<usize>().unwrap_or(0).min(MAX_WIDTH));
                i = j;
            }
        }
        while i < b.len() && matches!(b[i], b'h' | b'l' | b'q' | b'L' | b'V') {
            i += 1;
        }
        let Some(conv) = fmt[i.min(fmt.len())..].chars().next() else {
            // A lone conversion at the end: copied.
            out.push_str(&fmt[start..]);
            plain = b.len();
            break;
        };
        let text = match conv {
            '%' => "%".to_string(),
            'c' => {
                let c = char::from_u32(int(take(&mut explicit)).clamp(0, 0x10ffff) as u32)
                    .unwrap_or('\u{fffd}');
                pad(&spec, "", &c.to_string(), false)
            }
            's' => {
                let s = take(&mut explicit).cloned().unwrap_or_default();
                let s: String = match spec.precision {
                    Some(p) => s.chars().take(p).collect(),
                    None => s,
                };
                pad(&spec, "", &s, false)
            }
            'd' | 'i' | 'u' | 'o' | 'x' | 'X' | 'b' | 'B' => {
                integer(&spec, conv, take(&mut explicit))
            }
            'e' | 'E' | 'f' | 'F' | 'g' | 'G' => float(&spec, conv, num(take(&mut explicit))),
            _ => fmt[start..i + conv.len_utf8()].to_string(),
        };
        out.push_str(&text);
        i += conv.len_utf8();
        plain = i;
    }
    if plain < b.len() {
        out.push_str(&fmt[plain..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(fmt: &str, args: &[&str]) -> String {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        sprintf(fmt, &args)
    }

    /// Expected values printed by `perl -e 'printf …'` (perl 5.36).
    #[test]
    fn like_perl() {
        assert_eq!(
            f("%05d|%s|%-4s|%.2f", &["42", "ab", "c", "3.14159"]),
            "00042|ab|c   |3.14"
        );
        assert_eq!(
            f("%x %X %o %b %#x %#o", &["255", "255", "8", "5", "255", "8"]),
            "ff FF 10 101 0xff 010"
        );
        assert_eq!(f("%+d % d %d", &["5", "5", "-5"]), "+5  5 -5");
        assert_eq!(
            f(
                "%5.1f|%-8.3e|%g|%g|%g",
                &["3.14159", "1234.5", "0.0001", "1e20", "100"]
            ),
            "  3.1|1.234e+03|0.0001|1e+20|100"
        );
        assert_eq!(
            f("%.3s|%5s|%-5s|", &["abcdef", "ab", "ab"]),
            "abc|   ab|ab   |"
        );
        assert_eq!(f("%c%c", &["65", "97"]), "Aa");
        assert_eq!(f("100%%", &[]), "100%");
        assert_eq!(f("%d %s|", &[]), "0 |");
        assert_eq!(f("%2$s %1$s", &["a", "b"]), "b a");
        assert_eq!(f("%*d|%-*d|", &["4", "1", "3", "2"]), "   1|2  |");
        assert_eq!(f("%d", &["3.9"]), "3");
        assert_eq!(f("%d", &["-3.9"]), "-3");
        assert_eq!(f("%u", &["-1"]), "18446744073709551615");
        assert_eq!(f("%.0f %.0f", &["0.5", "1.5"]), "0 2");
        assert_eq!(f("%y %", &[]), "%y %");
        assert_eq!(f("%.3d", &["7"]), "007");
        assert_eq!(f("%G", &["0.000001234"]), "1.234E-06");
        assert_eq!(f("%s", &["äö"]), "äö");
    }

    #[test]
    fn bounded() {
        assert_eq!(f("%999999999d", &["1"]).len(), MAX_WIDTH);
    }
}
