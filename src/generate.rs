//! `livemirror generate`: man pages and shell completions built from the clap
//! definition itself, so they can never disagree with `--help`, and JSON lines
//! for the glue's shell scripts. Hidden: it is for packaging
//! (initrd-glue/install.sh) and scripts, not for day-to-day use.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, CommandFactory, Subcommand};

#[derive(Args)]
pub(crate) struct GenerateArgs {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// Man pages: livemirror.1 and one livemirror-COMMAND.1 per command.
    Man {
        /// Directory to write them into (created if missing).
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
    /// A completion script for SHELL, on stdout or into --dir.
    Completions {
        /// The shell to complete for.
        #[arg(value_name = "SHELL", value_enum)]
        shell: clap_complete::Shell,
        /// Write the script into this directory (under the shell's usual file
        /// name) instead of stdout.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// One JSON object on one line from KEY=TEXT (a string, escaped here) and KEY:=JSON (a
    /// value inserted as it is, which must parse), in the order given: for shell scripts that
    /// print JSON (livemirror-install --json).
    Json {
        /// KEY=TEXT or KEY:=JSON.
        #[arg(value_name = "PAIR", allow_hyphen_values = true)]
        pairs: Vec<String>,
    },
}

pub(crate) fn run(a: GenerateArgs) -> u8 {
    let res = match a.what {
        What::Man { dir } => man(&dir).map(|files| {
            for f in files {
                println!("{}", f.display());
            }
        }),
        What::Completions { shell, dir } => completions(shell, dir.as_deref()),
        What::Json { pairs } => crate::jsonline::object(&pairs).map(|line| println!("{line}")),
    };
    match res {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("livemirror: {e:#}");
            1
        }
    }
}

/// Writes the man pages into `dir`; returns their paths.
pub(crate) fn man(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let cmd = crate::Cli::command();
    let mut written = Vec::new();
    let mut pages = vec![("livemirror".to_string(), cmd.clone())];
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
        let name = format!("livemirror-{}", sub.get_name());
        pages.push((name.clone(), sub.clone().name(name)));
    }
    for (name, page) in pages {
        let mut buf = Vec::new();
        clap_mangen::Man::new(page).render(&mut buf).with_context(|| format!("cannot render {name}(1)"))?;
        let path = dir.join(format!("{name}.1"));
        std::fs::write(&path, buf).with_context(|| format!("cannot write {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

fn completions(shell: clap_complete::Shell, dir: Option<&Path>) -> anyhow::Result<()> {
    let mut cmd = crate::Cli::command();
    match dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
            let p = clap_complete::generate_to(shell, &mut cmd, "livemirror", d)
                .with_context(|| format!("cannot write the {shell} completions into {}", d.display()))?;
            println!("{}", p.display());
        }
        None => clap_complete::generate(shell, &mut cmd, "livemirror", &mut std::io::stdout()),
    }
    Ok(())
}
