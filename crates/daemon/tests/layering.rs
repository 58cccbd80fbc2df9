//! The daemon's modules depend only downward, and no type's methods are spread across files
//! (a `tidy` check, as TigerBeetle keeps them): this test reads the sources.
//!
//! ```text
//!  main (composition root: may use anything)
//!   → logging → settings (used by main only)
//!   → metrics (reads what `view` shows)
//!   → control  nbd
//!     → host
//!       → resource
//!         → replication  systemd
//!           → local  meta  mars_tree
//!             → peer  identity
//!               → root  listen  traffic
//! ```
//!
//! A module may name (`crate::x`) only modules of a lower layer; modules of one layer do not
//! use each other. So there is no cycle, and a newcomer finds what a file may touch from its
//! place in the tree.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Layers from the top; `main` stands above all of them.
const LAYERS: &[&[&str]] = &[
    &["logging"],
    &["settings"],
    &["metrics"],
    &["control", "nbd"],
    &["host"],
    &["resource"],
    &["replication", "systemd"],
    &["local", "meta", "mars_tree"],
    &["peer", "identity"],
    &["root", "listen", "traffic"],
];

fn rank(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `dir`, with the top-level module it belongs to.
fn files(dir: &Path, top: Option<&str>, out: &mut Vec<(String, PathBuf)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("read src")
        .map(|e| e.expect("entry").path())
        .collect();
    entries.sort();
    for p in entries {
        let name = p
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("utf-8 name")
            .to_string();
        if p.is_dir() {
            files(&p, Some(top.unwrap_or(&name)), out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push((top.unwrap_or(&name).to_string(), p));
        }
    }
}

/// Source without comments (line comments and doc comments; block comments are not used).
fn code(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level modules `text` refers to with `crate::NAME`.
fn uses(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        let after = &rest[i + "crate::".len()..];
        let name: String = after
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            out.insert(name);
        }
        // `use crate::{a, b}`
        if let Some(group) = after.strip_prefix('{') {
            if let Some(end) = group.find('}') {
                for part in group[..end].split(',') {
                    let n: String = part
                        .trim()
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if !n.is_empty() {
                        out.insert(n);
                    }
                }
            }
        }
        rest = after;
    }
    out
}

#[test]
fn modules_depend_only_downward() {
    let mut all = Vec::new();
    files(&src(), None, &mut all);
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut unknown = BTreeSet::new();
    for (module, path) in &all {
        if module == "main" {
            continue;
        }
        if rank(module).is_none() {
            unknown.insert(module.clone());
            continue;
        }
        let text = code(&std::fs::read_to_string(path).expect("read"));
        for used in uses(&text) {
            if used != *module {
                edges
                    .entry(module.clone())
                    .or_default()
                    .insert(format!("{used} ({})", path.display()));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "modules without a layer (add them to LAYERS in tests/layering.rs): {unknown:?}"
    );
    let mut wrong = Vec::new();
    for (from, tos) in &edges {
        let r = rank(from).expect("ranked");
        for to in tos {
            let name = to.split(' ').next().expect("name");
            match rank(name) {
                Some(t) if t > r => {}
                Some(_) => wrong.push(format!("{from} uses {to}: not a lower layer")),
                None => wrong.push(format!("{from} uses {to}: a module without a layer")),
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "upward or sideways imports:\n{}",
        wrong.join("\n")
    );
}

/// `impl TYPE` blocks (inherent, not trait impls) of one type live in one file.
#[test]
fn no_type_has_methods_in_several_files() {
    let mut all = Vec::new();
    files(&src(), None, &mut all);
    let mut homes: BTreeMap<String, BTreeSet<PathBuf>> = BTreeMap::new();
    for (_, path) in &all {
        let text = code(&std::fs::read_to_string(path).expect("read"));
        for line in text.lines() {
            let l = line.trim_start();
            let Some(rest) = l.strip_prefix("impl") else {
                continue;
            };
            if !(rest.starts_with(' ') || rest.starts_with('<')) || rest.contains(" for ") {
                continue;
            }
            // `impl<T: X> Name<T> {` → `Name`
            let rest = if rest.starts_with('<') {
                let mut depth = 0;
                let mut end = 0;
                for (i, c) in rest.char_indices() {
                    match c {
                        '<' => depth += 1,
                        '>' => {
                            depth -= 1;
                            if depth == 0 {
                                end = i + 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                &rest[end..]
            } else {
                rest
            };
            let name: String = rest
                .trim_start()
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                homes.entry(name).or_default().insert(path.clone());
            }
        }
    }
    let spread: Vec<String> = homes
        .iter()
        .filter(|(_, files)| files.len() > 1)
        .map(|(t, files)| format!("{t}: {files:?}"))
        .collect();
    assert!(
        spread.is_empty(),
        "types with methods in several files:\n{}",
        spread.join("\n")
    );
}

#[test]
fn the_checks_see_what_they_check() {
    let t = "use crate::host::Host;\nuse crate::{local, meta::X};\n// crate::control\nlet x = crate::peer::send;";
    let u = uses(&code(t));
    assert_eq!(
        u,
        ["host", "local", "meta", "peer"]
            .iter()
            .map(ToString::to_string)
            .collect()
    );
    assert_eq!(rank("logging"), Some(0));
    assert!(rank("control") > rank("settings"));
    assert!(rank("control") > rank("metrics"));
    assert!(rank("root") > rank("peer"));
}
