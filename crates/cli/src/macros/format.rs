//! MARS's number formatting, as its perl `marsadm` prints: `number2human`, `seconds2human`,
//! `progress_bar`, and perl's own way of printing a number (`%.15g`).

/// A number as perl prints it: an integer without a fraction, else 15 significant digits
/// with trailing zeros dropped (`7.8125`, `27.4755859375`).
pub fn perl_num(f: f64) -> String {
    if !f.is_finite() {
        return if f.is_nan() {
            "NaN".into()
        } else {
            "Inf".into()
        };
    }
    if f.fract() == 0.0 && f.abs() < 1e15 {
        return format!("{}", f as i64);
    }
    let exp = f.abs().log10().floor() as i32;
    if !(-5..15).contains(&exp) {
        return format!("{f:e}");
    }
    let decimals = (14 - exp).max(0) as usize;
    let s = format!("{f:.decimals$}");
    let s = s.trim_end_matches('0');
    s.trim_end_matches('.').to_string()
}

/// MARS's `number2human` over a list: every number in the unit the largest one calls for
/// (`K` from 1 KiB, `M` from 1 MiB, `G` and `T` only from 9.99 of them), three decimals
/// (bytes as integers). Returns the numbers and the unit (`MiB`, `B` …).
pub fn human_numbers(nums: &[f64]) -> (Vec<String>, &'static str) {
    const K: f64 = 1024.0;
    const FLIP: f64 = 9.99;
    let max = nums.iter().copied().fold(0.0, f64::max);
    let (div, unit) = if max >= K * K * K * K * FLIP {
        (K * K * K * K, "TiB")
    } else if max >= K * K * K * FLIP {
        (K * K * K, "GiB")
    } else if max >= K * K {
        (K * K, "MiB")
    } else if max >= K {
        (K, "KiB")
    } else {
        (1.0, "B")
    };
    let out = nums
        .iter()
        .map(|n| {
            if div == 1.0 {
                // perl: int($number + 0.1)
                format!("{}", (n + 0.1).trunc() as i64)
            } else {
                format!("{:.3}", n / div)
            }
        })
        .collect();
    (out, unit)
}

/// `%human-numbers{}{DELIM}{UNIT_DELIM}{N…}`: the numbers joined by `delim`, then the unit.
pub fn human_join(nums: &[f64], delim: &str, unit_delim: &str) -> String {
    let (v, u) = human_numbers(nums);
    format!("{}{unit_delim}{u}", v.join(delim))
}

/// MARS's `seconds2human`: `hh:mm:ss` (hours unbounded), `--:--:--` for a negative
/// (unknown) number of seconds.
pub fn seconds2human(s: f64) -> String {
    if s.is_nan() || s < 0.0 {
        return "--:--:--".into();
    }
    // perl's `%` works on integers; `%02d` truncates.
    let i = s.trunc() as u64;
    format!("{:02}:{:02}:{:02}", i / 3600, (i % 3600) / 60, i % 60)
}

/// MARS's `progress_bar(length, min, mid, max)`: `=` up to `min`, `>`, `:` up to `mid`,
/// `.` to the end; perl's `x` truncates fractional counts.
pub fn progress_bar(len: f64, min: f64, mid: f64, max: f64) -> String {
    let min = min.max(0.0);
    let mid = mid.max(min);
    let max = max.max(mid).max(1.0);
    let rep = |c: &str, n: f64| c.repeat(if n > 0.0 { n.trunc() as usize } else { 0 });
    let mut pos1 = len * min / max;
    let mut bar = rep("=", pos1 - 1.0);
    if pos1 < len {
        bar.push('>');
        pos1 += 1.0;
    }
    let pos2 = len * mid / max;
    if pos1 < pos2 {
        bar += &rep(":", pos2 - pos1);
    }
    if pos2 < len {
        bar += &rep(".", len - pos2);
    }
    format!("[{bar}]")
}

/// `%d` of a perl string: the integer part of its leading number.
pub fn int_of(s: &str) -> i64 {
    s.trim().parse::<f64>().map_or(0, |f| f.trunc() as i64)
}

/// `%.2f` of a perl string.
pub fn f2(s: &str) -> String {
    format!("{:.2}", s.trim().parse::<f64>().unwrap_or(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perl_numbers() {
        assert_eq!(perl_num(7.0), "7");
        assert_eq!(perl_num(-1.0), "-1");
        assert_eq!(perl_num(7.8125), "7.8125");
        assert_eq!(perl_num(100.5 * 280.0 / 1024.0), "27.48046875");
        assert_eq!(perl_num(1.0 / 3.0), "0.333333333333333");
    }

    #[test]
    fn human_as_mars() {
        const MIB: f64 = 1048576.0;
        assert_eq!(
            human_join(&[280.0 * MIB, 1024.0 * MIB], "/", " "),
            "280.000/1024.000 MiB"
        );
        // G only from 9.99 GiB on.
        assert_eq!(human_join(&[9.0 * 1024.0 * MIB], " ", " "), "9216.000 MiB");
        assert_eq!(human_join(&[5.0], "/", " "), "5 B");
        assert_eq!(human_join(&[2048.0], "/", " "), "2.000 KiB");
        assert_eq!(seconds2human(7.8), "00:00:07");
        assert_eq!(seconds2human(-1.0), "--:--:--");
        assert_eq!(seconds2human(360061.0), "100:01:01");
    }

    #[test]
    fn bars_as_mars() {
        // 280 of 1024: 4 '=', '>', 14 '.' (perl truncates 4.47 and 14.53).
        assert_eq!(
            progress_bar(20.0, 280.0, 0.0, 1024.0),
            "[====>..............]"
        );
        assert_eq!(progress_bar(20.0, 0.0, 0.0, 0.0), "[>....................]");
        assert_eq!(
            progress_bar(20.0, 10.0, 10.0, 10.0),
            format!("[{}]", "=".repeat(19))
        );
        // Replayed 2, fetched 6 of 10: '=' '>' then ':' up to the fetch position.
        assert_eq!(progress_bar(20.0, 2.0, 6.0, 10.0), "[===>:::::::........]");
    }
}
