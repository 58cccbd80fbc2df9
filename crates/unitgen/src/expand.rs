//! The `@`-macro layer of templates (MARS `subst_systemd_vars`) and `^{var}` file-name matching
//! (MARS `match_systemd_vars`).
//!
//! # Grammar (byte level)
//!
//! A construct is `@` + optional name (`[A-Za-z_][-A-Za-z0-9_]*`) + `{body}` where the body
//! nests braces and `\` escapes the next byte. Anything else, including a lone `@` or `@name`
//! without a directly following `{`, is copied verbatim (so `foo@.service`, `"$@"` and e-mail
//! addresses are safe). Constructs are expanded left to right and their results are **not**
//! rescanned.
//!
//! | construct | result |
//! |---|---|
//! | `@{var}` | value of `var`; the name itself is run through the `%` language first |
//! | `@escvar{var}` | `systemd-escape --path` of that value (`my-res` → `my\x2dres`) |
//! | `@esc{text}` | `systemd-escape --path` of the *literal* text (not expanded, as in MARS) |
//! | `@eval{…}` | the `%`-macro language ([`crate::macros`]); `%let` results stay visible to later `@{…}` |
//!
//! As in MARS, an unset variable expands to `UNDEFINED(var)` and any other macro name to its
//! body unchanged, each with a warning ([`Expander::warnings`]); the unit is still written. An
//! unclosed brace is an error (MARS copies such text verbatim; here the template is reported
//! and skipped, see [`crate::generate`]).
//!
//! # File-name patterns
//!
//! A template name may contain `^{var}` (`var` = `[A-Za-z_][A-Za-z0-9_]*`). To match a wanted
//! unit name, the template name is first `@`-expanded, then each `^{var}` becomes a greedy
//! `(.+)` and every other byte must match literally, anchored at both ends; the captures are
//! bound to the variables. (MARS pastes the literal parts into a Perl regex unquoted, so a `.`
//! there matches any character; quoting them is the intended meaning.) The wanted name is taken
//! literally.

use regex::Regex;

use crate::error::{ExpandError, MacroError};
use crate::escape::escape_path;
use crate::macros::{find_close, Context, Machine, Vars};

/// Expands `@`-constructs and runs `%`-macros over a set of variables; collects `%warn` output.
#[derive(Debug, Clone, Default)]
pub struct Expander {
    /// Variables; `%let` inside `@eval{}` changes them.
    pub vars: Vars,
    /// Messages from `%warn{}`, `%dump-vars{}`, reserved escapes, unset variables and unknown
    /// `@`-macros.
    pub warnings: Vec<String>,
    /// User macro files and the view of state the `%` language reaches.
    pub ctx: Context,
}

fn is_ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_'
}

impl Expander {
    /// An expander over `vars`.
    pub fn new(vars: Vars) -> Self {
        Expander {
            vars,
            warnings: Vec::new(),
            ctx: Context::default(),
        }
    }

    /// An expander over `vars` with macro files and a view.
    pub fn with_context(vars: Vars, ctx: Context) -> Self {
        Expander {
            vars,
            warnings: Vec::new(),
            ctx,
        }
    }

    /// Runs the `%`-macro language over `text` (what `@eval{text}` does).
    pub fn eval(&mut self, text: &str) -> Result<String, ExpandError> {
        self.eval_at(text, text, 0)
    }

    fn eval_at(&mut self, origin: &str, text: &str, base: usize) -> Result<String, ExpandError> {
        let mut m = Machine::new(&mut self.vars, &mut self.warnings, &self.ctx, origin, base);
        m.parse(text)
    }

    /// `@{name}`: MARS's `UNDEFINED(name)` with a warning when unset.
    fn lookup(&mut self, name: &str) -> String {
        match self.vars.get(name) {
            Some(v) => v.clone(),
            None => {
                self.warnings
                    .push(format!("variable '{name}' is undefined"));
                format!("UNDEFINED({name})")
            }
        }
    }

    /// Expands the `@`-constructs of `text` (a template body or file name).
    pub fn expand(&mut self, text: &str) -> Result<String, ExpandError> {
        let b = text.as_bytes();
        let mut out = String::with_capacity(text.len());
        let mut i = 0;
        let mut plain = 0;
        while i < b.len() {
            if b[i] != b'@' {
                i += 1;
                continue;
            }
            let mut j = i + 1;
            if j < b.len() && is_ident_start(b[j]) {
                while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_' || b[j] == b'-')
                {
                    j += 1;
                }
            }
            if j >= b.len() || b[j] != b'{' {
                i += 1;
                continue;
            }
            let close = find_close(text, j).ok_or(ExpandError {
                offset: j,
                kind: MacroError::UnclosedBrace,
            })?;
            out.push_str(&text[plain..i]);
            let name = &text[i + 1..j];
            let body = &text[j + 1..close];
            let body_at = j + 1;
            let replacement = match name {
                "" | "escvar" => {
                    let var = self.eval_at(body, body, body_at)?;
                    let value = self.lookup(&var);
                    if name.is_empty() {
                        value
                    } else {
                        escape_path(&value).map_err(|e| ExpandError {
                            offset: i,
                            kind: e.into(),
                        })?
                    }
                }
                "esc" => escape_path(body).map_err(|e| ExpandError {
                    offset: i,
                    kind: e.into(),
                })?,
                "eval" => self.eval_at(body, body, body_at)?,
                other => {
                    // MARS: "systemd function 'x' is undefined", and the body stays.
                    self.warnings
                        .push(format!("systemd function '{other}' is undefined"));
                    body.to_string()
                }
            };
            out.push_str(&replacement);
            if out.len() > crate::macros::MAX_LEN {
                return Err(ExpandError {
                    offset: i,
                    kind: MacroError::TooLong(crate::macros::MAX_LEN),
                });
            }
            i = close + 1;
            plain = i;
        }
        out.push_str(&text[plain..]);
        Ok(out)
    }

