//! What a user reads says what the code does. The hand-written man pages
//! (docs/man) and the ones the binary generates render without a single groff
//! warning; livemirror-install(8) lists exactly the options, steps and exit
//! codes of `livemirror-install --help`; livemirror.cmdline(7) exactly the
//! kernel options and settings the initramfs glue reads; and every URI that
//! livemirror.uri(7), `serve --help` and `attach --help` show parses, naming
//! every scheme and query key the parser accepts. Needs man-db (`man`), which
//! .ci/run installs.
#![allow(clippy::unwrap_used)] // test code: a panic is a failure

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use nbd_frontend::remote::NbdUri;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let p = repo().join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
}

fn run(cmd: &mut Command) -> (String, String, bool) {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (text(&out.stdout), text(&out.stderr), out.status.success())
}

/// Renders PAGE as `man -l` does for a reader, with groff's warnings on;
/// returns the text. Fails on any warning.
fn render(page: &Path) -> String {
    let found = Command::new("man").arg("--version").output().is_ok_and(|o| o.status.success());
    assert!(found, "man is missing: apt-get install man-db (.ci/run installs it)");
    let (out, err, ok) = run(Command::new("man")
        .args(["--warnings=w", "-E", "UTF-8", "-l"])
        .arg(page)
        .env("MANWIDTH", "80")
        .env("LC_ALL", "C.UTF-8"));
    assert!(ok && err.is_empty(), "man -l {} warned or failed:\n{err}", page.display());
    assert!(out.contains("NAME") && out.lines().count() > 10, "{} rendered to almost nothing:\n{out}", page.display());
    out
}

/// The lines of roff section NAME (`.SH NAME` up to the next `.SH`).
fn section<'a>(roff: &'a str, name: &str) -> Vec<&'a str> {
    let mut lines = roff
        .lines()
        .skip_while(|l| l.trim() != format!(".SH {name}").as_str() && l.trim() != format!(".SH \"{name}\""));
    assert!(lines.next().is_some(), "no section {name}");
    lines.take_while(|l| !l.starts_with(".SH")).collect()
}

/// The lines that follow `.TP` in those lines: the tags of a tagged list.
fn tags<'a>(lines: &[&'a str]) -> Vec<&'a str> {
    lines.windows(2).filter(|w| w[0].trim() == ".TP").map(|w| w[1]).collect()
}

/// roff with its escapes for hyphens and font changes made plain.
fn plain(s: &str) -> String {
    s.replace("\\-", "-").replace("\\fB", "").replace("\\fI", "").replace("\\fR", "").replace("\\&", "")
}

/// Every word in TEXT that starts like an option: `-y`, `--no-trim`.
fn options_in(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| {
            w.starts_with('-') && w.len() > 1 && w.chars().nth(1).is_some_and(|c| c == '-' || c.is_ascii_alphabetic())
        })
        .map(str::to_string)
        .collect()
}

fn install_help() -> String {
    let script = repo().join("initrd-glue/livemirror-install");
    let (out, err, ok) = run(Command::new("sh").arg(&script).arg("--help"));
    assert!(ok, "livemirror-install --help failed: {err}");
    out
}

#[test]
fn hand_written_pages_render_without_warnings() {
    let dir = repo().join("docs/man");
    let mut pages: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    pages.sort();
    let names: Vec<String> = pages.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["livemirror-install.8", "livemirror.cmdline.7", "livemirror.uri.7"]);
    for page in &pages {
        let text = render(page);
        // The page's NAME line is its file name: what `man NAME` looks for.
        let stem = page.file_stem().unwrap().to_string_lossy().into_owned();
        assert!(text.contains(&format!("{stem} - ")), "{}: NAME is not {stem}:\n{text}", page.display());
    }
}

#[test]
fn generated_pages_render_without_warnings() {
    let dir = tempfile::tempdir().unwrap();
    let (out, err, ok) = run(Command::new(env!("CARGO_BIN_EXE_livemirror")).arg("generate").arg("man").arg(dir.path()));
    assert!(ok, "generate man failed: {err}");
    let pages: Vec<&str> = out.lines().collect();
    assert!(pages.len() > 10, "only {} pages generated", pages.len());
    for page in pages {
        render(Path::new(page));
    }
}

