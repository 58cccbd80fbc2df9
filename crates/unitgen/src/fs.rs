//! The only module that touches the file system: finding and loading templates, listing
//! existing unit names, and writing generated files atomically.
//!
//! Search path (MARS `@MARS_PATH`): `$MARS_PATH` (colon-separated) if set, else `.`,
//! `$HOME/.marsadm`, `/etc/marsadm`, `/usr/lib/marsadm`, `/usr/local/lib/marsadm`. In each
//! entry the subdirectory `systemd-templates/` is used if it exists, else the entry itself. Only
//! files named `*.<suffix>` with a recognised suffix ([`crate::generate::SUFFIXES`]) and not
//! starting with `.` (a shell glob would not list them either) are templates; the first hit per
//! file name wins.
//!
//! User macro files (MARS `get_macro`): `NAME.tpl` directly in a search-path entry (not in its
//! `systemd-templates/`), the first hit per name wins; comments (`# …`, `// …`, `/* … */`)
//! and backslash-newline continuations are removed and the two characters `\n` become a
//! newline, as MARS reads them ([`load_macros`]).
//!
//! The `%readlink{}`, `%get-glob{}` and `%foreach-glob{}` macros read the file system through
//! [`read_link`] and [`glob`].

use std::collections::BTreeSet;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use thiserror::Error;

use crate::generate::{natural_cmp, GeneratedFile, Template, TemplateSet, SUFFIXES};
use crate::markers::Markers;

/// Subdirectory of each search-path entry that holds templates (`$SYSTEMD_SUBDIR`).
pub const TEMPLATE_SUBDIR: &str = "systemd-templates";
/// The system unit directories whose unit names count as existing (`$SYSTEMD_SYSTEM_DIRS`).
pub const SYSTEM_UNIT_DIRS: [&str; 3] = [
    "/etc/systemd/system",
    "/run/systemd/system",
    "/usr/lib/systemd/system",
];
/// The first line of every generated file starts with this (after a shebang line).
pub const GENERATED_MARK: &str = "### GENERATED FROM: ";

/// A file-system error with the path it concerns.
#[derive(Debug, Error)]
pub enum FsError {
    /// I/O failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// A template is not UTF-8.
    #[error("{0}: template is not valid UTF-8")]
    NotUtf8(PathBuf),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> FsError + '_ {
    move |source| FsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The template search path: `mars_path` (the value of `$MARS_PATH`) if non-empty, else MARS's
/// default list with `home` (`$HOME`) and `etc_marsadm` (`/etc/marsadm`).
pub fn search_path(
    mars_path: Option<&str>,
    home: Option<&Path>,
    etc_marsadm: &Path,
) -> Vec<PathBuf> {
    if let Some(p) = mars_path.filter(|p| !p.is_empty()) {
        return p
            .split(':')
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
            .collect();
    }
    let mut dirs = vec![PathBuf::from(".")];
    if let Some(home) = home {
        dirs.push(home.join(".marsadm"));
    }
    dirs.push(etc_marsadm.to_path_buf());
    dirs.push("/usr/lib/marsadm".into());
    dirs.push("/usr/local/lib/marsadm".into());
    dirs
}

fn has_unit_suffix(name: &str) -> bool {
    !name.starts_with('.')
        && name
            .rsplit_once('.')
            .is_some_and(|(stem, suffix)| !stem.is_empty() && SUFFIXES.contains(&suffix))
}

/// Regular files (following symlinks) in `dir` with a recognised suffix, in natural order.
fn unit_files(dir: &Path) -> Result<Vec<(String, PathBuf)>, FsError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let path = entry.path();
        if has_unit_suffix(&name) && path.is_file() {
            out.push((name, path));
        }
    }
    out.sort_by(|a, b| natural_cmp(&a.0, &b.0));
    Ok(out)
}

fn mtime_secs(meta: &std::fs::Metadata) -> i64 {
    match meta.modified().map(|t| t.duration_since(UNIX_EPOCH)) {
        Ok(Ok(d)) => d.as_secs() as i64,
        Ok(Err(e)) => -(e.duration().as_secs() as i64),
        Err(_) => 0,
    }
}