    /// Matches the wanted unit name `wanted` against the template name `pattern`.
    ///
    /// On a match the `^{var}` captures are bound in [`Expander::vars`] and `true` is returned;
    /// on no match the variables are left as they were after expanding the pattern.
    pub fn match_name(&mut self, pattern: &str, wanted: &str) -> Result<bool, ExpandError> {
        let expanded = self.expand(pattern)?;
        let (regex, names) = name_regex(&expanded);
        let Some(caps) = regex.captures(wanted) else {
            return Ok(false);
        };
        for (k, name) in names.iter().enumerate() {
            let value = caps.get(k + 1).map_or("", |m| m.as_str());
            self.vars.insert(name.clone(), value.to_string());
        }
        Ok(true)
    }
}

/// Checks the `@`-constructs of `text` without expanding them: braces close, the macro names
/// exist, and the `%`-text inside passes [`crate::macros`]' syntax check. Finds malformed
/// templates that a particular generation run would not instantiate.
pub fn check_syntax(text: &str, ctx: &Context) -> Result<(), ExpandError> {
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'@' {
            i += 1;
            continue;
        }
        let mut j = i + 1;
        if j < b.len() && is_ident_start(b[j]) {
            while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_' || b[j] == b'-') {
                j += 1;
            }
        }
        if j >= b.len() || b[j] != b'{' {
            i += 1;
            continue;
        }
        let close = find_close(text, j).ok_or(ExpandError {
            offset: j,
            kind: MacroError::UnclosedBrace,
        })?;
        // Unknown `@`-macros only warn when expanded (MARS keeps their body).
        if let "" | "escvar" | "eval" = &text[i + 1..j] {
            crate::macros::check_syntax(&text[j + 1..close], j + 1, 0, ctx)?;
        }
        i = close + 1;
    }
    Ok(())
}

/// The anchored regex for an expanded template name, and the capture variable names in order.
fn name_regex(pattern: &str) -> (Regex, Vec<String>) {
    let b = pattern.as_bytes();
    let mut re = String::from("^");
    let mut names = Vec::new();
    let mut i = 0;
    let mut plain = 0;
    while i < b.len() {
        if b[i] == b'^' && i + 2 < b.len() && b[i + 1] == b'{' && is_ident_start(b[i + 2]) {
            let mut j = i + 3;
            while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
                j += 1;
            }
            if j < b.len() && b[j] == b'}' {
                re.push_str(&regex::escape(&pattern[plain..i]));
                re.push_str("(.+)");
                names.push(pattern[i + 2..j].to_string());
                i = j + 1;
                plain = i;
                continue;
            }
        }
        i += 1;
    }
    re.push_str(&regex::escape(&pattern[plain..]));
    re.push('$');
    // Only literal text and `(.+)` groups: the expression is always valid and small; the
    // fallback (matching nothing) is unreachable but keeps this function panic-free.
    let regex = Regex::new(&re).unwrap_or_else(|_| Regex::new("[^\\s\\S]").expect("valid"));
    (regex, names)
}