#[test]
fn install_page_lists_exactly_the_options_of_its_help() {
    let help = install_help();
    let opts_block: Vec<&str> =
        help.lines().skip_while(|l| *l != "Options:").skip(1).take_while(|l| !l.is_empty()).collect();
    // The option column: what precedes the description (two spaces or more).
    let help_opts: BTreeSet<String> = opts_block
        .iter()
        .filter(|l| l.trim_start().starts_with('-'))
        .flat_map(|l| options_in(l.trim_start().split("  ").next().unwrap()))
        .collect();
    assert!(help_opts.len() > 10 && help_opts.contains("--yes") && help_opts.contains("-y"), "{help_opts:?}");
    let page = read("docs/man/livemirror-install.8");
    let page_opts: BTreeSet<String> =
        tags(&section(&page, "OPTIONS")).iter().flat_map(|t| options_in(&plain(t))).collect();
    assert_eq!(page_opts, help_opts, "livemirror-install(8) OPTIONS (left) and --help (right) differ");
}

#[test]
fn install_page_has_the_steps_and_exit_codes_of_its_help() {
    let help = install_help();
    // "   1. checks      the daemon answers, ..."
    let help_steps: Vec<String> = help
        .lines()
        .filter_map(|l| {
            let (num, rest) = l.trim_start().split_once(". ")?;
            num.parse::<u32>().ok()?;
            Some(format!("{num}. {}", rest.split_whitespace().next()?))
        })
        .collect();
    assert!(help_steps.len() >= 10, "{help_steps:?}");
    let page = read("docs/man/livemirror-install.8");
    let page_steps: Vec<String> =
        tags(&section(&page, "STEPS")).iter().map(|t| plain(t.trim_start_matches(".B ")).trim().to_string()).collect();
    assert_eq!(page_steps, help_steps, "livemirror-install(8) STEPS (left) and --help (right) differ");

    // "Exit status: 0 installed, 1 a step failed or was refused, 2 usage error."
    let line = help.lines().find(|l| l.starts_with("Exit status:")).expect("--help names the exit status");
    let help_codes: BTreeSet<String> = line
        .trim_start_matches("Exit status:")
        .split(',')
        .filter_map(|part| part.split_whitespace().next().map(str::to_string))
        .collect();
    let page_codes: BTreeSet<String> =
        tags(&section(&page, "EXIT STATUS")).iter().map(|t| t.trim_start_matches(".B ").trim().to_string()).collect();
    assert!(help_codes.len() >= 3, "{help_codes:?}");
    assert_eq!(page_codes, help_codes, "livemirror-install(8) EXIT STATUS (left) and --help (right) differ");
}

/// Every `lm_cmdline KEY` in the glue's shell code.
fn cmdline_keys_read_by_the_glue() -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let mut stack = vec![repo().join("initrd-glue")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let Ok(text) = std::fs::read_to_string(&path) else { continue };
            for part in text.split("lm_cmdline ").skip(1) {
                let key: String = part.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '.').collect();
                if key.contains('.') {
                    keys.insert(key);
                }
            }
        }
    }
    keys
}

#[test]
fn cmdline_page_names_exactly_the_options_the_glue_reads() {
    let code = cmdline_keys_read_by_the_glue();
    assert!(code.contains("rd.livemirror") && code.contains("livemirror.source") && code.len() >= 8, "{code:?}");
    let page = read("docs/man/livemirror.cmdline.7");
    let word = |t: &str| -> BTreeSet<String> {
        plain(t)
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '.'))
            .filter(|w| {
                let key = |prefix: &str| w.starts_with(prefix) && w.len() > prefix.len();
                *w == "rd.livemirror" || key("rd.livemirror.") || key("livemirror.")
            })
            .map(str::to_string)
            .collect()
    };
    let documented: BTreeSet<String> = tags(&section(&page, "OPTIONS")).iter().flat_map(|t| word(t)).collect();
    assert_eq!(documented, code, "livemirror.cmdline(7) OPTIONS (left) and the glue's lm_cmdline calls (right) differ");

    // The settings file: the variables the glue's defaults name, plus the
    // binary the hooks look for, are the page's and the template's.
    let lib = read("initrd-glue/lib/livemirror-initrd.sh");
    let mut vars: BTreeSet<String> = lib
        .lines()
        .filter_map(|l| l.trim().strip_prefix("LIVEMIRROR_")?.split_once('=').map(|(v, _)| format!("LIVEMIRROR_{v}")))
        .collect();
    assert!(read("initrd-glue/initramfs-tools/hooks/livemirror").contains("LIVEMIRROR_BIN"));
    vars.insert("LIVEMIRROR_BIN".to_string());
    assert!(vars.len() >= 8, "{vars:?}");
    let page_vars: BTreeSet<String> = tags(&section(&page, "CONFIGURATION FILE"))
        .iter()
        .map(|t| t.trim_start_matches(".B ").trim().to_string())
        .collect();
    assert_eq!(
        page_vars, vars,
        "livemirror.cmdline(7) CONFIGURATION FILE (left) and the glue's variables (right) differ"
    );
    let template = read("initrd-glue/initrd.conf");
    for v in &vars {
        assert!(template.contains(&format!("#{v}=")), "initrd-glue/initrd.conf does not show {v}");
    }
}

