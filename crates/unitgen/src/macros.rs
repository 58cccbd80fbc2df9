//! The `%`-macro language (MARS `parse_macro`/`eval_fn`), as used inside `@eval{…}`.
//!
//! # Grammar (byte level)
//!
//! * Text is copied verbatim, except:
//! * `\c` is an escape: `\t \n \r \f \b \a \e` are the control characters, any other `c` stands
//!   for itself (so `\{`, `\}`, `\%`, `\\` are literal). A trailing lone `\` stays.
//! * `%name{arg1}{arg2}…` is a call. `name` is any run of bytes other than `\`, ASCII
//!   whitespace and `{}()[]` (so `%+`, `%<=`, `%&&`, `%==` are names), and the call needs at
//!   least one `{…}` directly after the name; further `{…}` that follow *immediately* are more
//!   arguments. A `%` not followed by `name{` is literal text (`100% sure`).
//! * Argument bodies nest braces; `\` escapes the next byte while looking for the closing
//!   brace. An unclosed `{` is an error (MARS silently prints it as text instead).
//! * Arguments are passed unevaluated; each macro decides which arguments it evaluates (that is
//!   how `%if` only evaluates one branch and `%protect` none).
//!
//! # Values
//!
//! Everything is a string. Truth is Perl's: `""` and `"0"` are false, everything else is true.
//! Comparisons and `%!` return `1` or `""`. Numbers follow Perl (see [`crate::num`]).
//!
//! # Builtins
//!
//! | macro | meaning |
//! |---|---|
//! | `%{v}` | value of variable `v` (the name is itself expanded); unknown → error |
//! | `%{v}{++}` `%{v}{--}` / `%{++}{v}` `%{--}{v}` | post-/pre-increment |
//! | `%{v}{delim}{i}` | field `i` of `v` split at regex `delim` (`""`/`*` = last) |
//! | `%let{v}{x}` `%append{v}{x}` | assign / append, result `""` |
//! | `%set{v}{delim}{i}{x}` | set field `i` (`""`/`*` = append) |
//! | `%+ %- %* %/ %% %& %\| %^ %<< %>> %min %max` | arithmetic, any number of arguments, left to right |
//! | `%< %<= %> %>= %== %!=` | numeric comparison |
//! | `%lt %le %gt %ge %eq %ne` | string comparison |
//! | `%=~{text}{regex}{opts}` = `%match` | regex match |
//! | `%&& %and %\|\| %or` | short-circuit logic, Perl result values |
//! | `%! %not %~` | negation, bitwise complement |
//! | `%length %toupper %tolower` | strings (bytes, ASCII case mapping like Perl without locale) |
//! | `%subst{text}{regex}{replacement}{opts}` | `s{regex}{replacement}opts`; default opts `m`, i.e. only the **first** match is replaced unless `g` is given; `$1`, `${1}`, `$&` in the replacement |
//! | `%if{c}{then}{else}` `%unless` | conditional |
//! | `%elsif{c1}{t1}{c2}{t2}…{else}` `%elsunless` | chains |
//! | `%while{c}{body}` `%until` `%for{init}{c}{step}{body}` `%foreach{v}{list}{delim}{body}` | loops (bounded by [`MAX_STEPS`]) |
//! | `%protect{x}` | `x` unevaluated |
//! | `%eval{n}{x}` | evaluate `x` n times; `%eval-down{x}` until stable |
//! | `%tmp{x}` | evaluate in a copy of the variables |
//! | `%warn{x}` `%dump-vars{}` | collected as warnings |
//! | `%die{x}` | error |
//!
//! A `primitive-` prefix is accepted and ignored (MARS uses it to bypass user overrides).
//! Not offered: MARS's view primitives (`%is-primary{}` …, they need `/mars`), `%include`/`%call`
//! (need macro files), `%sprintf`, `%human-*`, `%progress`, time and link macros, and the control
//! macros `%return`/`%abort`/`%next`/`%last`/`%stop-eval`. Calling them is an
//! [`MacroError::UnknownMacro`] error.
//!
//! Deviations from MARS, on purpose: an unknown variable is an error (MARS prints a warning and
//! uses `""`); `%min`/`%max` return the minimum/maximum (MARS's code has them swapped); regular
//! expressions are the `regex` crate's dialect (no look-around, no back-references).

use std::collections::BTreeMap;

use regex::{Regex, RegexBuilder};

use crate::error::{ExpandError, MacroError};
use crate::num::Num;

/// Variables visible to `@{…}` and `%{…}`.
pub type Vars = BTreeMap<String, String>;

/// Maximum nesting of evaluation (arguments inside arguments inside …).
pub const MAX_DEPTH: usize = 64;
/// Maximum number of macro calls plus loop iterations in one expansion.
pub const MAX_STEPS: u64 = 1_000_000;
/// Maximum length of any value or result, in bytes.
pub const MAX_LEN: usize = 16 << 20;
/// Maximum field index of `%set`.
pub const MAX_FIELDS: usize = 100_000;

