//! `marsadm generate man|completions DIR` (hidden): the man page and the bash, zsh and fish
//! completions of marsadm, from its clap definition (`Cli`) merged with the prose in
//! `docs/man/marsadm.8.prose` (see `mars-docgen`); the completions also know every
//! `view-NAME` macro (`crate::macros`). The package build runs it, so what is
//! installed always matches the binary.

use std::path::Path;

use anyhow::{Context, Result};
use clap::CommandFactory;

use crate::Cli;

/// The hand-written parts of marsadm(8).
const PROSE: &str = include_str!("../../../docs/man/marsadm.8.prose");

/// What `generate` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum What {
    /// DIR/marsadm.8
    Man,
    /// DIR/marsadm.bash, DIR/_marsadm (zsh), DIR/marsadm.fish
    Completions,
}

pub fn run(what: What, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
    let paths = match what {
        What::Man => vec![mars_docgen::write_man(Cli::command(), PROSE, dir)?],
        // The view macros bypass clap at run time; here they become commands to complete.
        What::Completions => {
            mars_docgen::write_completions(crate::macros::add_subcommands(Cli::command()), dir)?
        }
    };
    for p in paths {
        println!("{}", p.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The prose belongs to commands and options that exist (a removed command with prose left
    /// fails here), and every visible command has an entry.
    #[test]
    fn man_page_of_the_definition() {
        let page = mars_docgen::man_page(Cli::command(), PROSE, "").unwrap();
        for sub in Cli::command()
            .get_subcommands()
            .filter(|s| !s.is_hide_set())
        {
            let entry = format!(".TP\n\\fB{}\\fR", sub.get_name().replace('-', "\\-"));
            assert!(page.contains(&entry), "{} missing:\n{page}", sub.get_name());
        }
        assert!(!page.contains("\\fBgenerate\\fR"), "generate is hidden");
        assert!(page.contains(".SH EXAMPLES"));
    }
}