/// An example URI with its placeholders filled in, as a user would: optional
/// parts (`[:PORT]`, `[NAME@]`) taken, an IPv6 address's brackets kept.
fn filled(uri: &str) -> String {
    let mut u = String::new();
    let mut rest = uri;
    while let Some((before, after)) = rest.split_once('[') {
        u.push_str(before);
        let (inner, tail) = after.split_once(']').unwrap_or((after, ""));
        if inner.chars().any(|c| c.is_ascii_uppercase()) {
            u.push_str(inner);
        } else {
            u.push_str(&format!("[{inner}]"));
        }
        rest = tail;
    }
    u.push_str(rest);
    for (placeholder, value) in [
        ("HOST", "host.example"),
        ("PORT", "10810"),
        ("EXPORT", "disk0"),
        ("DIR", "/etc/pki/lm"),
        ("FILE", "/etc/lm/keys.psk"),
        ("PATH", "/run/x.sock"),
        ("NAME", "alice"),
    ] {
        u = u.replace(placeholder, value);
    }
    u
}

/// Every URI-looking word of TEXT (quotes and trailing punctuation off).
fn uris_in(text: &str) -> Vec<String> {
    text.split_whitespace()
        .map(|w| w.trim_matches(|c| c == '\'' || c == '"' || c == ',' || c == ';' || c == '(' || c == ')' || c == '.'))
        // (a bare scheme, "nbds+unix:// takes ...", is prose, not an example)
        .filter(|w| {
            ["nbd://", "nbds://", "nbd+unix://", "nbds+unix://"].iter().any(|s| w.starts_with(s) && w.len() > s.len())
        })
        .map(str::to_string)
        .collect()
}

/// The schemes and query keys the parser accepts, from its own refusals.
fn accepted(bad: &str) -> Vec<String> {
    let e = NbdUri::parse(bad).unwrap_err().to_string();
    let list = e.rsplit_once('(').and_then(|(_, l)| l.strip_suffix(')')).unwrap_or_else(|| panic!("no list in {e:?}"));
    list.split(", ").map(str::to_string).collect()
}

#[test]
fn the_uris_the_page_and_the_help_show_parse() {
    let schemes = accepted("zz://host/disk");
    let keys = accepted("nbd://host/disk?zz=1");
    assert!(schemes.len() == 4 && keys.len() == 3, "{schemes:?} {keys:?}");

    let page = render(&repo().join("docs/man/livemirror.uri.7"));
    let mut texts = vec![("livemirror.uri(7)".to_string(), page)];
    for cmd in ["serve", "attach"] {
        let (out, err, ok) = run(Command::new(env!("CARGO_BIN_EXE_livemirror")).args([cmd, "--help"]));
        assert!(ok, "{cmd} --help failed: {err}");
        texts.push((format!("{cmd} --help"), out));
    }
    for (what, text) in &texts {
        let uris = uris_in(text);
        assert!(uris.len() >= 4, "{what} shows only {uris:?}");
        for uri in &uris {
            let u = filled(uri);
            NbdUri::parse(&u).unwrap_or_else(|e| panic!("{what} shows {uri}, which does not parse as {u}: {e}"));
        }
        for s in &schemes {
            assert!(text.contains(&format!("{s}://")), "{what} never shows the scheme {s}://");
        }
        for k in &keys {
            assert!(text.contains(&format!("{k}=")), "{what} never shows the query key {k}=");
        }
        assert!(text.contains("livemirror.uri"), "{what} does not point to livemirror.uri(7)");
    }
}