/// Finds the `}` closing the `{` at `open` (byte index), honouring nesting and `\` escapes.
pub(crate) fn find_close(text: &str, open: usize) -> Option<usize> {
    let b = text.as_bytes();
    let mut depth = 0usize;
    let mut i = open;
    while i < b.len() {
        match b[i] {
            // Braces and `\` are ASCII, so skipping one byte never lands inside them even when
            // the escaped character is multi-byte UTF-8.
            b'\\' => i += 1,
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// Every macro name [`Machine`] understands (after stripping a `primitive-` prefix); used by
/// the syntax check, and a test keeps it in sync with the evaluator.
pub const BUILTINS: &[&str] = &[
    "",
    "let",
    "append",
    "set",
    "dump-vars",
    "dump_vars",
    "dumpvars",
    "+",
    "-",
    "*",
    "/",
    "%",
    "&",
    "|",
    "^",
    "<<",
    ">>",
    "min",
    "max",
    "<",
    "<=",
    ">",
    ">=",
    "==",
    "!=",
    "lt",
    "le",
    "gt",
    "ge",
    "eq",
    "ne",
    "=~",
    "match",
    "&&",
    "and",
    "||",
    "or",
    "!",
    "not",
    "~",
    "toupper",
    "tolower",
    "length",
    "subst",
    "if",
    "unless",
    "elsif",
    "elseif",
    "elsunless",
    "elseunless",
    "while",
    "until",
    "for",
    "foreach",
    "protect",
    "eval",
    "eval-down",
    "eval_down",
    "evaldown",
    "tmp",
    "warn",
    "die",
];

fn strip_primitive(name: &str) -> &str {
    name.strip_prefix("primitive")
        .map(|n| n.trim_start_matches(['-', '_']))
        .unwrap_or(name)
}

/// Checks `%`-text without evaluating it: every `{` closes and every called macro exists
/// (arguments are checked recursively, except `%protect`'s, which are data). `base` is the
/// offset of `text` in the caller's text, for the error.
pub(crate) fn check_syntax(text: &str, base: usize, depth: usize) -> Result<(), ExpandError> {
    let err = |at: usize, kind| {
        Err(ExpandError {
            offset: base + at,
            kind,
        })
    };
    if depth > MAX_DEPTH {
        return err(0, MacroError::TooDeep(MAX_DEPTH));
    }
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'%' => {
                let mut j = i + 1;
                while j < b.len() && is_name_byte(b[j]) {
                    j += 1;
                }
                if j >= b.len() || b[j] != b'{' {
                    i += 1;
                    continue;
                }
                let name = strip_primitive(&text[i + 1..j]);
                if !BUILTINS.contains(&name) {
                    return err(i, MacroError::UnknownMacro(name.to_string()));
                }
                let mut k = j;
                while k < b.len() && b[k] == b'{' {
                    let Some(close) = find_close(text, k) else {
                        return err(k, MacroError::UnclosedBrace);
                    };
                    if name != "protect" {
                        check_syntax(&text[k + 1..close], base + k + 1, depth + 1)?;
                    }
                    k = close + 1;
                }
                i = k;
            }
            _ => i += 1,
        }
    }
    Ok(())
}

fn is_name_byte(b: u8) -> bool {
    !(b == b'\\' || b.is_ascii_whitespace() || b == 0x0b || b"{}()[]".contains(&b))
}

fn truth(s: &str) -> bool {
    !(s.is_empty() || s == "0")
}

fn boolean(b: bool) -> String {
    if b { "1" } else { "" }.to_string()
}

/// The evaluator state for one expansion.
pub(crate) struct Machine<'a> {
    pub vars: &'a mut Vars,
    pub warnings: &'a mut Vec<String>,
    /// The outermost text, to turn slices back into offsets for error messages.
    origin: &'a str,
    /// Offset of `origin` in the caller's text.
    base: usize,
    /// Offset reported when an error is in computed text (not a slice of `origin`).
    fallback: usize,
    steps: u64,
    depth: usize,
}

impl<'a> Machine<'a> {
    pub fn new(
        vars: &'a mut Vars,
        warnings: &'a mut Vec<String>,
        origin: &'a str,
        base: usize,
    ) -> Self {
        Machine {
            vars,
            warnings,
            origin,
            base,
            fallback: base,
            steps: 0,
            depth: 0,
        }
    }

    /// Offset of `pos` inside slice `s`, in the caller's text when `s` is part of `origin`.
    fn offset(&self, s: &str, pos: usize) -> usize {
        let start = self.origin.as_ptr() as usize;
        let p = s.as_ptr() as usize;
        if p >= start && p + s.len() <= start + self.origin.len() {
            self.base + (p - start) + pos
        } else {
            self.fallback
        }
    }

