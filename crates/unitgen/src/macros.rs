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
//! | `%sprintf{fmt}{a}…` (any name ending in `printf`) | Perl's `sprintf` ([`crate::sprintf`]); the format is **not** evaluated |
//! | `%human-seconds{n}` `%human-numbers{unit}{delim}{unit-delim}{n}…` `%progress{len}{min}{mid}{max}` | MARS's number formats |
//! | `%time{}` `%real-time{}` | now (`SECS.NANOS`, `SECS`) |
//! | `%readlink{path}` `%get-glob{pattern}{var}{delim}` `%foreach-glob{pattern}{var}{body}` | symlinks and Perl's `glob` ([`crate::fs::glob`]) |
//! | `%include{NAME}{args…}` `%call{NAME}{args…}` | a macro file, in the same scope / a copy of the variables |
//! | `%callstack{}` | the `callstack` variable |
//! | `%abort{}` `%return{}` `%stop-eval{}` | set the variable of that name to 1 (that is all they do in MARS) |
//! | `%next{}` `%last{}` | set the variable and end the text being evaluated at its next call (MARS's `__return__`) |
//!
//! `%warn…` (any name starting with `warn`) is `%warn`. MARS spells most multi-word names with
//! optional separators: `%human_seconds`, `%humanseconds` work too.
//!
//! # Macro files, view macros
//!
//! Any other name is looked up as MARS's `eval_fn` does: first a user macro file `NAME.tpl`
//! ([`Context::macros`]; it even overrides a builtin, `%primitive-NAME{}` bypasses it), run in
//! the caller's scope with `0` = the name, `1`, `2`, … = the evaluated arguments, `callstack`
//! extended by `,NAME` (restored after the call). Then MARS's view macros
//! ([`crate::view`]): the ones a [`View`] answers give its value, the others are
//! [`MacroError::Unavailable`] with the reason (state the generator is not given, `%setlink`
//! would change state, `%sleep`/`%wait-…` would block, the complex macros print status pages).
//! Anything else is [`MacroError::UnknownMacro`] (MARS dies there too).
//!
//! An unset variable is `""` in `%{…}` (as in MARS; `@{…}` writes `UNDEFINED(var)` with a
//! warning, see [`crate::expand`]).
//!
//! Deviations from MARS, on purpose: `%min`/`%max` return the minimum/maximum (MARS's code has
//! them swapped); regular expressions are the `regex` crate's dialect (no look-around, no
//! back-references); an unclosed `{` is an error (MARS leaves such text as it is).

use std::collections::BTreeMap;
use std::sync::Arc;

use regex::{Regex, RegexBuilder};

use crate::error::{ExpandError, MacroError};
use crate::num::Num;
use crate::view::{self, View};

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

/// What the `%` language reaches besides its variables.
#[derive(Debug, Clone, Default)]
pub struct Context {
    /// User macro files by name (MARS: `NAME.tpl` in a search-path entry, read by
    /// [`crate::fs::load_macros`]). `%NAME{…}` runs one in the caller's scope (before any
    /// builtin of that name, as in MARS; `%primitive-NAME{…}` bypasses it), `%include{NAME}{…}`
    /// likewise, `%call{NAME}{…}` in a copy of the variables.
    pub macros: Arc<BTreeMap<String, String>>,
    /// Answers MARS's view primitives (`%get-primary{}`, …); `None`: none offered.
    pub view: Option<Arc<dyn View>>,
}

/// The builtins MARS's language spells with optional separators or by prefix/suffix, beyond
/// [`BUILTINS`], by canonical name.
const EXTRA_BUILTINS: &[&str] = &[
    "callstack",
    "abort",
    "return",
    "stop-eval",
    "next",
    "last",
    "include",
    "call",
    "human-seconds",
    "human-number",
    "human-numbers",
    "progress",
    "time",
    "real-time",
    "readlink",
    "get-glob",
    "foreach-glob",
];

fn squash(s: &str) -> String {
    s.chars().filter(|c| *c != '-' && *c != '_').collect()
}

