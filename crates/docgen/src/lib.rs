//! Man pages and shell completions of `marsd` and `marsadm`, generated from their clap
//! definitions so that they cannot drift from `--help`.
//!
//! A page is the clap definition plus hand-written prose (`docs/man/NAME.8.prose`, see
//! [`Prose`]): NAME, SYNOPSIS, OPTIONS and COMMANDS come from clap (every visible option with its
//! value name, help, default and environment variable; every visible command with its
//! arguments, aliases and own options), and the prose adds a DESCRIPTION, paragraphs attached
//! to single options or commands, and further sections (FILES, ENVIRONMENT, EXAMPLES …). Prose
//! attached to an option or a command that clap does not define is an error, so removing a flag
//! without its prose fails the generation (and the binaries' tests that run it).
//!
//! The binaries call this from hidden entry points (`marsadm generate man|completions DIR`,
//! `marsd --generate-man DIR`); the package build (`scripts/build-deb`) runs them, so the pages
//! and completions in a package are always those of the binaries in it.

mod prose;

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Arg, ArgAction, Command};
use clap_complete::Shell;
use roff::{bold, italic, roman, Inline, Roff};

pub use prose::{Prose, ProseError, Target};

/// Sections the generator writes itself; prose may not define them.
const GENERATED: [&str; 4] = ["NAME", "SYNOPSIS", "OPTIONS", "COMMANDS"];
/// The man section of both programs (system administration).
pub const SECTION: &str = "8";
/// The shells whose completion scripts [`write_completions`] writes.
pub const SHELLS: [Shell; 3] = [Shell::Bash, Shell::Zsh, Shell::Fish];

