//! marsadm(8) and the completions are generated from the binary's clap definition: every
//! command and global option `--help` lists is on the page and in every completion script
//! (`marsadm generate man|completions DIR`, run by scripts/build-deb).

use std::path::Path;
use std::process::Command;

fn generate(what: &str, dir: &Path) -> Vec<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_marsadm"))
        .args(["generate", what])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

/// The commands and options of `marsadm --help`.
fn help() -> (Vec<String>, Vec<String>) {
    let out = Command::new(env!("CARGO_BIN_EXE_marsadm"))
        .arg("--help")
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let mut commands = Vec::new();
    let mut options = Vec::new();
    let mut in_commands = false;
    for line in text.lines() {
        if line.starts_with("Commands:") {
            in_commands = true;
            continue;
        }
        if !line.starts_with("  ") {
            in_commands = false;
        }
        let word = line.split_whitespace().next().unwrap_or("");
        if in_commands && line.starts_with("  ") && !line.starts_with("   ") && word != "help" {
            commands.push(word.to_string());
        }
        // Option lines: "  -h, --help", "      --root <ROOT>".
        let t = line.trim_start();
        if t.starts_with('-') {
            if let Some(o) = t
                .split([' ', ','])
                .find(|w| w.starts_with("--") && w.len() > 2)
            {
                // A counted flag shows as `--force...`.
                options.push(o.trim_end_matches("...").to_string());
            }
        }
    }
    (commands, options)
}

#[test]
fn man_page_and_completions_cover_help() {
    let dir = tempfile::tempdir().unwrap();
    let page = generate("man", dir.path());
    assert_eq!(page, [dir.path().join("marsadm.8").display().to_string()]);
    let page = std::fs::read_to_string(dir.path().join("marsadm.8")).unwrap();
    let scripts = generate("completions", dir.path());
    assert_eq!(scripts.len(), 3, "{scripts:?}");
    let (commands, options) = help();
    assert!(commands.len() > 40, "commands of --help: {commands:?}");
    for c in &commands {
        let entry = format!(".TP\n\\fB{}\\fR", c.replace('-', "\\-"));
        assert!(page.contains(&entry), "command {c} is not on the page");
        for s in &scripts {
            let text = std::fs::read_to_string(s).unwrap();
            assert!(text.contains(c.as_str()), "command {c} is not in {s}");
        }
    }
    assert!(options.len() >= 7, "options of --help: {options:?}");
    for o in &options {
        let entry = format!("\\fB{}\\fR", o.replace('-', "\\-"));
        assert!(page.contains(&entry), "option {o} is not on the page");
    }
    assert!(!page.contains("\\fBgenerate\\fR"), "generate stays hidden");
}

#[test]
fn generate_refuses_unknown_kinds() {
    let out = Command::new(env!("CARGO_BIN_EXE_marsadm"))
        .args(["generate", "pdf", "/nonexistent"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "a usage error");
    assert!(!Path::new("/nonexistent").exists());
}