/// Loads the templates and the user macro files from `search_path` (see the module docs).
/// Missing entries are skipped.
pub fn load_templates(search_path: &[PathBuf]) -> Result<TemplateSet, FsError> {
    let mut seen = BTreeSet::new();
    let mut list = Vec::new();
    for entry in search_path {
        let sub = entry.join(TEMPLATE_SUBDIR);
        let dir = if sub.is_dir() { sub } else { entry.clone() };
        if !dir.is_dir() {
            continue;
        }
        for (name, path) in unit_files(&dir)? {
            if !seen.insert(name.clone()) {
                continue;
            }
            let bytes = std::fs::read(&path).map_err(io_err(&path))?;
            let meta = std::fs::metadata(&path).map_err(io_err(&path))?;
            let text = String::from_utf8(bytes).map_err(|_| FsError::NotUtf8(path.clone()))?;
            list.push(Template {
                name,
                path: path.display().to_string(),
                text,
                mtime: mtime_secs(&meta),
            });
        }
    }
    // Names are unique by construction.
    let set = TemplateSet::new(list).unwrap_or_default();
    Ok(set.with_macros(load_macros(search_path)?))
}

/// Most paths one `%get-glob{}`/`%foreach-glob{}` returns, and most directory entries it
/// reads, so that a template cannot make the generator walk a whole disk.
pub const MAX_GLOB: usize = 10_000;

/// Largest macro file read.
pub const MAX_MACRO_FILE: u64 = 1 << 20;

/// MARS's `$match_comment`, what it strips from macro files.
fn strip_comments(text: &str) -> String {
    // Constant and valid; a failure would only leave comments in place.
    match regex::Regex::new(r"#[^\n]*|//[ \t][^\n]*|/\*(?:[^*]|\*[^/])*\*/|\\\n\s*") {
        Ok(re) => re.replace_all(text, "").replace("\\n", "\n"),
        Err(_) => text.replace("\\n", "\n"),
    }
}

/// The user macro files on `search_path` (see the module docs), by name.
pub fn load_macros(
    search_path: &[PathBuf],
) -> Result<std::collections::BTreeMap<String, String>, FsError> {
    let mut out = std::collections::BTreeMap::new();
    for dir in search_path {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut files = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err(dir))?;
            let Ok(file) = entry.file_name().into_string() else {
                continue;
            };
            let Some(name) = file.strip_suffix(".tpl") else {
                continue;
            };
            let path = entry.path();
            if name.is_empty() || !path.is_file() || out.contains_key(name) {
                continue;
            }
            files.push((name.to_string(), path));
        }
        for (name, path) in files {
            let meta = std::fs::metadata(&path).map_err(io_err(&path))?;
            if meta.len() > MAX_MACRO_FILE {
                return Err(FsError::Io {
                    path,
                    source: io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("macro file larger than {MAX_MACRO_FILE} bytes"),
                    ),
                });
            }
            let bytes = std::fs::read(&path).map_err(io_err(&path))?;
            let text = String::from_utf8(bytes).map_err(|_| FsError::NotUtf8(path.clone()))?;
            out.insert(name, strip_comments(&text));
        }
    }
    Ok(out)
}

/// MARS's `get_link(path, 1)`: the target of a symlink, `""` for `.deleted`; `None` when
/// `path` is no symlink (MARS warns and uses `""`).
pub fn read_link(path: &str) -> Option<String> {
    let target = std::fs::read_link(path).ok()?;
    let target = target.to_string_lossy().into_owned();
    Some(if target == ".deleted" {
        String::new()
    } else {
        target
    })
}