/// `true` when a template name contains `@`- or `^`-constructs (MARS generates only the other,
/// "plain" templates unconditionally).
pub fn is_pattern_name(name: &str) -> bool {
    name.contains('@') || name.contains('^')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> Vars {
        Vars::from([
            ("res".to_string(), "my-res".to_string()),
            ("host".to_string(), "node1".to_string()),
        ])
    }

    fn ex(text: &str) -> String {
        Expander::new(vars())
            .expand(text)
            .unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn err(text: &str) -> ExpandError {
        Expander::new(vars()).expand(text).unwrap_err()
    }

    #[test]
    fn at_macros() {
        assert_eq!(ex("mnt-@{res}.mount"), "mnt-my-res.mount");
        assert_eq!(ex("mnt-@escvar{res}.mount"), "mnt-my\\x2dres.mount");
        assert_eq!(ex("@esc{/mnt/a-b/}"), "mnt-a\\x2db");
        assert_eq!(ex("@esc{@{res}}"), "\\x40\\x7bres\\x7d");
        assert_eq!(ex("@{%tolower{RES}}"), "my-res");
        assert_eq!(ex("@{r%protect{es}}"), "my-res");
        assert_eq!(ex("@eval{%let{x}{%+{1}{2}}}x=@{x}"), "x=3");
        assert_eq!(ex("@eval{%if{%eq{@{res}}{my-res}}{yes}{no}}"), "no");
        assert_eq!(ex("@eval{%if{%eq{%{res}}{my-res}}{yes}{no}}"), "yes");
        assert_eq!(
            ex("a@b @ @x. \"$@\" foo@.service ${x[@]}"),
            "a@b @ @x. \"$@\" foo@.service ${x[@]}"
        );
        assert_eq!(ex("@{res}@{res}"), "my-resmy-res");
        // Results are not rescanned.
        let mut e = Expander::new(vars());
        e.vars.insert("t".into(), "@{res}".into());
        assert_eq!(e.expand("@{t}").unwrap(), "@{res}");
        // Nested braces.
        assert_eq!(ex("@eval{%if{1}{{a{b}c}}{}}"), "{a{b}c}");
    }

    /// MARS's `subst_systemd_vars`: an unset variable is `UNDEFINED(name)` and an unknown
    /// `@`-macro its body, each with a warning (changed from errors: MARS's lenient expansion).
    #[test]
    fn lenient_like_mars() {
        let mut e = Expander::new(vars());
        assert_eq!(
            e.expand("x\n@{nope}|@escvar{nope}|@foo{a-b}|%{x}").unwrap(),
            "x\nUNDEFINED(nope)|UNDEFINED\\x28nope\\x29|a-b|%{x}"
        );
        assert_eq!(
            e.warnings,
            [
                "variable 'nope' is undefined",
                "variable 'nope' is undefined",
                "systemd function 'foo' is undefined"
            ]
        );
        // `%{undefined}` is "" without a warning, as in MARS.
        let mut e = Expander::new(vars());
        assert_eq!(e.expand("[@eval{%{undefined}}]").unwrap(), "[]");
        assert!(e.warnings.is_empty());
    }

    #[test]
    fn at_errors() {
        assert_eq!(err("ab@{res").kind, MacroError::UnclosedBrace);
        assert_eq!(
            err("@esc{/a/../b}").kind,
            MacroError::Escape(crate::EscapeError::DotDot("/a/../b".into()))
        );
        let e = err("line1\nline2 @eval{\n%let{x}{%nosuch{}}}");
        assert_eq!(e.kind, MacroError::UnknownMacro("nosuch".into()));
        assert_eq!(
            crate::error::line_of("line1\nline2 @eval{\n%let{x}{%nosuch{}}}", e.offset),
            3
        );
    }

    #[test]
    fn syntax_check() {
        let ctx = Context::default();
        assert!(check_syntax(
            "@{res} @escvar{res} @esc{a-b} @eval{%let{x}{1}} foo@.service @bad{x}",
            &ctx
        )
        .is_ok());
        assert_eq!(
            check_syntax("@eval{%nosuch{}}", &ctx).unwrap_err().kind,
            MacroError::UnknownMacro("nosuch".into())
        );
        assert_eq!(
            check_syntax("@{x", &ctx).unwrap_err().kind,
            MacroError::UnclosedBrace
        );
        // A macro file makes the name known.
        let ctx = Context {
            macros: std::sync::Arc::new([("nosuch".to_string(), "x".to_string())].into()),
            view: None,
        };
        assert!(check_syntax("@eval{%nosuch{}}", &ctx).is_ok());
    }

    #[test]
    fn name_matching() {
        let mut e = Expander::new(vars());
        assert!(e
            .match_name(
                "^{mntname}-@escvar{res}-delay.service",
                "mnt-test-my\\x2dres-delay.service"
            )
            .unwrap());
        assert_eq!(e.vars["mntname"], "mnt-test");
        let mut e = Expander::new(vars());
        assert!(!e
            .match_name(
                "^{mntname}-@escvar{res}-delay.service",
                "mnt-test-other-delay.service"
            )
            .unwrap());
        assert!(!e.match_name("mars.service", "marsXservice").unwrap());
        assert!(e.match_name("mars.service", "mars.service").unwrap());
        let mut e = Expander::new(vars());
        assert!(e.match_name("^{a}-^{b}.mount", "x-y-z.mount").unwrap());
        assert_eq!((e.vars["a"].as_str(), e.vars["b"].as_str()), ("x-y", "z"));
        // `(.+)` needs at least one character.
        assert!(!Expander::new(vars())
            .match_name("^{a}.mount", ".mount")
            .unwrap());
        // Not a capture: literal.
        assert!(Expander::new(vars())
            .match_name("^{1}.x", "^{1}.x")
            .unwrap());
        assert!(is_pattern_name("^{a}.service") && is_pattern_name("a-@{res}.path"));
        assert!(!is_pattern_name("mars.path"));
    }
}