#[derive(Debug, thiserror::Error)]
pub enum DocError {
    #[error("man page prose: {0}")]
    Prose(#[from] ProseError),
    #[error("man page prose: line {line}: {what} {name:?} is not defined by {program}'s clap definition")]
    Undefined {
        program: String,
        what: &'static str,
        name: String,
        line: usize,
    },
    #[error("man page prose: line {line}: section {name} is generated from clap")]
    GeneratedSection { name: String, line: usize },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Renders the man page of `cmd` merged with `prose` (the text of `NAME.8.prose`); `date` goes
/// into the title line (see [`source_date`]).
pub fn man_page(cmd: Command, prose: &str, date: &str) -> Result<String, DocError> {
    let prose = Prose::parse(prose)?;
    // `help` as a command is clap's, not ours: `--help` is listed under OPTIONS.
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    check(&cmd, &prose)?;
    let name = cmd.get_name().to_string();
    let version = cmd.get_version().unwrap_or_default().to_string();
    let man = clap_mangen::Man::new(cmd.clone())
        .title(name.to_uppercase())
        .section(SECTION)
        .date(date)
        .source(format!("mars {version}"))
        .manual("System Administration");

    // Each clap_mangen part and each roff document starts with the same preamble (apostrophe
    // handling): keep the first one only.
    let preamble = Roff::new().render();
    let mut out = Vec::new();
    let part = |f: &dyn Fn(&mut dyn Write) -> std::io::Result<()>| -> String {
        let mut buf = Vec::new();
        f(&mut buf).expect("writing to a Vec");
        let s = String::from_utf8(buf).expect("roff output is UTF-8");
        s.strip_prefix(&preamble).map(str::to_string).unwrap_or(s)
    };
    out.push(preamble.clone());
    out.push(part(&|w| man.render_title(w)));
    out.push(part(&|w| man.render_name_section(w)));
    out.push(synopsis(&cmd));
    match prose.section("DESCRIPTION") {
        Some(text) => out.push(format!(".SH DESCRIPTION\n{text}")),
        None => out.push(part(&|w| man.render_description_section(w))),
    }
    out.push(options_section(&cmd, &prose));
    if cmd.get_subcommands().any(|s| !s.is_hide_set()) {
        out.push(commands_section(&cmd, &prose));
    }
    for (name, text) in prose.sections() {
        if name != "DESCRIPTION" {
            out.push(format!(".SH {}\n{text}", quote_heading(name)));
        }
    }
    Ok(out.concat())
}

/// Writes `DIR/NAME.8` (see [`man_page`]) and returns its path.
pub fn write_man(cmd: Command, prose: &str, dir: &Path) -> Result<PathBuf, DocError> {
    let name = cmd.get_name().to_string();
    let page = man_page(cmd, prose, &source_date())?;
    let path = dir.join(format!("{name}.{SECTION}"));
    write(&path, page.as_bytes())?;
    Ok(path)
}

/// Writes the bash, zsh and fish completion scripts of `cmd` into `dir` (`NAME.bash`, `_NAME`,
/// `NAME.fish`) and returns their paths.
pub fn write_completions(cmd: Command, dir: &Path) -> Result<Vec<PathBuf>, DocError> {
    let mut cmd = cmd;
    let name = cmd.get_name().to_string();
    let mut paths = Vec::new();
    for shell in SHELLS {
        let path = clap_complete::generate_to(shell, &mut cmd, &name, dir).map_err(|source| {
            DocError::Io {
                path: dir.to_path_buf(),
                source,
            }
        })?;
        paths.push(path);
    }
    Ok(paths)
}

/// The date of the title line: `SOURCE_DATE_EPOCH` (reproducible builds; the package build sets
/// it to the last commit's time) as YYYY-MM-DD, else empty.
pub fn source_date() -> String {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(date_of)
        .unwrap_or_default()
}

/// YYYY-MM-DD of a Unix time (UTC), by the days-to-civil algorithm of H. Hinnant.
fn date_of(secs: u64) -> String {
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), DocError> {
    std::fs::write(path, bytes).map_err(|source| DocError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Every piece of prose must belong to something clap defines.
fn check(cmd: &Command, prose: &Prose) -> Result<(), DocError> {
    let program = cmd.get_name().to_string();
    for (target, line) in prose.targets() {
        match target {
            Target::Section(name) if GENERATED.contains(&name.as_str()) => {
                return Err(DocError::GeneratedSection {
                    name: name.clone(),
                    line,
                });
            }
            Target::Section(_) => {}
            Target::Option(long) => {
                if !visible_options(cmd).any(|a| a.get_long() == Some(long.as_str())) {
                    return Err(DocError::Undefined {
                        program,
                        what: "option",
                        name: format!("--{long}"),
                        line,
                    });
                }
            }
            Target::Command(name) => {
                if !cmd
                    .get_subcommands()
                    .any(|s| !s.is_hide_set() && s.get_name() == name)
                {
                    return Err(DocError::Undefined {
                        program,
                        what: "command",
                        name: name.clone(),
                        line,
                    });
                }
            }
        }
    }
    Ok(())
}

/// `NAME [--opt VALUE]… COMMAND [ARGS]`: every visible option with its value (clap_mangen's
/// synopsis leaves the values out).
fn synopsis(cmd: &Command) -> String {
    let mut roff = Roff::new();
    roff.control("SH", ["SYNOPSIS"]);
    let mut line = vec![bold(cmd.get_name())];
    for arg in visible_options(cmd) {
        line.push(roman(" ["));
        match (arg.get_short(), arg.get_long()) {
            (Some(s), Some(l)) => {
                line.push(bold(format!("-{s}")));
                line.push(roman("|"));
                line.push(bold(format!("--{l}")));
            }
            (Some(s), None) => line.push(bold(format!("-{s}"))),
            (None, Some(l)) => line.push(bold(format!("--{l}"))),
            (None, None) => continue,
        }
        if takes_value(arg) {
            line.push(roman(" "));
            line.push(italic(value_name(arg)));
        }
        line.push(roman("]"));
    }
    for arg in cmd.get_positionals().filter(|a| !a.is_hide_set()) {
        line.push(roman(" "));
        line.extend(positional(arg));
    }
    if cmd.get_subcommands().any(|s| !s.is_hide_set()) {
        line.push(roman(" "));
        line.push(italic("COMMAND"));
        line.push(roman(" ["));
        line.push(italic("ARGS"));
        line.push(roman("]"));
    }
    roff.text(line);
    roff.to_roff()
}

/// The options a page lists: visible, named (not positional).
fn visible_options(cmd: &Command) -> impl Iterator<Item = &Arg> {
    cmd.get_arguments()
        .filter(|a| !a.is_hide_set() && !a.is_positional())
}

fn options_section(cmd: &Command, prose: &Prose) -> String {
    let (mut out, mut roff) = (String::new(), Roff::new());
    roff.control("SH", ["OPTIONS"]);
    for arg in visible_options(cmd) {
        option_item(&mut roff, arg);
        if let Some(text) = arg.get_long().and_then(|l| prose.option(l)) {
            raw(&mut out, &mut roff, text);
        }
    }
    flush(&mut out, &mut roff);
    out
}

/// `.TP`, the flag with its value, the help, then default, environment and possible values.
fn option_item(roff: &mut Roff, arg: &Arg) {
    roff.control("TP", []);
    let mut head = Vec::new();
    if let Some(short) = arg.get_short() {
        head.push(bold(format!("-{short}")));
        head.push(roman(", "));
    }
    if let Some(long) = arg.get_long() {
        head.push(bold(format!("--{long}")));
    }
    if takes_value(arg) {
        head.push(roman(" "));
        head.push(italic(value_name(arg)));
    }
    roff.text(head);
    help_lines(
        roff,
        arg.get_long_help()
            .or(arg.get_help())
            .map(ToString::to_string),
    );
    let mut facts = Vec::new();
    let defaults: Vec<String> = arg
        .get_default_values()
        .iter()
        .map(|v| v.to_string_lossy().into_owned())
        .filter(|v| !v.is_empty())
        .collect();
    if takes_value(arg) && !defaults.is_empty() {
        facts.push(format!("Default: {}.", defaults.join(", ")));
    }
    if let Some(env) = arg.get_env() {
        facts.push(format!("Environment: {}.", env.to_string_lossy()));
    }
    let values: Vec<String> = arg
        .get_possible_values()
        .iter()
        .filter(|v| !v.is_hide_set())
        .map(|v| v.get_name().to_string())
        .collect();
    if takes_value(arg) && !values.is_empty() {
        facts.push(format!("Values: {}.", values.join(", ")));
    }
    if !facts.is_empty() {
        roff.text([roman(facts.join(" "))]);
    }
}

fn commands_section(cmd: &Command, prose: &Prose) -> String {
    let (mut out, mut roff) = (String::new(), Roff::new());
    let roff = &mut roff;
    roff.control("SH", ["COMMANDS"]);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        roff.control("TP", []);
        let mut head = vec![bold(sub.get_name())];
        for arg in sub.get_positionals().filter(|a| !a.is_hide_set()) {
            head.push(roman(" "));
            head.extend(positional(arg));
        }
        let own: Vec<&Arg> = own_options(sub).collect();
        if !own.is_empty() {
            head.push(roman(" [options]"));
        }
        roff.text(head);
        help_lines(
            roff,
            sub.get_long_about()
                .or(sub.get_about())
                .map(ToString::to_string),
        );
        let aliases: Vec<&str> = sub.get_visible_aliases().collect();
        if !aliases.is_empty() {
            roff.text([roman(format!("Aliases: {}.", aliases.join(", ")))]);
        }
        if let Some(text) = prose.command(sub.get_name()) {
            raw(&mut out, roff, text);
        }
        if !own.is_empty() {
            roff.control("RS", []);
            for arg in own {
                option_item(roff, arg);
            }
            roff.control("RE", []);
        }
    }
    flush(&mut out, roff);
    out
}

/// A command's own options: visible, named, not the global ones (listed under OPTIONS) and not
/// clap's `--help`.
fn own_options(sub: &Command) -> impl Iterator<Item = &Arg> {
    visible_options(sub).filter(|a| {
        !a.is_global_set()
            && !matches!(a.get_action(), ArgAction::Help | ArgAction::HelpLong)
            && !matches!(a.get_action(), ArgAction::Version)
    })
}

/// `RES`, `[SIZE]`, `UNIT...`
fn positional(arg: &Arg) -> Vec<Inline> {
    let mut name = value_name(arg);
    if matches!(arg.get_action(), ArgAction::Append)
        || arg.get_num_args().is_some_and(|n| n.max_values() > 1)
    {
        name.push_str("...");
    }
    if arg.is_required_set() {
        vec![italic(name)]
    } else {
        vec![roman("["), italic(name), roman("]")]
    }
}

fn takes_value(arg: &Arg) -> bool {
    arg.get_action().takes_values()
}

fn value_name(arg: &Arg) -> String {
    match arg.get_value_names() {
        Some(names) if !names.is_empty() => names
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(" "),
        _ => arg.get_id().as_str().to_uppercase(),
    }
}

/// Help text: one text line per line, an empty line starts an indented paragraph (`.IP`, which
/// stays inside a `.TP` item).
/// clap drops the final period of a one-sentence doc comment; it is put back, because facts and
/// prose follow on the same paragraph.
fn help_lines(roff: &mut Roff, text: Option<String>) {
    let Some(mut text) = text else { return };
    let end = text.trim_end().len();
    text.truncate(end);
    if !text.ends_with(['.', '!', '?', ':']) {
        text.push('.');
    }
    for line in text.lines() {
        if line.trim().is_empty() {
            roff.control("IP", []);
        } else {
            roff.text([roman(line)]);
        }
    }
}

/// Appends prose to a page being built: it is roff already, its lines are copied as they are (a
/// `.IP` starts a paragraph inside a list item). The roff written so far is flushed first.
fn raw(out: &mut String, roff: &mut Roff, text: &str) {
    flush(out, roff);
    out.push_str(text);
    if !text.ends_with('\n') {
        out.push('\n');
    }
}

fn flush(out: &mut String, roff: &mut Roff) {
    out.push_str(&std::mem::take(roff).to_roff());
}

fn quote_heading(name: &str) -> String {
    if name.contains(' ') {
        format!("\"{name}\"")
    } else {
        name.to_string()
    }
}

#[cfg(test)]
mod tests;
