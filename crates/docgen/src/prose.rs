//! The hand-written part of a man page: a roff file (`docs/man/NAME.8.prose`) cut into pieces
//! by directive comments, each saying where the roff lines after it go:
//!
//! ```text
//! .\" mars: section DESCRIPTION     the DESCRIPTION section (else clap's long about)
//! .\" mars: section EXAMPLES        a section after OPTIONS/COMMANDS, in file order
//! .\" mars: option --root           appended to the generated entry of --root
//! .\" mars: command primary         appended to the generated entry of `primary`
//! ```
//!
//! Before the first directive only comments and blank lines may stand. A directive comment is
//! a roff comment, so the file still reads as roff. Inside an option or command entry a new
//! paragraph is `.IP` (a `.PP` would end the list).

/// The directive prefix (a roff comment).
const DIRECTIVE: &str = ".\\\" mars:";

/// Where a piece of prose goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A section of its own (`.SH NAME`).
    Section(String),
    /// Appended to an option's entry (the long name, without `--`).
    Option(String),
    /// Appended to a command's entry.
    Command(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProseError {
    #[error("line {line}: unknown directive {text:?} (section NAME, option --LONG, command NAME)")]
    Directive { line: usize, text: String },
    #[error("line {line}: text before the first `.\\\" mars:` directive")]
    Stray { line: usize },
    #[error("line {line}: {target:?} is given twice")]
    Twice { line: usize, target: Target },
}

/// A parsed prose file: its pieces in file order, each with the line of its directive.
#[derive(Debug, Default)]
pub struct Prose {
    pieces: Vec<(Target, usize, String)>,
}

impl Prose {
    pub fn parse(text: &str) -> Result<Prose, ProseError> {
        let mut pieces: Vec<(Target, usize, String)> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            if let Some(rest) = line.strip_prefix(DIRECTIVE) {
                let target = directive(rest.trim()).ok_or_else(|| ProseError::Directive {
                    line: n,
                    text: line.to_string(),
                })?;
                if pieces.iter().any(|(t, _, _)| *t == target) {
                    return Err(ProseError::Twice { line: n, target });
                }
                pieces.push((target, n, String::new()));
                continue;
            }
            match pieces.last_mut() {
                Some((_, _, body)) => {
                    body.push_str(line);
                    body.push('\n');
                }
                None if line.trim().is_empty() || line.starts_with(".\\\"") => {}
                None => return Err(ProseError::Stray { line: n }),
            }
        }
        for (_, _, body) in &mut pieces {
            let trimmed = body.trim_end().len();
            body.truncate(trimmed);
            if !body.is_empty() {
                body.push('\n');
            }
        }
        Ok(Prose { pieces })
    }

    /// Every target with the line of its directive.
    pub fn targets(&self) -> impl Iterator<Item = (&Target, usize)> {
        self.pieces.iter().map(|(t, n, _)| (t, *n))
    }

    pub fn section(&self, name: &str) -> Option<&str> {
        self.find(|t| matches!(t, Target::Section(s) if s == name))
    }

    /// The sections, in file order.
    pub fn sections(&self) -> impl Iterator<Item = (&str, &str)> {
        self.pieces.iter().filter_map(|(t, _, body)| match t {
            Target::Section(s) => Some((s.as_str(), body.as_str())),
            _ => None,
        })
    }

    pub fn option(&self, long: &str) -> Option<&str> {
        self.find(|t| matches!(t, Target::Option(o) if o == long))
    }

    pub fn command(&self, name: &str) -> Option<&str> {
        self.find(|t| matches!(t, Target::Command(c) if c == name))
    }

    fn find(&self, f: impl Fn(&Target) -> bool) -> Option<&str> {
        self.pieces
            .iter()
            .find(|(t, _, _)| f(t))
            .map(|(_, _, body)| body.as_str())
    }
}

fn directive(rest: &str) -> Option<Target> {
    let (kind, arg) = rest.split_once(' ')?;
    let arg = arg.trim();
    if arg.is_empty() {
        return None;
    }
    match kind {
        "section" => Some(Target::Section(arg.to_string())),
        "option" => arg
            .strip_prefix("--")
            .filter(|l| !l.is_empty() && !l.contains(' '))
            .map(|l| Target::Option(l.to_string())),
        "command" if !arg.contains(' ') => Some(Target::Command(arg.to_string())),
        _ => None,
    }
}