    fn err(&self, s: &str, pos: usize, kind: MacroError) -> ExpandError {
        ExpandError {
            offset: self.offset(s, pos),
            kind,
        }
    }

    fn step(&mut self, s: &str, pos: usize) -> Result<(), ExpandError> {
        self.steps += 1;
        if self.steps > MAX_STEPS {
            return Err(self.err(s, pos, MacroError::TooManySteps(MAX_STEPS)));
        }
        Ok(())
    }

    fn check_len(&self, s: &str, pos: usize, v: &str) -> Result<(), ExpandError> {
        if v.len() > MAX_LEN {
            return Err(self.err(s, pos, MacroError::TooLong(MAX_LEN)));
        }
        Ok(())
    }

    /// Evaluates `text` (the grammar in the module docs).
    pub fn parse(&mut self, text: &str) -> Result<String, ExpandError> {
        if self.depth >= MAX_DEPTH {
            return Err(self.err(text, 0, MacroError::TooDeep(MAX_DEPTH)));
        }
        self.depth += 1;
        let r = self.parse_inner(text);
        self.depth -= 1;
        r
    }

    fn parse_inner(&mut self, text: &str) -> Result<String, ExpandError> {
        let b = text.as_bytes();
        let mut out = String::new();
        let mut i = 0;
        let mut plain = 0; // start of pending verbatim text
        while i < b.len() {
            match b[i] {
                b'\\' if i + 1 < b.len() => {
                    out.push_str(&text[plain..i]);
                    let c = text[i + 1..].chars().next().unwrap_or('\\');
                    let mapped = match c {
                        't' => '\t',
                        'n' => '\n',
                        'r' => '\r',
                        'f' => '\x0c',
                        'b' => '\x08',
                        'a' => '\x07',
                        'e' => '\x1b',
                        c => {
                            if c.is_ascii_alphabetic() {
                                self.warnings.push(format!(
                                    "control sequence '\\{c}' is reserved for future use"
                                ));
                            }
                            c
                        }
                    };
                    out.push(mapped);
                    i += 1 + c.len_utf8();
                    plain = i;
                }
                b'%' => {
                    let mut j = i + 1;
                    while j < b.len() && is_name_byte(b[j]) {
                        j += 1;
                    }
                    if j >= b.len() || b[j] != b'{' {
                        i += 1;
                        continue;
                    }
                    out.push_str(&text[plain..i]);
                    let name = &text[i + 1..j];
                    let mut args = Vec::new();
                    let mut k = j;
                    while k < b.len() && b[k] == b'{' {
                        let close = find_close(text, k)
                            .ok_or_else(|| self.err(text, k, MacroError::UnclosedBrace))?;
                        args.push(&text[k + 1..close]);
                        k = close + 1;
                    }
                    self.step(text, i)?;
                    let saved = self.fallback;
                    // Errors in computed text are reported at the outermost call we can place.
                    if self.offset(text, i) != self.fallback || self.depth == 1 {
                        self.fallback = self.offset(text, i);
                    }
                    let r = self.call(name, &args, text, i);
                    self.fallback = saved;
                    let r = r?;
                    out.push_str(&r);
                    self.check_len(text, i, &out)?;
                    i = k;
                    plain = i;
                }
                _ => i += 1,
            }
        }
        out.push_str(&text[plain..]);
        Ok(out)
    }

    /// Evaluated argument `i`, `""` when absent (Perl's `parse_macro(undef)`).
    fn arg(&mut self, args: &[&str], i: usize) -> Result<String, ExpandError> {
        match args.get(i) {
            Some(a) => self.parse(a),
            None => Ok(String::new()),
        }
    }

    fn num(&mut self, args: &[&str], i: usize) -> Result<Num, ExpandError> {
        Ok(Num::parse(&self.arg(args, i)?))
    }

    fn regex(
        &self,
        pattern: &str,
        opts: &str,
        name: &str,
        s: &str,
        pos: usize,
    ) -> Result<Regex, ExpandError> {
        let mut builder = RegexBuilder::new(pattern);
        // Bounded so that hostile templates cannot blow up memory.
        builder.size_limit(1 << 20).dfa_size_limit(1 << 20);
        for c in opts.chars() {
            match c {
                'i' => builder.case_insensitive(true),
                'm' => builder.multi_line(true),
                's' => builder.dot_matches_new_line(true),
                'x' => builder.ignore_whitespace(true),
                // `g` is handled by the caller; `o` is a Perl no-op.
                'g' | 'o' => &mut builder,
                c => {
                    return Err(self.err(
                        s,
                        pos,
                        MacroError::BadArgument {
                            name: name.to_string(),
                            message: format!("unsupported regex option '{c}'"),
                        },
                    ))
                }
            };
        }
        builder.build().map_err(|e| {
            self.err(
                s,
                pos,
                MacroError::BadRegex {
                    regex: pattern.to_string(),
                    message: e.to_string(),
                },
            )
        })
    }