/// `{a,b}` alternatives expanded (nested; an unbalanced or single-element brace stays).
fn brace_expand(word: &str, out: &mut Vec<String>) {
    if out.len() >= MAX_GLOB {
        return;
    }
    let b = word.as_bytes();
    let Some(open) = b.iter().position(|c| *c == b'{') else {
        out.push(word.to_string());
        return;
    };
    let mut depth = 0;
    let mut commas = Vec::new();
    let mut close = None;
    for (i, c) in b.iter().enumerate().skip(open) {
        match c {
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    close = Some(i);
                    break;
                }
            }
            b',' if depth == 1 => commas.push(i),
            _ => {}
        }
    }
    let Some(close) = close else {
        out.push(word.to_string());
        return;
    };
    if commas.is_empty() {
        // `{}` and `{x}` are literal in csh globbing; expand what follows.
        let mut rest = Vec::new();
        brace_expand(&word[close + 1..], &mut rest);
        for r in rest {
            out.push(format!("{}{r}", &word[..close + 1]));
        }
        return;
    }
    let mut bounds = vec![open];
    bounds.extend(&commas);
    bounds.push(close);
    for w in bounds.windows(2) {
        let alt = &word[w[0] + 1..w[1]];
        brace_expand(
            &format!("{}{alt}{}", &word[..open], &word[close + 1..]),
            out,
        );
    }
}

fn has_magic(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// A glob component as an anchored regex (`*`, `?`, `[…]`; a leading `.` must be literal).
fn component_regex(pat: &str) -> Option<regex::Regex> {
    let mut re = String::from("^");
    let mut chars = pat.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '*' => re.push_str("[^/]*"),
            '?' => re.push_str("[^/]"),
            '[' => {
                let mut class = String::new();
                let mut closed = false;
                if chars.peek() == Some(&'!') || chars.peek() == Some(&'^') {
                    chars.next();
                    class.push('^');
                }
                for d in chars.by_ref() {
                    if d == ']' && !(class.is_empty() || class == "^") {
                        closed = true;
                        break;
                    }
                    if d == '\\' || d == '[' || (d == ']') {
                        class.push('\\');
                    }
                    class.push(d);
                }
                if !closed {
                    return None;
                }
                re.push('[');
                re.push_str(&class);
                re.push(']');
            }
            c => re.push_str(&regex::escape(&c.to_string())),
        }
    }
    re.push('$');
    regex::Regex::new(&re).ok()
}

/// Perl's `glob` as MARS's `lamport_glob` uses it: the pattern is split at blanks, braces
/// are expanded, a word without `*?[` is returned as it is, the others are matched
/// directory by directory (sorted; names starting with `.` only by a pattern starting with
/// `.`); symlinks to `.deleted` are left out. At most [`MAX_GLOB`] results.
pub fn glob(pattern: &str) -> Vec<String> {
    let mut words = Vec::new();
    for w in pattern.split_ascii_whitespace() {
        brace_expand(w, &mut words);
    }
    let mut out = Vec::new();
    let mut budget = MAX_GLOB;
    for w in words {
        if !has_magic(&w) {
            if !std::fs::read_link(&w).is_ok_and(|t| t.as_os_str() == ".deleted") {
                out.push(w);
            }
            continue;
        }
        let absolute = w.starts_with('/');
        let mut found = vec![if absolute {
            "/".to_string()
        } else {
            String::new()
        }];
        for comp in w.split('/').filter(|c| !c.is_empty()) {
            let mut next = Vec::new();
            for base in &found {
                let join = |n: &str| {
                    if base.is_empty() {
                        n.to_string()
                    } else if base.ends_with('/') {
                        format!("{base}{n}")
                    } else {
                        format!("{base}/{n}")
                    }
                };
                if !has_magic(comp) {
                    next.push(join(comp));
                    continue;
                }
                let Some(re) = component_regex(comp) else {
                    continue;
                };
                if budget == 0 {
                    break;
                }
                let dir = if base.is_empty() { "." } else { base.as_str() };
                let Ok(entries) = std::fs::read_dir(dir) else {
                    continue;
                };
                let mut names = Vec::new();
                for e in entries.flatten() {
                    if budget == 0 {
                        break;
                    }
                    budget -= 1;
                    let Ok(n) = e.file_name().into_string() else {
                        continue;
                    };
                    if n.starts_with('.') && !comp.starts_with('.') {
                        continue;
                    }
                    if re.is_match(&n) {
                        names.push(n);
                    }
                }
                names.sort();
                next.extend(names.iter().map(|n| join(n)));
            }
            found = next;
        }
        for p in found {
            let deleted = std::fs::read_link(&p).is_ok_and(|t| t.as_os_str() == ".deleted");
            if std::fs::symlink_metadata(&p).is_ok() && !deleted {
                out.push(p);
            }
        }
    }
    out.truncate(MAX_GLOB);
    out
}

