use clap::{Arg, ArgAction, Command};

use super::*;

fn tool() -> Command {
    Command::new("tool")
        .version("1.2.3")
        .about("does things")
        .arg(
            Arg::new("root")
                .long("root")
                .value_name("DIR")
                .env("TOOL_ROOT")
                .default_value("/var/lib/tool")
                .global(true)
                .help("Where the state is."),
        )
        .arg(
            Arg::new("secret")
                .long("secret")
                .hide(true)
                .action(ArgAction::SetTrue),
        )
        .subcommand(
            Command::new("make")
                .about("Make RES.")
                .visible_alias("create")
                .arg(Arg::new("res").required(true).value_name("RES"))
                .arg(Arg::new("size").value_name("SIZE"))
                .arg(
                    Arg::new("ip")
                        .long("ip")
                        .value_name("ADDR")
                        .help("Address."),
                ),
        )
        .subcommand(Command::new("hidden").hide(true))
}

const PROSE: &str = r#".\" header comment
.\" mars: section DESCRIPTION
Long description.
.\" mars: option --root
.IP
More about the root.
.\" mars: command make
Details of make.

.\" mars: section EXAMPLES
.nf
tool make r1
.fi
"#;

#[test]
fn page_merges_clap_and_prose() {
    let page = man_page(tool(), PROSE, "2026-12-07").unwrap();
    assert!(page.contains(".TH TOOL 8 2026-12-07 \"mars 1.2.3\" \"System Administration\""));
    assert!(page.contains(".SH NAME\ntool \\- does things"), "{page}");
    // Sections in order: SYNOPSIS, DESCRIPTION (prose), OPTIONS, COMMANDS, EXAMPLES.
    let at = |s: &str| {
        page.find(s)
            .unwrap_or_else(|| panic!("{s} missing:\n{page}"))
    };
    assert!(page.contains(
        ".SH SYNOPSIS\n\\fBtool\\fR [\\fB\\-\\-root\\fR \\fIDIR\\fR] [\\fB\\-h\\fR|\\fB\\-\\-help\\fR] [\\fB\\-V\\fR|\\fB\\-\\-version\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]\n"
    ), "{page}");
    assert!(
        !page.contains("\\fBhelp\\fR"),
        "clap's help command is left out"
    );
    assert!(at(".SH SYNOPSIS") < at(".SH DESCRIPTION\nLong description."));
    assert!(at(".SH DESCRIPTION") < at(".SH OPTIONS"));
    assert!(at(".SH OPTIONS") < at(".SH COMMANDS"));
    assert!(at(".SH COMMANDS") < at(".SH EXAMPLES\n.nf\ntool make r1\n.fi\n"));
    // The option with value, help, default, environment, then its prose.
    assert!(page.contains(
        "\\fB\\-\\-root\\fR \\fIDIR\\fR\nWhere the state is.\nDefault: /var/lib/tool. Environment: TOOL_ROOT.\n.IP\nMore about the root.\n"
    ), "{page}");
    assert!(!page.contains("secret"), "hidden options are left out");
    // The command with its arguments, about, alias, prose and own options (not the global).
    assert!(page.contains("\\fBmake\\fR \\fIRES\\fR [\\fISIZE\\fR] [options]\nMake RES.\nAliases: create.\nDetails of make.\n.RS\n.TP\n\\fB\\-\\-ip\\fR \\fIADDR\\fR\nAddress.\n.RE\n"), "{page}");
    assert!(!page.contains("hidden"), "hidden commands are left out");
    // One preamble only.
    assert_eq!(page.matches(".ie \\n(.g").count(), 1, "{page}");
}

#[test]
fn prose_must_belong_to_the_definition() {
    let err = man_page(tool(), ".\\\" mars: option --gone\ntext\n", "").unwrap_err();
    assert!(
        matches!(&err, DocError::Undefined { what: "option", name, line: 1, .. } if name == "--gone"),
        "{err}"
    );
    let err = man_page(tool(), ".\\\" mars: option --secret\ntext\n", "").unwrap_err();
    assert!(matches!(err, DocError::Undefined { .. }), "hidden: {err}");
    let err = man_page(tool(), "\n.\\\" mars: command hidden\ntext\n", "").unwrap_err();
    assert!(
        matches!(
            &err,
            DocError::Undefined {
                what: "command",
                line: 2,
                ..
            }
        ),
        "{err}"
    );
    let err = man_page(tool(), ".\\\" mars: section OPTIONS\ntext\n", "").unwrap_err();
    assert!(matches!(err, DocError::GeneratedSection { .. }), "{err}");
}

#[test]
fn malformed_prose_is_refused() {
    let e = |t: &str| Prose::parse(t).unwrap_err();
    assert_eq!(e("text first\n"), ProseError::Stray { line: 1 });
    assert!(matches!(
        e(".\\\" mars: chapter X\n"),
        ProseError::Directive { line: 1, .. }
    ));
    assert!(matches!(
        e(".\\\" mars: option root\n"),
        ProseError::Directive { .. }
    ));
    assert!(matches!(
        e(".\\\" mars: command\n"),
        ProseError::Directive { .. }
    ));
    assert_eq!(
        e(".\\\" mars: command a\nx\n.\\\" mars: command a\n"),
        ProseError::Twice {
            line: 3,
            target: Target::Command("a".into())
        }
    );
}

#[test]
fn completions_for_three_shells() {
    let dir = tempfile::tempdir().unwrap();
    let paths = write_completions(tool(), dir.path()).unwrap();
    let names: Vec<String> = paths
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["tool.bash", "_tool", "tool.fish"]);
    let bash = std::fs::read_to_string(&paths[0]).unwrap();
    assert!(bash.contains("make") && bash.contains("--root"), "{bash}");
}

#[test]
fn dates() {
    assert_eq!(date_of(0), "1970-01-01");
    assert_eq!(date_of(951_782_400), "2000-02-29");
    assert_eq!(date_of(1_796_601_600), "2026-12-07");
}