    /// Perl's `split($delim, $text)`: `" "` splits on whitespace runs (awk mode), anything else
    /// is a regex; trailing empty fields are dropped.
    fn split(
        &self,
        delim: &str,
        text: &str,
        name: &str,
        s: &str,
        pos: usize,
    ) -> Result<Vec<String>, ExpandError> {
        let mut fields: Vec<String> = if delim == " " {
            text.split_ascii_whitespace().map(str::to_string).collect()
        } else if delim.is_empty() {
            text.chars().map(|c| c.to_string()).collect()
        } else {
            let re = self.regex(delim, "", name, s, pos)?;
            re.split(text).map(str::to_string).collect()
        };
        while fields.last().is_some_and(|f| f.is_empty()) {
            fields.pop();
        }
        Ok(fields)
    }

    fn get_var(&self, name: &str, s: &str, pos: usize) -> Result<String, ExpandError> {
        self.vars
            .get(name)
            .cloned()
            .ok_or_else(|| self.err(s, pos, MacroError::UnknownVariable(name.to_string())))
    }

    fn bump(&mut self, name: &str, op: &str) {
        let old = Num::parse(self.vars.get(name).map(String::as_str).unwrap_or(""));
        let new = if op == "++" {
            old.plus(Num::Int(1))
        } else {
            old.minus(Num::Int(1))
        };
        self.vars.insert(name.to_string(), new.to_string());
    }

    fn set_var(
        &mut self,
        name: String,
        value: String,
        s: &str,
        pos: usize,
    ) -> Result<(), ExpandError> {
        self.check_len(s, pos, &value)?;
        self.vars.insert(name, value);
        Ok(())
    }