/// Unit names found in `dirs` (missing ones skipped), except in `exclude` (our own output
/// directories: `/run/systemd/system` is both a system directory and MARS's target).
pub fn existing_unit_names(
    dirs: &[PathBuf],
    exclude: &[PathBuf],
) -> Result<BTreeSet<String>, FsError> {
    let mut names = BTreeSet::new();
    for dir in dirs {
        if exclude.iter().any(|e| e == dir) || !dir.is_dir() {
            continue;
        }
        names.extend(unit_files(dir)?.into_iter().map(|(name, _)| name));
    }
    Ok(names)
}

/// What [`write_generated`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteReport {
    /// Files created or replaced (content or mode differed).
    pub changed: Vec<String>,
    /// Files already up to date.
    pub unchanged: Vec<String>,
}

impl WriteReport {
    /// Whether systemd needs a `daemon-reload`.
    pub fn any_changed(&self) -> bool {
        !self.changed.is_empty()
    }
}

/// Writes each file to its [`GeneratedFile::path`] unless identical content with the right mode
/// is already there. A write goes to `.tmp.<pid>.<name>.tmp` in the same directory (created if
/// missing), gets its mode (units 0444, scripts 0544) and the template's mtime, is synced, and
/// is renamed over the target, so systemd never reads a half-written unit.
pub fn write_generated(files: &[GeneratedFile]) -> Result<WriteReport, FsError> {
    let mut report = WriteReport::default();
    for f in files {
        let path = Path::new(&f.path);
        let mode = f.dir.mode();
        if let Ok(old) = std::fs::read(path) {
            let same_mode =
                std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o7777 == mode);
            if old == f.content.as_bytes() && same_mode {
                report.unchanged.push(f.name.clone());
                continue;
            }
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let tmp = dir.join(format!(".tmp.{}.{}.tmp", std::process::id(), f.name));
        // A leftover from a crashed run may be read-only; remove it rather than fail.
        let _ = std::fs::remove_file(&tmp);
        let result = (|| -> io::Result<()> {
            let mut out = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&tmp)?;
            out.write_all(f.content.as_bytes())?;
            // The umask may have cut the mode.
            out.set_permissions(std::fs::Permissions::from_mode(mode))?;
            let stamp = if f.mtime >= 0 {
                UNIX_EPOCH + Duration::from_secs(f.mtime as u64)
            } else {
                UNIX_EPOCH - Duration::from_secs(f.mtime.unsigned_abs())
            };
            out.set_times(
                std::fs::FileTimes::new()
                    .set_modified(stamp)
                    .set_accessed(SystemTime::now()),
            )?;
            out.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if let Err(source) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(FsError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
        report.changed.push(f.name.clone());
    }
    Ok(report)
}

/// A generated file found in an output directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// Unit name.
    pub name: String,
    /// Path.
    pub path: PathBuf,
    /// Its markers (the caller needs `KEEP_RUNNING` to decide between stop and disable).
    pub markers: Markers,
}

/// Files in `dir` that carry our header (first or second line starts with
/// [`GENERATED_MARK`]) and whose names are not in `keep`: what a full regeneration no longer
/// produced. Nothing is deleted here.
pub fn stale_instances(dir: &Path, keep: &BTreeSet<String>) -> Result<Vec<Instance>, FsError> {
    let mut out = Vec::new();
    if !dir.is_dir() {
        return Ok(out);
    }
    for (name, path) in unit_files(dir)? {
        if keep.contains(&name) {
            continue;
        }
        let bytes = std::fs::read(&path).map_err(io_err(&path))?;
        let text = String::from_utf8_lossy(&bytes);
        if text.lines().take(2).any(|l| l.starts_with(GENERATED_MARK)) {
            out.push(Instance {
                name,
                path,
                markers: Markers::parse(&text),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// MARS's `get_macro`: `NAME.tpl` directly in a search-path entry, first hit wins,
    /// comments and continuations gone, `\\n` a newline; templates beside them still load.
    #[test]
    fn macro_files() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        std::fs::write(
            a.path().join("m.tpl"),
            "# a comment\n%{1} // note\n/* block\n */x\\ny \\\n   z\n",
        )
        .unwrap();
        std::fs::write(b.path().join("m.tpl"), "second").unwrap();
        std::fs::write(b.path().join("n.tpl"), "n").unwrap();
        std::fs::create_dir(b.path().join("systemd-templates")).unwrap();
        std::fs::write(b.path().join("systemd-templates/o.tpl"), "not a macro file").unwrap();
        std::fs::write(b.path().join("systemd-templates/a.service"), "[Unit]\n").unwrap();
        let path = [a.path().to_path_buf(), b.path().to_path_buf()];
        let set = load_templates(&path).unwrap();
        assert_eq!(set.len(), 1);
        let m = set.macros();
        assert_eq!(m.keys().collect::<Vec<_>>(), ["m", "n"]);
        assert_eq!(m["m"], "\n%{1} \nx\ny z\n");
    }

    /// Perl's `glob` as `lamport_glob` uses it.
    #[test]
    fn globbing() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().display().to_string();
        for f in ["r1/x", "r2/x", "r10/y", ".hidden/x"] {
            let f = d.path().join(f);
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(f, "").unwrap();
        }
        std::os::unix::fs::symlink(".deleted", d.path().join("r3")).unwrap();
        assert_eq!(
            glob(&format!("{p}/r*/x")),
            [format!("{p}/r1/x"), format!("{p}/r2/x")]
        );
        assert_eq!(
            glob(&format!("{p}/r?")),
            [format!("{p}/r1"), format!("{p}/r2")]
        );
        assert_eq!(glob(&format!("{p}/r[!1]*")), [format!("{p}/r2")]);
        assert_eq!(glob(&format!("{p}/.h*/x")), [format!("{p}/.hidden/x")]);
        assert_eq!(glob(&format!("{p}/*/z")), Vec::<String>::new());
        assert_eq!(glob("a{b,c{d,e}}f {}"), ["abf", "acdf", "acef", "{}"]);
        assert_eq!(glob(&format!("{p}/r3")), Vec::<String>::new());
        assert_eq!(read_link(&format!("{p}/r3")).as_deref(), Some(""));
        assert_eq!(read_link(&format!("{p}/r1")), None);
    }
    use crate::generate::{Config, Generator, WantedUnit};

    #[test]
    fn search_path_order() {
        let p = search_path(None, Some(Path::new("/home/u")), Path::new("/etc/marsadm"));
        let want: Vec<PathBuf> = [
            ".",
            "/home/u/.marsadm",
            "/etc/marsadm",
            "/usr/lib/marsadm",
            "/usr/local/lib/marsadm",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        assert_eq!(p, want);
        assert_eq!(
            search_path(Some("/a::/b"), None, Path::new("/e")),
            [PathBuf::from("/a"), PathBuf::from("/b")]
        );
        assert_eq!(
            search_path(Some(""), None, Path::new("/e"))[0],
            PathBuf::from(".")
        );
    }

    #[test]
    fn load_prefers_subdir_and_first_hit() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        std::fs::create_dir(a.path().join(TEMPLATE_SUBDIR)).unwrap();
        std::fs::write(a.path().join(TEMPLATE_SUBDIR).join("x.service"), "A").unwrap();
        std::fs::write(a.path().join("ignored.service"), "not in subdir").unwrap();
        std::fs::write(b.path().join("x.service"), "B").unwrap();
        std::fs::write(b.path().join("y.script"), "Y").unwrap();
        std::fs::write(b.path().join("z.txt"), "no suffix").unwrap();
        std::fs::write(b.path().join(".hidden.service"), "hidden").unwrap();
        std::fs::write(b.path().join("README"), "no suffix").unwrap();
        let set =
            load_templates(&[a.path().into(), b.path().into(), "/nonexistent".into()]).unwrap();
        let names: Vec<&str> = set.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names.len(), 2);
        assert_eq!(set.get("x.service").unwrap().text, "A");
        assert_eq!(set.get("y.script").unwrap().text, "Y");
        assert!(set.get("x.service").unwrap().mtime > 0);
    }

    #[test]
    fn existing_units_skip_excluded() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        std::fs::write(a.path().join("mars.mount"), "").unwrap();
        std::fs::write(b.path().join("generated.service"), "").unwrap();
        let names =
            existing_unit_names(&[a.path().into(), b.path().into()], &[b.path().into()]).unwrap();
        assert_eq!(names, BTreeSet::from(["mars.mount".to_string()]));
    }

    #[test]
    fn writes_atomically_and_reports_changes() {
        let out = tempfile::tempdir().unwrap();
        let templates = TemplateSet::new(vec![
            Template {
                mtime: 1_600_000_000,
                ..Template::new("a.service", "[Unit]\n# ALWAYS_START\n")
            },
            Template::new("b-@{res}.script", "#!/bin/sh\n# KEEP_RUNNING\nexit 0\n"),
        ])
        .unwrap();
        let config = Config {
            unit_dir: out.path().join("units").display().to_string(),
            scripts_dir: out.path().join("scripts").display().to_string(),
            ..Config::default()
        };
        let generator = Generator::new(&templates, &config, Default::default(), vec!["r".into()]);
        let generation = generator
            .generate(&[WantedUnit {
                res: "r".into(),
                unit: "b-r.script".into(),
            }])
            .unwrap();
        let report = write_generated(&generation.files).unwrap();
        assert_eq!(report.changed, ["a.service", "b-r.script"]);
        let unit = out.path().join("units/a.service");
        let meta = std::fs::metadata(&unit).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o444);
        assert_eq!(mtime_secs(&meta), 1_600_000_000);
        let script = out.path().join("scripts/b-r.script");
        assert_eq!(
            std::fs::metadata(&script).unwrap().permissions().mode() & 0o777,
            0o544
        );
        assert!(std::fs::read_to_string(&script)
            .unwrap()
            .starts_with("#!/bin/sh\n### GENERATED FROM: b-@{res}.script\n"));

        // Second run: nothing changed, so no daemon-reload.
        let report = write_generated(&generation.files).unwrap();
        assert!(!report.any_changed());
        assert_eq!(report.unchanged.len(), 2);

        // A changed template rewrites the read-only file.
        let mut changed = generation.files.clone();
        changed[0].content.push_str("# more\n");
        assert_eq!(write_generated(&changed).unwrap().changed, ["a.service"]);
        // No temporary files left behind.
        let leftovers: Vec<_> = std::fs::read_dir(out.path().join("units"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 1);

        // Stale instances: our header, not kept; foreign files are ignored.
        std::fs::write(out.path().join("units/foreign.service"), "[Unit]\n").unwrap();
        let stale = stale_instances(&out.path().join("units"), &BTreeSet::new()).unwrap();
        assert_eq!(stale.len(), 1);
        assert!(stale[0].markers.always_start);
        let stale = stale_instances(&out.path().join("scripts"), &BTreeSet::new()).unwrap();
        assert!(stale[0].markers.keep_running);
        let keep = BTreeSet::from(["a.service".to_string()]);
        assert!(stale_instances(&out.path().join("units"), &keep)
            .unwrap()
            .is_empty());
    }
}
