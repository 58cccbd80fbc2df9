//! marsd(8) is generated from the binary's own clap definition: every option `--help` lists is
//! on the page the package ships (`marsd --generate-man DIR`, run by scripts/build-deb).

use std::process::Command;

#[test]
fn man_page_lists_every_option_of_help() {
    let marsd = env!("CARGO_BIN_EXE_marsd");
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(marsd)
        .arg("--generate-man")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let page = std::fs::read_to_string(dir.path().join("marsd.8")).unwrap();
    let help = Command::new(marsd).arg("--help").output().unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    let options = &page[page.find(".SH OPTIONS").expect("OPTIONS")..];
    let mut n = 0;
    // The option lines of --help: "  -h, --help", "      --root <ROOT>".
    for line in help.lines().map(str::trim_start) {
        let Some(flag) = line
            .split([' ', ','])
            .find(|w| w.starts_with("--") && w.len() > 2)
            .filter(|_| line.starts_with('-'))
        else {
            continue;
        };
        let roff = format!("\\fB{}\\fR", flag.replace('-', "\\-"));
        assert!(
            options.contains(&roff),
            "{flag} is not on the page:\n{page}"
        );
        n += 1;
    }
    assert!(n >= 10, "too few options in --help: {help}");
    assert!(
        !page.contains("generate\\-man"),
        "the hidden flag stays hidden"
    );
    for section in [
        ".SH NAME",
        ".SH SYNOPSIS",
        ".SH DESCRIPTION",
        ".SH OPTIONS",
        ".SH FILES",
    ] {
        assert!(page.contains(section), "{section} missing");
    }
}
