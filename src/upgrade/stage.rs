//! A root storage daemon must never run from the root file system it serves,
//! and after a switch_root its own root is the emptied initramfs, where no
//! program's ELF interpreter or libraries are left. So its successor runs
//! from the daemon's own tmpfs (the directory its binary was started from,
//! `/run/livemirror/bin` with the glue): the new binary, and the interpreter
//! and libraries that the `livemirror upgrade` process itself runs with (the
//! same build, found in its memory maps), copied there, and started through
//! that interpreter with `--library-path`.

use std::io;
use std::path::{Path, PathBuf};

/// The staged programs, as paths the daemon (and its supervisor, which has
/// the same root and working directory) can execute.
pub(crate) struct Staged {
    pub(crate) interpreter: PathBuf,
    pub(crate) library_dir: PathBuf,
    pub(crate) binary: PathBuf,
}

impl Staged {
    /// The program to execute and its argv for `argv` (argv[0] first) run
    /// through the staged interpreter: `ARGV0 --library-path DIR --argv0 ARGV0
    /// BINARY ARGS...`. The interpreter gets ARGV0 as its own argv[0] too,
    /// because that is what `/proc/PID/cmdline` starts with, and systemd spares
    /// a root storage daemon from its kill sprees by the '@' there.
    pub(crate) fn command_line(&self, argv: &[std::ffi::OsString]) -> (PathBuf, Vec<std::ffi::OsString>) {
        let argv0 = argv.first().cloned().unwrap_or_else(|| "@livemirror".into());
        let mut out: Vec<std::ffi::OsString> =
            vec![argv0.clone(), "--library-path".into(), self.library_dir.clone().into(), "--argv0".into(), argv0];
        out.push(self.binary.clone().into());
        out.extend(argv.iter().skip(1).cloned());
        (self.interpreter.clone(), out)
    }
}

/// The files a process runs from: its interpreter and shared libraries, from
/// `/proc/PID/maps` (path and one mapped range each, to read through
/// `/proc/PID/map_files`, which reaches the very file even if it was replaced).
fn mapped_libraries(pid: u32) -> io::Result<Vec<(String, PathBuf)>> {
    let maps = std::fs::read_to_string(engine::hostfs::proc_path(&format!("{pid}/maps")))?;
    let mut out: Vec<(String, PathBuf)> = Vec::new();
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(path)) = (f.next(), f.nth(4)) else { continue };
        let name = Path::new(path).file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !path.starts_with('/') || !name.contains(".so") || out.iter().any(|(_, p)| p == Path::new(path)) {
            continue;
        }
        out.push((range.to_string(), PathBuf::from(path)));
    }
    Ok(out)
}

/// Bytes free on the file system of `dir`, its size and whether it is a tmpfs.
fn space(dir: &Path) -> io::Result<(u64, u64, bool)> {
    let st = nix::sys::statfs::statfs(dir).map_err(io::Error::from)?;
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    let bsize = st.block_size() as u64;
    Ok((st.blocks_available() * bsize, st.blocks() * bsize, st.filesystem_type().0 as i64 == TMPFS_MAGIC))
}

/// Copies the new binary (`binary`, reachable from here) and the caller's
/// interpreter and libraries into `bin_dir` (`reach`ed from here): the binary
/// as `livemirror` (replacing the file, not the running daemon's copy in
/// memory), the rest into `lib/`. A tmpfs too small for both generations at
/// once is made larger (the old one is freed when the old daemon exits).
pub(crate) fn stage(binary: &Path, caller: u32, bin_dir: &Path, reach: &Path) -> io::Result<Staged> {
    let libs = mapped_libraries(caller)?;
    let interp = libs
        .iter()
        .find(|(_, p)| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("ld-")))
        .map(|(_, p)| p.clone())
        .ok_or_else(|| io::Error::other(format!("process {caller} shows no ELF interpreter in its maps")))?;
    let mut need = std::fs::metadata(binary)?.len();
    let sources: Vec<(PathBuf, PathBuf)> = libs
        .iter()
        .map(|(range, path)| (engine::hostfs::proc_path(&format!("{caller}/map_files/{range}")), path.clone()))
        .collect();
    for (from, _) in &sources {
        need += std::fs::metadata(from)?.len();
    }
    let (free, size, tmpfs) = space(reach)?;
    // Some room for the directory entries and the file system's own needs.
    let want = need + (4 << 20);
    if free < want {
        if !tmpfs {
            return Err(io::Error::other(format!(
                "{} has {free} bytes free, the new binary and its libraries need {want}",
                bin_dir.display()
            )));
        }
        let bigger = size + (want - free);
        let opts = format!("size={bigger}");
        nix::mount::mount(None::<&str>, reach, None::<&str>, nix::mount::MsFlags::MS_REMOUNT, Some(opts.as_str()))
            .map_err(|e| {
                io::Error::other(format!("cannot make the tmpfs {} larger ({opts}): {e}", bin_dir.display()))
            })?;
        tracing::info!("upgrade: made the tmpfs {} {bigger} bytes large for the new binary", bin_dir.display());
    }
    let new_lib = reach.join("lib.new");
    let _ = std::fs::remove_dir_all(&new_lib);
    std::fs::create_dir(&new_lib)?;
    for (from, path) in &sources {
        let name = path.file_name().ok_or_else(|| io::Error::other(format!("{}: no file name", path.display())))?;
        std::fs::copy(from, new_lib.join(name))
            .map_err(|e| io::Error::new(e.kind(), format!("copying {}: {e}", path.display())))?;
    }
    let new_bin = reach.join("livemirror.new");
    std::fs::copy(binary, &new_bin)
        .map_err(|e| io::Error::new(e.kind(), format!("copying {}: {e}", binary.display())))?;
    // Into place: renames, so the files the running daemon maps stay whole.
    let old_lib = reach.join("lib.old");
    let _ = std::fs::remove_dir_all(&old_lib);
    if reach.join("lib").exists() {
        std::fs::rename(reach.join("lib"), &old_lib)?;
    }
    std::fs::rename(&new_lib, reach.join("lib"))?;
    std::fs::rename(&new_bin, reach.join("livemirror"))?;
    let _ = std::fs::remove_dir_all(&old_lib);
    let name = |p: &Path| p.file_name().map(PathBuf::from).unwrap_or_default();
    Ok(Staged {
        interpreter: reach.join("lib").join(name(&interp)),
        library_dir: reach.join("lib"),
        binary: reach.join("livemirror"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_runs_from_an_interpreter_and_libraries() {
        let libs = mapped_libraries(std::process::id()).unwrap();
        assert!(libs.iter().any(|(_, p)| p.to_string_lossy().contains("libc.so")), "{libs:?}");
        assert!(libs.iter().any(|(_, p)| p.file_name().unwrap().to_string_lossy().starts_with("ld-")), "{libs:?}");
    }

    #[test]
    fn the_command_line_runs_the_binary_through_the_interpreter() {
        let s =
            Staged { interpreter: "/b/lib/ld.so".into(), library_dir: "/b/lib".into(), binary: "/b/livemirror".into() };
        let argv: Vec<std::ffi::OsString> = vec!["@livemirror".into(), "serve".into(), "--x".into()];
        let (program, args) = s.command_line(&argv);
        assert_eq!(program, Path::new("/b/lib/ld.so"));
        let got: Vec<String> = args.iter().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(
            got,
            ["@livemirror", "--library-path", "/b/lib", "--argv0", "@livemirror", "/b/livemirror", "serve", "--x"]
        );
    }
}
