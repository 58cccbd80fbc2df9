//! Typed errors.
//!
//! Expansion errors carry a byte offset into the text being expanded; the generator turns that
//! into a line number of the template file, because "template X line 12: unknown variable `rse`"
//! is what an operator can act on.

use thiserror::Error;

/// Why `systemd-escape --path` would refuse an input.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EscapeError {
    /// A relative path that simplifies to nothing (`.`, `./`): systemd says "failed to escape".
    #[error(
        "path '{0}' is not valid for systemd-escape --path (nothing left after simplification)"
    )]
    Empty(String),
    /// A `..` component: systemd refuses non-normalized paths.
    #[error("path '{0}' contains a '..' component, systemd-escape --path refuses it")]
    DotDot(String),
    /// A component longer than NAME_MAX (255 bytes) or a path of PATH_MAX (4096) bytes or more.
    #[error("path '{0}' is too long for systemd-escape --path")]
    TooLong(String),
}

/// What went wrong while expanding `@`-macros, running the `%`-macro language or matching a
/// `^{var}` file name.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum MacroError {
    /// A `{` that is never closed (braces nest; `\` escapes one character).
    #[error("unbalanced braces: '{{' is never closed")]
    UnclosedBrace,
    /// `%foo{…}` with an unknown `foo`: neither a builtin, nor one of MARS's view macros, nor
    /// a user macro file `foo.tpl` on the search path (MARS dies here too: "call to unknown
    /// macro").
    #[error("unknown %-macro '%{0}{{…}}' (no builtin, MARS view macro or macro file {0}.tpl)")]
    UnknownMacro(String),
    /// `%include{foo}`/`%call{foo}` with no macro file `foo.tpl` on the search path (MARS:
    /// "cannot find macro").
    #[error("cannot find macro '{0}' (no file {0}.tpl on the template search path)")]
    NoMacroFile(String),
    /// One of MARS's view macros that the generator cannot answer: it needs state the
    /// generator is not given, would change state, or would block (see
    /// `docs/mars-compatibility.md`).
    #[error("%{name}{{…}}: MARS's view macro is not available in templates here: {why}")]
    Unavailable {
        /// The macro as called.
        name: String,
        /// Why.
        why: String,
    },
    /// A macro call with a missing argument that has no sensible default.
    #[error("%{name}: missing argument {index}")]
    MissingArgument {
        /// The macro.
        name: String,
        /// 1-based argument number.
        index: usize,
    },
    /// A bad argument (unknown regex option, …).
    #[error("%{name}: {message}")]
    BadArgument {
        /// The macro.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// A regular expression the `regex` crate does not accept (Perl-only features such as
    /// look-around or back-references are not supported).
    #[error("bad regular expression '{regex}': {message}")]
    BadRegex {
        /// The expression after macro expansion.
        regex: String,
        /// The regex crate's message.
        message: String,
    },
    /// `%/{…}{0}` or `%%{…}{0}`; Perl dies here too.
    #[error("illegal division by zero")]
    DivisionByZero,
    /// `%die{msg}`.
    #[error("%die: {0}")]
    Die(String),
    /// `@esc`/`@escvar`/a path reference that `systemd-escape --path` refuses.
    #[error(transparent)]
    Escape(#[from] EscapeError),
    /// Nesting deeper than [`crate::macros::MAX_DEPTH`].
    #[error("macro nesting deeper than {0} levels")]
    TooDeep(usize),
    /// More than [`crate::macros::MAX_STEPS`] evaluation steps (runaway loop).
    #[error("more than {0} evaluation steps (endless loop?)")]
    TooManySteps(u64),
    /// A value longer than [`crate::macros::MAX_LEN`] bytes, or a `%set` index beyond
    /// [`crate::macros::MAX_FIELDS`].
    #[error("a value grew beyond {0} bytes (or fields)")]
    TooLong(usize),
}

/// A [`MacroError`] with the byte offset in the expanded text where the failing construct starts.
#[derive(Debug, Clone, PartialEq, Error)]
#[error("at byte {offset}: {kind}")]
pub struct ExpandError {
    /// Byte offset into the text handed to the expander.
    pub offset: usize,
    /// What went wrong.
    pub kind: MacroError,
}

/// Where in a template an error was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    /// In the template's file name (`mnt-@escvar{res}.mount`).
    Name,
    /// In the body, 1-based line number.
    Line(usize),
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Name => write!(f, "file name"),
            Location::Line(n) => write!(f, "line {n}"),
        }
    }
}

/// A malformed template: file, place and reason.
#[derive(Debug, Clone, PartialEq, Error)]
#[error("template {template} ({location}): {kind}")]
pub struct TemplateError {
    /// The template's path (or name for in-memory templates).
    pub template: String,
    /// Name or line.
    pub location: Location,
    /// The reason.
    pub kind: MacroError,
}

impl TemplateError {
    /// Builds an error for `template` from an expansion error in `text` (a body: the offset is
    /// turned into a line number).
    pub fn in_body(template: &str, text: &str, err: ExpandError) -> Self {
        TemplateError {
            template: template.to_string(),
            location: Location::Line(line_of(text, err.offset)),
            kind: err.kind,
        }
    }

    /// Builds an error for an expansion error in the template's file name.
    pub fn in_name(template: &str, err: ExpandError) -> Self {
        TemplateError {
            template: template.to_string(),
            location: Location::Name,
            kind: err.kind,
        }
    }
}

/// 1-based line number of byte `offset` in `text` (offsets past the end count as the last line).
pub fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    1 + text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
}

/// Errors of the generator's own checks (besides malformed templates).
#[derive(Debug, Clone, PartialEq, Error)]
pub enum Error {
    /// A malformed template.
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// `set-systemd-unit RES NAME`: no template carries the marker `NAME_START`/`NAME_STOP`.
    #[error("no template carries the marker '{0}'")]
    NoTemplateWithMarker(String),
    /// Two templates with the same name given to [`crate::TemplateSet::new`].
    #[error("template name '{0}' given twice")]
    DuplicateTemplate(String),
}