    /// One macro call. `s`/`pos` locate the `%` for error messages.
    fn call(
        &mut self,
        name: &str,
        args: &[&str],
        s: &str,
        pos: usize,
    ) -> Result<String, ExpandError> {
        let name = strip_primitive(name);
        let missing = |m: &Self, index: usize| {
            m.err(
                s,
                pos,
                MacroError::MissingArgument {
                    name: name.to_string(),
                    index,
                },
            )
        };
        match name {
            "" => self.call_var(args, s, pos),
            "let" | "append" => {
                let var = self.arg(args, 0)?;
                let value = self.arg(args, 1)?;
                let value = if name == "append" {
                    let mut old = self.vars.get(&var).cloned().unwrap_or_default();
                    old.push_str(&value);
                    old
                } else {
                    value
                };
                self.set_var(var, value, s, pos)?;
                Ok(String::new())
            }
            "set" => {
                let var = self.arg(args, 0)?;
                let delim = self.arg(args, 1)?;
                let index = self.arg(args, 2)?;
                let value = self.arg(args, 3)?;
                let old = self.vars.get(&var).cloned().unwrap_or_default();
                let mut list = self.split(&delim, &old, name, s, pos)?;
                let i = if index.is_empty() || index == "*" {
                    list.len()
                } else {
                    let n = Num::parse(&index).as_f64();
                    if n < 0.0 {
                        (list.len() as f64 + n).max(0.0) as usize
                    } else {
                        n as usize
                    }
                };
                // `%set{v}{,}{99999999}{x}` would allocate that many empty fields.
                if i > MAX_FIELDS {
                    return Err(self.err(s, pos, MacroError::TooLong(MAX_FIELDS)));
                }
                if list.len() <= i {
                    list.resize(i + 1, String::new());
                }
                list[i] = value;
                let joined = list.join(&delim);
                self.set_var(var, joined, s, pos)?;
                Ok(String::new())
            }
            "dump-vars" | "dump_vars" | "dumpvars" => {
                let dump: Vec<String> = self
                    .vars
                    .iter()
                    .map(|(k, v)| format!("{k}='{v}'"))
                    .collect();
                self.warnings.extend(dump);
                Ok(String::new())
            }
            "+" | "-" | "*" | "/" | "%" | "&" | "|" | "^" | "<<" | ">>" | "min" | "max" => {
                let mut acc = self.num(args, 0)?;
                for i in 1..args.len() {
                    let o = self.num(args, i)?;
                    acc = match name {
                        "+" => acc.plus(o),
                        "-" => acc.minus(o),
                        "*" => acc.times(o),
                        "/" => acc
                            .divide(o)
                            .ok_or_else(|| self.err(s, pos, MacroError::DivisionByZero))?,
                        "%" => acc
                            .modulo(o)
                            .ok_or_else(|| self.err(s, pos, MacroError::DivisionByZero))?,
                        "&" => acc.bits(o, |a, b| a & b),
                        "|" => acc.bits(o, |a, b| a | b),
                        "^" => acc.bits(o, |a, b| a ^ b),
                        "<<" => acc.shift_left(o),
                        ">>" => acc.shift_right(o),
                        "min" if o.compare(acc) == Some(std::cmp::Ordering::Less) => o,
                        "max" if o.compare(acc) == Some(std::cmp::Ordering::Greater) => o,
                        _ => acc,
                    };
                }
                Ok(acc.to_string())
            }
            "<" | "<=" | ">" | ">=" | "==" | "!=" => {
                use std::cmp::Ordering::*;
                let a = self.num(args, 0)?;
                let b = self.num(args, 1)?;
                let ord = a.compare(b);
                Ok(boolean(match name {
                    "<" => ord == Some(Less),
                    "<=" => matches!(ord, Some(Less | Equal)),
                    ">" => ord == Some(Greater),
                    ">=" => matches!(ord, Some(Greater | Equal)),
                    "==" => ord == Some(Equal),
                    _ => ord != Some(Equal),
                }))
            }
            "lt" | "le" | "gt" | "ge" | "eq" | "ne" => {
                let a = self.arg(args, 0)?;
                let b = self.arg(args, 1)?;
                Ok(boolean(match name {
                    "lt" => a < b,
                    "le" => a <= b,
                    "gt" => a > b,
                    "ge" => a >= b,
                    "eq" => a == b,
                    _ => a != b,
                }))
            }
            "=~" | "match" => {
                let text = self.arg(args, 0)?;
                let re = self.arg(args, 1)?;
                let opts = if args.len() > 2 {
                    self.arg(args, 2)?
                } else {
                    "m".to_string()
                };
                let re = self.regex(&re, &opts, name, s, pos)?;
                Ok(boolean(re.is_match(&text)))
            }
            "&&" | "and" | "||" | "or" => {
                let and = name == "&&" || name == "and";
                let mut acc = self.arg(args, 0)?;
                for raw in &args[1.min(args.len())..] {
                    // Perl's `while (my $next_arg = shift)` stops at a false *unevaluated*
                    // argument; kept for compatibility.
                    if !truth(raw) {
                        break;
                    }
                    if and && !truth(&acc) {
                        return Ok("0".to_string());
                    }
                    if !and && truth(&acc) {
                        return Ok("1".to_string());
                    }
                    acc = self.parse(raw)?;
                }
                Ok(acc)
            }
            "!" | "not" => Ok(boolean(!truth(&self.arg(args, 0)?))),
            "~" => Ok((!self.num(args, 0)?.as_u64()).to_string()),
            "toupper" => Ok(self.arg(args, 0)?.to_ascii_uppercase()),
            "tolower" => Ok(self.arg(args, 0)?.to_ascii_lowercase()),
            "length" => Ok(self.arg(args, 0)?.len().to_string()),
            "subst" => {
                let text = self.arg(args, 0)?;
                let re = self.arg(args, 1)?;
                let repl = self.arg(args, 2)?;
                let opts = if args.len() > 3 {
                    self.arg(args, 3)?
                } else {
                    "m".to_string()
                };
                let re = self.regex(&re, &opts, name, s, pos)?;
                let limit = if opts.contains('g') { 0 } else { 1 };
                let mut out = String::new();
                let mut last = 0;
                for (n, caps) in re.captures_iter(&text).enumerate() {
                    if limit != 0 && n >= limit {
                        break;
                    }
                    let m = caps.get(0).expect("group 0 always exists");
                    out.push_str(&text[last..m.start()]);
                    perl_replacement(&repl, &caps, &mut out);
                    last = m.end();
                    self.check_len(s, pos, &out)?;
                }
                out.push_str(&text[last..]);
                Ok(out)
            }
            "if" | "unless" => {
                let mut cond = truth(&self.arg(args, 0)?);
                if name == "unless" {
                    cond = !cond;
                }
                if cond {
                    if args.len() < 2 {
                        return Err(missing(self, 2));
                    }
                    self.arg(args, 1)
                } else {
                    self.arg(args, 2)
                }
            }
            "elsif" | "elseif" | "elsunless" | "elseunless" => {
                let unless = name.ends_with("unless");
                let mut i = 0;
                while i < args.len() {
                    if i + 1 >= args.len() {
                        // An odd trailing argument is the final "else".
                        return self.arg(args, i);
                    }
                    let mut cond = truth(&self.arg(args, i)?);
                    if unless {
                        cond = !cond;
                    }
                    if cond {
                        return self.arg(args, i + 1);
                    }
                    i += 2;
                }
                Ok(String::new())
            }
            "while" | "until" => {
                let until = name == "until";
                let mut out = String::new();
                loop {
                    self.step(s, pos)?;
                    if truth(&self.arg(args, 0)?) == until {
                        break;
                    }
                    out.push_str(&self.arg(args, 1)?);
                    self.check_len(s, pos, &out)?;
                }
                Ok(out)
            }
            "for" => {
                let mut out = String::new();
                self.arg(args, 0)?;
                loop {
                    self.step(s, pos)?;
                    if !truth(&self.arg(args, 1)?) {
                        break;
                    }
                    out.push_str(&self.arg(args, 3)?);
                    self.check_len(s, pos, &out)?;
                    self.arg(args, 2)?;
                }
                Ok(out)
            }
            "foreach" => {
                let var = self.arg(args, 0)?;
                let list = self.arg(args, 1)?;
                let delim = self.arg(args, 2)?;
                let mut out = String::new();
                for value in self.split(&delim, &list, name, s, pos)? {
                    self.step(s, pos)?;
                    self.vars.insert(var.clone(), value);
                    out.push_str(&self.arg(args, 3)?);
                    self.check_len(s, pos, &out)?;
                }
                Ok(out)
            }
            "protect" => Ok(args.first().copied().unwrap_or("").to_string()),
            "eval" => {
                let count = self.num(args, 0)?.as_f64();
                let mut text = args.get(1).copied().unwrap_or("").to_string();
                let mut n = 0.0;
                while n < count {
                    self.step(s, pos)?;
                    text = self.parse(&text)?;
                    n += 1.0;
                }
                Ok(text)
            }
            "eval-down" | "eval_down" | "evaldown" => {
                let mut text = args.first().copied().unwrap_or("").to_string();
                loop {
                    self.step(s, pos)?;
                    let next = self.parse(&text)?;
                    if next == text {
                        return Ok(next);
                    }
                    text = next;
                }
            }
            "tmp" => {
                let saved = self.vars.clone();
                let r = self.arg(args, 0);
                *self.vars = saved;
                r
            }
            "warn" => {
                let msg = self.arg(args, 0)?;
                self.warnings.push(msg);
                Ok(String::new())
            }
            "die" => {
                let msg = self.arg(args, 0)?;
                Err(self.err(s, pos, MacroError::Die(msg)))
            }
            _ => Err(self.err(s, pos, MacroError::UnknownMacro(name.to_string()))),
        }
    }

