//! Fuzzes the state-file decoder (`engine::statefile::decode`, what a
//! restarted daemon reads at `--state`): the input is a whole state file.
//!
//! Whatever the bytes, decoding must not panic, and must not allocate more than
//! the file justifies (scripts/fuzz.sh runs with a 64 MiB malloc limit: a header
//! that claims huge bitmaps in a small file must be refused before anything of
//! that size is allocated). A file it accepts must hold what the engine relies
//! on: a region size within limits, one bit per region in each bitmap, as
//! many regions as the export size needs; and writing the accepted image as a
//! state file of its own and decoding that must give the same image back.
//!
//! The decoder skips its two CRC checks in a fuzzing build (`cfg(fuzzing)`):
//! otherwise nearly every mutation stops at the header CRC and the size and
//! identity checks behind it are never reached. Seeds (corpus/state_file) are
//! files the daemon wrote (gen_corpus.py).
#![no_main]

use std::io;
use std::path::PathBuf;
use std::sync::OnceLock;

use engine::statefile::{self, Loaded, StateFile};
use libfuzzer_sys::fuzz_target;

/// Reads `buf.len()` bytes of `data` at `at`, like a file does.
fn read_at(data: &[u8], buf: &mut [u8], at: u64) -> io::Result<()> {
    let start = usize::try_from(at).map_err(|_| io::ErrorKind::UnexpectedEof)?;
    let end = start.checked_add(buf.len()).ok_or(io::ErrorKind::UnexpectedEof)?;
    let src = data.get(start..end).ok_or(io::ErrorKind::UnexpectedEof)?;
    buf.copy_from_slice(src);
    Ok(())
}

/// Where accepted images are written back (tmpfs when there is one).
fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if std::path::Path::new("/dev/shm").is_dir() { "/dev/shm".into() } else { std::env::temp_dir() };
        let dir = base.join(format!("livemirror-fuzz-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the scratch directory");
        dir.join("state")
    })
}

fuzz_target!(|data: &[u8]| {
    let img = match statefile::decode(data.len() as u64, |buf, at| read_at(data, buf, at)) {
        Loaded::Valid(img) => img,
        Loaded::Corrupt(why) => {
            assert!(!why.to_string().is_empty(), "a refusal says why");
            return;
        }
        Loaded::Missing => panic!("decoding bytes never finds a missing file"),
    };
    assert!((12..=26).contains(&img.region_shift), "region size 2^{}", img.region_shift);
    let regions = img.export_size.div_ceil(1 << img.region_shift);
    assert_eq!(img.regions() as u64, regions, "regions for {} bytes", img.export_size);
    for bits in [&img.intent, &img.discarded, &img.unverifiable] {
        assert_eq!(bits.len(), img.regions());
    }
    let path = scratch();
    StateFile::create(path, &img).expect("write the accepted image back");
    match statefile::load(path).expect("read it again") {
        Loaded::Valid(again) => assert_eq!(*again, *img, "the image changed through a write and a read"),
        other => panic!("the image written back does not decode: {other:?}"),
    }
});