/// The canonical name of an [`EXTRA_BUILTINS`] spelling (`human_seconds` → `human-seconds`).
fn extra_builtin(name: &str) -> Option<&'static str> {
    let s = squash(name);
    EXTRA_BUILTINS.iter().find(|b| squash(b) == s).copied()
}

/// Whether `%name{…}` calls something: a user macro, a builtin, or one of MARS's view macros
/// (which may still be [`MacroError::Unavailable`] when run).
pub fn is_known_macro(name: &str, ctx: &Context) -> bool {
    let primitive = name.starts_with("primitive");
    let bare = strip_primitive(name);
    (!primitive && ctx.macros.contains_key(bare))
        || BUILTINS.contains(&bare)
        || extra_builtin(bare).is_some()
        || bare.ends_with("printf")
        || bare.starts_with("warn")
        || view::canonical(bare).is_some()
}

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
pub(crate) fn check_syntax(
    text: &str,
    base: usize,
    depth: usize,
    ctx: &Context,
) -> Result<(), ExpandError> {
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
                let full = &text[i + 1..j];
                let name = strip_primitive(full);
                if !is_known_macro(full, ctx) {
                    return err(i, MacroError::UnknownMacro(name.to_string()));
                }
                let mut k = j;
                while k < b.len() && b[k] == b'{' {
                    let Some(close) = find_close(text, k) else {
                        return err(k, MacroError::UnclosedBrace);
                    };
                    // `%protect`'s and `%sprintf`'s first argument are data.
                    let data = name == "protect" || (name.ends_with("printf") && k == j);
                    if !data {
                        check_syntax(&text[k + 1..close], base + k + 1, depth + 1, ctx)?;
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
    ctx: &'a Context,
    /// MARS's `__return__`: set by `%next{}`/`%last{}`, makes the innermost text being
    /// evaluated stop at its next macro call or its end (dropping the rest).
    ret: bool,
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
        ctx: &'a Context,
        origin: &'a str,
        base: usize,
    ) -> Self {
        Machine {
            vars,
            warnings,
            ctx,
            ret: false,
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
        // MARS restores `callstack` after every call made from this text.
        let callstack = self.vars.get("callstack").cloned();
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
                    if std::mem::take(&mut self.ret) {
                        return Ok(out);
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
                    match &callstack {
                        Some(c) => self.vars.insert("callstack".into(), c.clone()),
                        None => self.vars.remove("callstack"),
                    };
                    out.push_str(&r);
                    self.check_len(text, i, &out)?;
                    i = k;
                    plain = i;
                }
                _ => i += 1,
            }
        }
        if std::mem::take(&mut self.ret) {
            return Ok(out);
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

    /// `%{name}`: an unset variable is `""`, silently, as in MARS.
    fn get_var(&self, name: &str) -> String {
        self.vars.get(name).cloned().unwrap_or_default()
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
        let primitive = name.starts_with("primitive");
        let name = strip_primitive(name);
        // MARS's `eval_fn`: a macro file of that name wins over everything but `primitive-`
        // (an empty or "0" file counts as absent: Perl's truth).
        let ctx = self.ctx;
        if !primitive {
            if let Some(text) = ctx.macros.get(name).filter(|t| truth(t)) {
                return self.run_macro(name, text, args, false);
            }
        }
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
            _ => self.call_extra(name, args, s, pos),
        }
    }

    /// MARS's `set_args` and the evaluation of a macro file: `callstack` gets `,name`, `0` is
    /// the name, `1`, `2`, … the arguments (evaluated in the caller's scope, each assigned
    /// before the next is evaluated), higher numbers are cleared. `new_scope` (`%call`) runs
    /// in a copy of the variables.
    fn run_macro(
        &mut self,
        name: &str,
        text: &str,
        args: &[&str],
        new_scope: bool,
    ) -> Result<String, ExpandError> {
        let mut inner = if new_scope {
            Some(self.vars.clone())
        } else {
            None
        };
        {
            let target = inner.as_mut().unwrap_or(&mut *self.vars);
            let stack = target.entry("callstack".into()).or_default();
            if truth(stack) {
                stack.push(',');
            }
            stack.push_str(name);
            target.insert("0".into(), name.into());
        }
        let mut index = 1;
        for a in args {
            let v = self.parse(a)?;
            inner
                .as_mut()
                .unwrap_or(&mut *self.vars)
                .insert(index.to_string(), v);
            index += 1;
        }
        let target = inner.as_mut().unwrap_or(&mut *self.vars);
        while target.remove(&index.to_string()).is_some() {
            index += 1;
        }
        match inner {
            Some(inner) => {
                let outer = std::mem::replace(self.vars, inner);
                let r = self.parse(text);
                *self.vars = outer;
                r
            }
            None => self.parse(text),
        }
    }

    /// The builtins beyond the core language, and MARS's view macros.
    fn call_extra(
        &mut self,
        name: &str,
        args: &[&str],
        s: &str,
        pos: usize,
    ) -> Result<String, ExpandError> {
        let unavailable = |m: &Self, why: &str| {
            m.err(
                s,
                pos,
                MacroError::Unavailable {
                    name: name.to_string(),
                    why: why.to_string(),
                },
            )
        };
        // MARS matches these by suffix and prefix (`/s?printf$/`, `/^warn/`).
        if name.ends_with("printf") {
            // The format is not evaluated (MARS: "exception: don't evaluate the format").
            let fmt = args.first().copied().unwrap_or("");
            let mut values = Vec::new();
            for i in 1..args.len() {
                values.push(self.arg(args, i)?);
            }
            let out = crate::sprintf::sprintf(fmt, &values);
            self.check_len(s, pos, &out)?;
            return Ok(out);
        }
        if name.starts_with("warn") {
            let msg = self.arg(args, 0)?;
            self.warnings.push(msg);
            return Ok(String::new());
        }
        let Some(canon) = extra_builtin(name).or_else(|| view::canonical(name)) else {
            return Err(self.err(s, pos, MacroError::UnknownMacro(name.to_string())));
        };
        match canon {
            "callstack" => Ok(self.get_var("callstack")),
            // MARS sets a variable of that name and nothing else (its parser looks at
            // `__abort__`, `__return__`, `__stop_eval__`, which these never set).
            "abort" | "return" | "stop-eval" => {
                self.vars.insert(canon.into(), "1".into());
                Ok(String::new())
            }
            // These also set `__return__`: the text being evaluated stops at its next call.
            "next" | "last" => {
                self.vars.insert(canon.into(), "1".into());
                self.ret = true;
                Ok(String::new())
            }
            "include" | "call" => {
                let file = self.arg(args, 0)?;
                let ctx = self.ctx;
                match ctx.macros.get(&file) {
                    Some(text) => {
                        self.run_macro(&file, text, &args[1.min(args.len())..], canon == "call")
                    }
                    None if view::canonical(&file).is_some() => Err(unavailable(
                        self,
                        &format!("'{file}' is one of MARS's view macros, not a macro file"),
                    )),
                    None => Err(self.err(s, pos, MacroError::NoMacroFile(file))),
                }
            }
            "human-seconds" => Ok(human_seconds(&self.arg(args, 0)?)),
            "human-number" | "human-numbers" => {
                let unit = self.arg(args, 0)?;
                let mut delim = self.arg(args, 1)?;
                if delim.is_empty() {
                    delim = "/".into();
                }
                let mut delim_unit = self.arg(args, 2)?;
                if delim_unit.is_empty() {
                    delim_unit = " ".into();
                }
                let mut numbers = Vec::new();
                for i in 3..args.len() {
                    numbers.push(make_numeric(&self.arg(args, i)?));
                }
                if numbers.is_empty() {
                    self.warnings
                        .push(format!("macro {name}: no number arguments given"));
                }
                Ok(human_numbers(&unit, &delim, &delim_unit, &numbers))
            }
            "progress" => {
                let length = make_numeric(&self.arg(args, 0)?);
                let length = if length > 0.0 { length } else { 20.0 };
                if args.len() < 2 {
                    return Err(unavailable(
                        self,
                        "without explicit values it shows %summary-vector{}, which needs \
                         the resource's state",
                    ));
                }
                let min = make_numeric(&self.arg(args, 1)?);
                let mid = make_numeric(&self.arg(args, 2)?);
                let max = make_numeric(&self.arg(args, 3)?);
                Ok(progress_bar(length.min(10_000.0), min, mid, max))
            }
            "time" | "real-time" => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                Ok(if canon == "time" {
                    format!("{}.{:09}", now.as_secs(), now.subsec_nanos())
                } else {
                    now.as_secs().to_string()
                })
            }
            "readlink" => {
                let path = self.arg(args, 0)?;
                match crate::fs::read_link(&path) {
                    Some(v) => Ok(v),
                    None => {
                        self.warnings.push(format!("cannot read symlink '{path}'"));
                        Ok(String::new())
                    }
                }
            }
            "get-glob" | "foreach-glob" => {
                let pattern = self.arg(args, 0)?;
                let var = self.arg(args, 1)?;
                let paths = crate::fs::glob(&pattern);
                let mut out = String::new();
                if canon == "get-glob" {
                    let delim = self.arg(args, 2)?;
                    for p in paths {
                        if !out.is_empty() {
                            out.push_str(&delim);
                        }
                        out.push_str(&p);
                        self.check_len(s, pos, &out)?;
                    }
                } else {
                    for p in paths {
                        self.step(s, pos)?;
                        self.vars.insert(var.clone(), p);
                        out.push_str(&self.arg(args, 2)?);
                        self.check_len(s, pos, &out)?;
                    }
                }
                Ok(out)
            }
            c => {
                if let Some((_, why)) = view::REFUSED.iter().find(|(n, _)| *n == c) {
                    return Err(unavailable(self, why));
                }
                if view::COMPLEX_MACROS.contains(&c) {
                    return Err(unavailable(
                        self,
                        "it prints a status page from the resource's state; use \
                         `marsadm view-…` outside templates",
                    ));
                }
                let mut values = Vec::new();
                for i in 0..args.len() {
                    values.push(self.arg(args, i)?);
                }
                match ctx_view(self.ctx).and_then(|v| v.primitive(c, self.vars, &values)) {
                    Some(Ok(v)) => Ok(v),
                    Some(Err(message)) => Err(self.err(
                        s,
                        pos,
                        MacroError::BadArgument {
                            name: name.to_string(),
                            message,
                        },
                    )),
                    None => {
                        let why = ctx_view(self.ctx)
                            .and_then(|v| v.why_not_offered())
                            .unwrap_or_else(|| {
                                "it needs resource state the generator is not given \
                                 (see docs/mars-compatibility.md for the ones answered)"
                                    .to_string()
                            });
                        Err(unavailable(self, &why))
                    }
                }
            }
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
        let mut value = self.get_var(&var);
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

fn ctx_view(ctx: &Context) -> Option<&dyn View> {
    ctx.view.as_deref()
}

/// MARS's `make_numeric`: `""` is 0, a comma ends the number.
fn make_numeric(s: &str) -> f64 {
    let s = s.split(',').next().unwrap_or("");
    Num::parse(s).as_f64()
}

/// Perl's integer part for `%d`-style use (NaN and infinities become 0 or saturate).
fn int_part(v: f64) -> i128 {
    if v.is_nan() {
        0
    } else {
        v.trunc().clamp(i128::MIN as f64, i128::MAX as f64) as i128
    }
}

/// MARS's `seconds2human`: `HH:MM:SS`, `--:--:--` for `""` and negative numbers.
pub fn human_seconds(arg: &str) -> String {
    let v = Num::parse(arg).as_f64();
    if arg.is_empty() || v < 0.0 || v.is_nan() {
        return "--:--:--".into();
    }
    let total = int_part(v);
    format!(
        "{:02}:{:02}:{:02}",
        int_part(v / 3600.0),
        (total % 3600) / 60,
        total % 60
    )
}

/// MARS's `number2human`: `"N UNIT"` in binary (`K`/`M`/`G`/`T` → `KiB`…) or, for a lower-case
/// unit, decimal multiples; with no unit, the one that suits `max`.
pub fn number2human(number: f64, unit: &str, max: f64) -> String {
    let mut k = 1024.0_f64;
    let flip = 9.99;
    let unit = if unit.is_empty() || unit == "0" {
        if max >= k * k * k * k * flip {
            "T"
        } else if max >= k * k * k * flip {
            "G"
        } else if max >= k * k {
            "M"
        } else if max >= k {
            "K"
        } else {
            ""
        }
    } else {
        unit
    };
    let i = if unit.starts_with(|c: char| c.is_ascii_lowercase()) {
        k = 1000.0;
        ""
    } else {
        "i"
    };
    let has = |c: char| unit.chars().any(|u| u.eq_ignore_ascii_case(&c));
    let (div, name) = if has('t') {
        (k * k * k * k, format!("T{i}B"))
    } else if has('g') {
        (k * k * k, format!("G{i}B"))
    } else if has('m') {
        (k * k, format!("M{i}B"))
    } else if has('k') {
        (k, format!("K{i}B"))
    } else {
        (1.0, "B".to_string())
    };
    let n = number / div;
    if name == "B" {
        format!("{} B", int_part(n + 0.1))
    } else {
        format!("{n:.3} {name}")
    }
}

/// MARS's `%human-numbers{unit}{delim}{delim-unit}{n1}{n2}…`: the numbers in the unit that
/// suits the largest, joined, then the unit once.
pub fn human_numbers(unit: &str, delim: &str, delim_unit: &str, numbers: &[f64]) -> String {
    let max = numbers.iter().copied().fold(0.0_f64, f64::max);
    let mut conv_unit = String::new();
    let mut results = Vec::new();
    for &n in numbers {
        let text = number2human(n, unit, max);
        // Perl: `s/ *([a-z].*)//i` splits the unit off.
        let at = text
            .find(|c: char| c.is_ascii_alphabetic())
            .unwrap_or(text.len());
        conv_unit = text[at..].to_string();
        results.push(text[..at].trim_end_matches(' ').to_string());
    }
    format!("{}{delim_unit}{conv_unit}", results.join(delim))
}

/// MARS's `progress_bar(length, min, mid, max)`: `[==>::...]`.
pub fn progress_bar(length: f64, min: f64, mid: f64, max: f64) -> String {
    let min = min.max(0.0);
    let mid = mid.max(min);
    let max = max.max(mid).max(1.0);
    let rep = |c: &str, n: f64| c.repeat(if n > 0.0 { n as usize } else { 0 });
    let mut pos1 = length * min / max;
    let mut bar = rep("=", pos1 - 1.0);
    if pos1 < length {
        bar.push('>');
        pos1 += 1.0;
    }
    let pos2 = length * mid / max;
    if pos1 < pos2 {
        bar.push_str(&rep(":", pos2 - pos1));
    }
    if pos2 < length {
        bar.push_str(&rep(".", length - pos2));
    }
    format!("[{bar}]")
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
        let ctx = Context::default();
        Machine::new(vars, &mut warnings, &ctx, text, 0).parse(text)
    }

    /// Evaluates with macro files and a view, returning the result and the warnings.
    fn run_ctx(text: &str, ctx: &Context) -> (Result<String, ExpandError>, Vec<String>) {
        let mut vars = Vars::from([
            ("res".to_string(), "r1".to_string()),
            ("host".to_string(), "a".to_string()),
            ("callstack".to_string(), "default".to_string()),
        ]);
        let mut warnings = Vec::new();
        let r = Machine::new(&mut vars, &mut warnings, ctx, text, 0).parse(text);
        (r, warnings)
    }

    fn files(list: &[(&str, &str)]) -> Context {
        Context {
            macros: Arc::new(
                list.iter()
                    .map(|(n, t)| (n.to_string(), t.to_string()))
                    .collect(),
            ),
            view: None,
        }
    }

    /// Expected values are what MARS's perl marsadm (mars0.1astable177) prints for the same
    /// text through `marsadm --macro=TEXT view RES` with the same macro files.
    #[test]
    fn macro_files_like_mars() {
        let ctx = files(&[("foo", "\n[%{0}:%{1}:%{2}:%{callstack}]\n\n")]);
        let (r, _) = run_ctx(
            "p%foo{A}{B}q%call{foo}{C}|%include{foo}{D}|%{0}|%{1}|%primitive-sprintf{%s}{x}",
            &ctx,
        );
        assert_eq!(
            r.unwrap(),
            "p\n[foo:A:B:default,foo]\n\nq\n[foo:C::default,foo]\n\n|\n[foo:D::default,foo]\n\n|foo|D|x"
        );
        // A macro file overrides a builtin; `primitive-` bypasses it.
        let ctx = files(&[("length", "L%{1}")]);
        assert_eq!(
            run_ctx("%length{abc}|%primitive-length{abc}", &ctx)
                .0
                .unwrap(),
            "Labc|3"
        );
        // Recursion is bounded.
        let ctx = files(&[("loop", "%loop{}")]);
        assert_eq!(
            run_ctx("%loop{}", &ctx).0.unwrap_err().kind,
            MacroError::TooDeep(MAX_DEPTH)
        );
        assert_eq!(
            run_ctx("%include{nope}", &ctx).0.unwrap_err().kind,
            MacroError::NoMacroFile("nope".into())
        );
        assert!(matches!(
            run_ctx("%call{replinfo}", &ctx).0.unwrap_err().kind,
            MacroError::Unavailable { .. }
        ));
    }

    #[test]
    fn control_like_mars() {
        let ctx = Context::default();
        let (r, _) = run_ctx(
            "a%return{}b%{return}c|%let{i}{0}%while{%<{%{i}}{3}}{%{i}{++}%if{1}{x%next{}y}z}|\
             %let{i}{0}%while{%<{%{i}}{3}}{%{i}{++}%last{}z}w|%{nope}|%abort{}A%{abort}|\
             %stop-eval{}%{stop-eval}|%callstack{}",
            &ctx,
        );
        assert_eq!(r.unwrap(), "ab1c|0xz1xz2xz|012w||A1|1|default");
    }

    #[test]
    fn formatting_like_mars() {
        let ctx = Context::default();
        let (r, w) = run_ctx(
            "x%sprintf{%05d|%s|%-4s|%.2f}{42}{ab}{c}{3.14159}|%human-seconds{3725}|\
             %human-seconds{}|%human-seconds{-1}|%human-seconds{90061}|%human-seconds{abc}|\
             %human-numbers{}{}{}{1000}{2048}|%human-numbers{k}{ / }{}{1500}{2500000}|\
             %human-number{G}{}{_}{5000000000}|%human-numbers{}{}{}{12}|%progress{10}{2}{5}{10}|\
             %progress{0}{0}{0}{0}|%progress{20}{10}{15}{20}|%primitive-sprintf{%s-%s}{a}{b}|\
             %printf{[%3d]}{7}|%warning{w}|%foo_printf{%x}{255}|%human_seconds{60}",
            &ctx,
        );
        assert_eq!(
            r.unwrap(),
            "x00042|ab|c   |3.14|01:02:05|--:--:--|--:--:--|25:01:01|00:00:00|0.977/2.000 KiB|\
             1.500 / 2500.000 KB|4.657_GiB|12 B|[=>::.....]|[>....................]|\
             [=========>::::.....]|a-b|[  7]||ff|00:01:00"
        );
        assert_eq!(w, ["w"]);
        // The format is not evaluated (MARS: "don't evaluate the format string").
        assert_eq!(run_ctx("%sprintf{%{res}}", &ctx).0.unwrap(), "%{res}");
    }

    #[test]
    fn view_macros() {
        let ctx = Context::default();
        for text in [
            "%is-primary{}",
            "%is_primary{}",
            "%replinfo{}",
            "%setlink{a}{b}",
            "%sleep{1}",
            "%wait-is-primary-on{}",
            "%progress{10}",
        ] {
            assert!(
                matches!(
                    run_ctx(text, &ctx).0.unwrap_err().kind,
                    MacroError::Unavailable { .. }
                ),
                "{text}"
            );
        }
        let view = crate::view::StateView {
            host: "a".into(),
            uuid: Some("u".into()),
            resources: [(
                "r1".to_string(),
                crate::view::ResourceView {
                    primary: Some("a".into()),
                    ..Default::default()
                },
            )]
            .into(),
        };
        let ctx = Context {
            view: Some(Arc::new(view)),
            ..Context::default()
        };
        assert_eq!(
            run_ctx(
                "%get-primary{}|%todo_primary{}|%uuid{}|%if{%is-member{}}{m}{-}",
                &ctx
            )
            .0
            .unwrap(),
            "a|1|u|m"
        );
        assert!(matches!(
            run_ctx("%is-primary{}", &ctx).0.unwrap_err().kind,
            MacroError::Unavailable { .. }
        ));
    }

    #[test]
    fn links_and_globs() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display().to_string();
        std::os::unix::fs::symlink("host-a", dir.path().join("primary")).unwrap();
        std::os::unix::fs::symlink(".deleted", dir.path().join("gone")).unwrap();
        std::fs::write(dir.path().join("b.txt"), "").unwrap();
        std::fs::write(dir.path().join("a.txt"), "").unwrap();
        std::fs::write(dir.path().join(".h.txt"), "").unwrap();
        let ctx = Context::default();
        let (r, w) = run_ctx(
            &format!(
                "%readlink{{{d}/primary}}|%readlink{{{d}/gone}}|%readlink{{{d}/none}}|\
                 %get-glob{{{d}/*.txt}}{{}}{{,}}|%foreach-glob{{{d}/{{b,a}}.txt {d}/zz}}{{p}}{{<%{{p}}>}}|\
                 %get-glob{{{d}/*}}{{}}{{ }}"
            ),
            &ctx,
        );
        assert_eq!(
            r.unwrap(),
            format!(
                "host-a|||{d}/a.txt,{d}/b.txt|<{d}/b.txt><{d}/a.txt><{d}/zz>|\
                 {d}/a.txt {d}/b.txt {d}/primary"
            )
        );
        assert_eq!(w, [format!("cannot read symlink '{d}/none'")]);
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
        // Unset: "" (MARS), no error.
        assert_eq!(ev("[%{nope}]"), "[]");
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
        assert_eq!(kind("%nosuch{}"), MacroError::UnknownMacro("nosuch".into()));
    }

    #[test]
    fn errors_have_offsets() {
        let mut vars = Vars::new();
        let e = run("ok\n%let{x}{%nosuch{}}", &mut vars).unwrap_err();
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
        let c = Context::default();
        assert!(check_syntax("%if{%eq{a}{b}}{%{x}}{\\{}", 0, 0, &c).is_ok());
        assert!(check_syntax("%protect{%nosuch{}}", 0, 0, &c).is_ok());
        assert!(check_syntax("%sprintf{%nosuch{}}{%is-primary{}}", 0, 0, &c).is_ok());
        let e = check_syntax("ab\n%if{1}{%nosuch{}}", 10, 0, &c).unwrap_err();
        assert_eq!(
            (e.offset, e.kind),
            (10 + 10, MacroError::UnknownMacro("nosuch".into()))
        );
        let e = check_syntax("%if{1}{x", 0, 0, &c).unwrap_err();
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