    /// `%{…}`: variable access with increments and CSV fields.
    fn call_var(&mut self, args: &[&str], s: &str, pos: usize) -> Result<String, ExpandError> {
        let first = args.first().copied().unwrap_or("");
        let mut rest = &args[1.min(args.len())..];
        let var = if first == "++" || first == "--" {
            let var = self.arg(rest, 0)?;
            self.bump(&var, first);
            rest = &rest[1.min(rest.len())..];
            var
        } else {
            self.parse(first)?
        };
        let mut value = self.get_var(&var, s, pos)?;
        if let Some(&op) = rest.first() {
            if op == "++" || op == "--" {
                self.bump(&var, op);
                rest = &rest[1..];
            }
        }
        if rest.len() >= 2 {
            let delim = self.parse(rest[0])?;
            let index = self.parse(rest[1])?;
            let list = self.split(&delim, &value, "", s, pos)?;
            let i = if index.is_empty() || index == "*" {
                list.len() as f64 - 1.0
            } else {
                let n = Num::parse(&index).as_f64();
                if n < 0.0 {
                    list.len() as f64 + n
                } else {
                    n
                }
            };
            value = if i >= 0.0 {
                list.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            };
        }
        Ok(value)
    }
}

/// Perl replacement text of `s{…}{repl}`: `$N`, `${N}` and `$&` refer to the match; everything
/// else is literal (backslash escapes were already handled by the macro layer).
fn perl_replacement(repl: &str, caps: &regex::Captures<'_>, out: &mut String) {
    let b = repl.as_bytes();
    let mut i = 0;
    let mut plain = 0;
    while i < b.len() {
        if b[i] != b'$' || i + 1 >= b.len() {
            i += 1;
            continue;
        }
        let (group, end) = if b[i + 1] == b'&' {
            (Some(0), i + 2)
        } else if b[i + 1].is_ascii_digit() {
            let mut j = i + 1;
            while j < b.len() && b[j].is_ascii_digit() {
                j += 1;
            }
            (repl[i + 1..j].parse::<usize>().ok(), j)
        } else if b[i + 1] == b'{' {
            match repl[i + 2..].find('}') {
                Some(rel) => (repl[i + 2..i + 2 + rel].parse::<usize>().ok(), i + 3 + rel),
                None => (None, i + 1),
            }
        } else {
            (None, i + 1)
        };
        match group {
            Some(g) => {
                out.push_str(&repl[plain..i]);
                out.push_str(caps.get(g).map_or("", |m| m.as_str()));
                i = end;
                plain = i;
            }
            None => i += 1,
        }
    }
    out.push_str(&repl[plain..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(text: &str, vars: &mut Vars) -> Result<String, ExpandError> {
        let mut warnings = Vec::new();
        Machine::new(vars, &mut warnings, text, 0).parse(text)
    }

    fn ev(text: &str) -> String {
        let mut vars = Vars::from([("res".to_string(), "my-res".to_string())]);
        run(text, &mut vars).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn kind(text: &str) -> MacroError {
        let mut vars = Vars::new();
        run(text, &mut vars).unwrap_err().kind
    }

    #[test]
    fn text_and_escapes() {
        assert_eq!(ev("plain text"), "plain text");
        assert_eq!(ev("a\\tb\\nc"), "a\tb\nc");
        assert_eq!(ev("\\{\\}\\%\\\\"), "{}%\\");
        assert_eq!(ev("100% sure"), "100% sure");
        assert_eq!(ev("50%"), "50%");
        assert_eq!(ev("trailing\\"), "trailing\\");
        assert_eq!(ev("ä\\ö"), "äö");
    }

    #[test]
    fn variables() {
        assert_eq!(ev("%{res}"), "my-res");
        assert_eq!(ev("%let{x}{1}%{x}"), "1");
        assert_eq!(ev("%let{x}{a}%append{x}{b}%{x}"), "ab");
        assert_eq!(ev("%let{n}{r}%let{v}{%{%{n}es}}%{v}"), "my-res");
        assert_eq!(ev("%let{i}{5}%{i}{++}%{i}"), "56");
        assert_eq!(ev("%let{i}{5}%{++}{i}"), "6");
        assert_eq!(ev("%let{i}{5}%{i}{--}%{--}{i}"), "53");
        assert_eq!(ev("%let{l}{a,b,c}%{l}{,}{1}%{l}{,}{*}%{l}{,}{-3}"), "bca");
        assert_eq!(
            ev("%let{l}{a,b}%set{l}{,}{*}{c}%set{l}{,}{0}{A}%{l}"),
            "A,b,c"
        );
        assert_eq!(kind("%{nope}"), MacroError::UnknownVariable("nope".into()));
    }

    #[test]
    fn arithmetic_and_comparison() {
        assert_eq!(ev("%+{2}{3}"), "5");
        assert_eq!(ev("%*{7}{%+{2}{3}}"), "35");
        assert_eq!(ev("%-{10}{1}{2}"), "7");
        assert_eq!(ev("%/{7}{2}"), "3.5");
        assert_eq!(ev("%%{-7}{3}"), "2");
        assert_eq!(ev("%&{12}{10}%|{12}{3}%^{5}{1}"), "8154");
        assert_eq!(ev("%<<{1}{10}%>>{1024}{3}"), "1024128");
        assert_eq!(ev("%min{3}{1}{2}%max{3}{9}{2}"), "19");
        assert_eq!(
            ev("%<{1}{2}|%<{2}{1}|%<={2}{2}|%>{3}{2}|%>={1}{2}|%=={1.0}{1}|%!={1}{1}"),
            "1||1|1||1|"
        );
        assert_eq!(
            ev("%lt{a}{b}%gt{a}{b}%eq{x}{x}%ne{x}{x}%le{b}{b}%ge{a}{b}"),
            "111"
        );
        assert_eq!(ev("%=~{my-res}{^my-}%match{abc}{B}%match{abc}{B}{i}"), "11");
        assert_eq!(kind("%/{1}{0}"), MacroError::DivisionByZero);
        assert_eq!(kind("%%{1}{0}"), MacroError::DivisionByZero);
    }

    #[test]
    fn logic() {
        assert_eq!(ev("%&&{1}{2}"), "2");
        assert_eq!(ev("%and{0}{%die{never}}"), "0");
        assert_eq!(ev("%||{0}{x}"), "x");
        assert_eq!(ev("%or{y}{%die{never}}"), "1");
        assert_eq!(ev("%!{0}%not{1}|%!{}"), "1|1");
        assert_eq!(ev("%~{0}"), "18446744073709551615");
    }

    #[test]
    fn strings() {
        assert_eq!(ev("%length{my-res}%toupper{aä}%tolower{AB}"), "6Aäab");
        assert_eq!(ev("%subst{mnt-test-x}{-}{/}"), "mnt/test-x");
        assert_eq!(ev("%subst{mnt-test-x}{-}{/}{g}"), "mnt/test/x");
        assert_eq!(ev("%subst{abc}{(b)}{[$1]}"), "a[b]c");
        assert_eq!(ev("%subst{abc}{B}{x}{i}"), "axc");
        assert_eq!(ev("%subst{abc}{b}{${0}$&}"), "abbc");
        // `\.` is consumed by the macro layer (as in MARS), `\\.` reaches the regex.
        assert_eq!(ev("%subst{a.b}{\\.}{-}"), "-.b");
        assert_eq!(ev("%subst{a.b}{\\\\.}{-}"), "a-b");
        assert!(matches!(
            kind("%subst{a}{(}{b}"),
            MacroError::BadRegex { .. }
        ));
        assert!(matches!(
            kind("%subst{a}{a}{b}{q}"),
            MacroError::BadArgument { .. }
        ));
    }

    #[test]
    fn control() {
        assert_eq!(ev("%if{1}{yes}{no}%if{0}{yes}{no}%if{}{yes}"), "yesno");
        assert_eq!(ev("%unless{0}{u}"), "u");
        assert_eq!(
            ev("%elsif{0}{a}{1}{b}{c}%elsif{0}{a}{0}{b}{c}%elsif{0}{a}"),
            "bc"
        );
        assert_eq!(ev("%elsunless{1}{a}{0}{b}"), "b");
        assert_eq!(ev("%let{i}{0}%while{%<{%{i}}{3}}{%{i}{++}}"), "012");
        assert_eq!(ev("%let{i}{0}%until{%=={%{i}}{3}}{%{i}{++}}"), "012");
        assert_eq!(
            ev("%for{%let{i}{0}}{%<{%{i}}{3}}{%{i}{++}}{<%{i}>}"),
            "<0><1><2>"
        );
        assert_eq!(
            ev("%foreach{x}{a b  c}{ }{[%{x}]}%foreach{x}{1,2,}{,}{%{x}}"),
            "[a][b][c]12"
        );
        assert_eq!(ev("%protect{%{res}}"), "%{res}");
        assert_eq!(ev("%eval{1}{%protect{%{res}}}"), "%{res}");
        assert_eq!(ev("%let{p}{%protect{%{res}}}%eval{2}{%{p}}"), "my-res");
        assert_eq!(ev("%eval-down{%protect{%protect{x}}}"), "x");
        assert_eq!(ev("%let{x}{1}%tmp{%let{x}{2}%{x}}%{x}"), "21");
        assert_eq!(ev("%primitive-length{abc}"), "3");
        assert_eq!(kind("%die{boom}"), MacroError::Die("boom".into()));
        assert_eq!(
            kind("%if{1}"),
            MacroError::MissingArgument {
                name: "if".into(),
                index: 2
            }
        );
        assert_eq!(kind("%while{1}{}"), MacroError::TooManySteps(MAX_STEPS));
        assert_eq!(
            kind("%is-primary{}"),
            MacroError::UnknownMacro("is-primary".into())
        );
    }

    #[test]
    fn errors_have_offsets() {
        let mut vars = Vars::new();
        let e = run("ok\n%let{x}{%{missing}}", &mut vars).unwrap_err();
        assert_eq!(e.offset, 11);
        let e = run("ab%if{1}{x", &mut vars).unwrap_err();
        assert_eq!((e.offset, e.kind), (8, MacroError::UnclosedBrace));
        let e = run("%let{x}{%{y}{", &mut vars).unwrap_err();
        assert_eq!(e.kind, MacroError::UnclosedBrace);
    }

    #[test]
    fn builtins_list_matches_evaluator() {
        for name in BUILTINS {
            let mut vars = Vars::from([(String::new(), "v".to_string())]);
            let text = format!("%{name}{{}}{{1}}{{1}}{{}}");
            let r = run(&text, &mut vars);
            assert!(
                !matches!(
                    r,
                    Err(ExpandError {
                        kind: MacroError::UnknownMacro(_),
                        ..
                    })
                ),
                "{name}"
            );
        }
    }

    #[test]
    fn syntax_check() {
        assert!(check_syntax("%if{%eq{a}{b}}{%{x}}{\\{}", 0, 0).is_ok());
        assert!(check_syntax("%protect{%nosuch{}}", 0, 0).is_ok());
        let e = check_syntax("ab\n%if{1}{%nosuch{}}", 10, 0).unwrap_err();
        assert_eq!(
            (e.offset, e.kind),
            (10 + 10, MacroError::UnknownMacro("nosuch".into()))
        );
        let e = check_syntax("%if{1}{x", 0, 0).unwrap_err();
        assert_eq!((e.offset, e.kind), (6, MacroError::UnclosedBrace));
    }

    #[test]
    fn limits() {
        let deep = "%length{".repeat(200) + &"}".repeat(200);
        assert_eq!(kind(&deep), MacroError::TooDeep(MAX_DEPTH));
        let grow = "%let{x}{ab}%while{1}{%let{x}{%{x}%{x}}}";
        assert_eq!(kind(grow), MacroError::TooLong(MAX_LEN));
    }
}
