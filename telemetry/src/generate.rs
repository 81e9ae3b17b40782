//! What is generated from a binary's command-line definition, for
//! packagers and `make man`: `BIN completions SHELL` prints a completion
//! script (bash, zsh, fish, elvish or powershell) on standard output;
//! `BIN man-pages DIR` writes `BIN.1` and one page per subcommand
//! (`vmlot-submit.1`, ...) into DIR.
//!
//! Hidden, and the same in all three binaries: recognised only as the
//! first argument, before the real parse, so each binary's own flags, help
//! and errors stay exactly as they are and the generated files describe
//! only those.

use std::path::PathBuf;

use clap::{CommandFactory, Parser};

/// The generators, each a hidden command.
#[derive(Parser)]
#[command(disable_help_subcommand = true)]
pub enum Generate {
    /// Print the completion script for SHELL.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man page (and one per subcommand) into DIR, made if missing.
    ManPages { dir: PathBuf },
}

impl Generate {
    /// The generator the first argument names, if it names one (a bad
    /// argument after it is clap's error, as usual).
    pub fn requested() -> Option<Generate> {
        let first = std::env::args_os().nth(1)?;
        let first = first.to_str()?;
        Generate::command()
            .get_subcommands()
            .any(|s| s.get_name() == first)
            .then(Generate::parse)
    }

    /// Generates from `cmd`, the binary's command line; a completion
    /// script goes to `out`.
    pub fn run(&self, mut cmd: clap::Command, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        match self {
            Generate::Completions { shell } => {
                let name = cmd.get_name().to_owned();
                clap_complete::generate(*shell, &mut cmd, name, out);
                Ok(())
            }
            Generate::ManPages { dir } => {
                std::fs::create_dir_all(dir)?;
                clap_mangen::generate_to(cmd, dir)
            }
        }
    }
}
