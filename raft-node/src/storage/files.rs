//! Small files kept durably beside the log and the state (the vote, the committed id, the
//! purge marker, snapshot metadata, the node's identity), and durable directory changes: write
//! to a temporary name, fsync, rename, fsync the directory.

use crate::sys::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

/// Writes `bytes` to `dir/name` durably and atomically: a crash leaves either the old file or the
/// new one, never a mix. Writes `dir/name.tmp`, fsyncs it, renames it over `dir/name`, fsyncs `dir`.
pub fn write_file_atomic(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    assert!(!name.is_empty() && !name.contains('/'), "wal: {name:?} is not a plain file name");
    // The directory may hold a log too, whose recovery claims every `.wal` file (its segments).
    assert!(!name.ends_with(".wal"), "wal: {name:?} would be taken for a log segment");
    let tmp_path = dir.join(format!("{name}.tmp"));
    crate::sys::disk_fault(&tmp_path)?;
    let mut tmp = File::create(&tmp_path)?;
    tmp.write_all(bytes)?;
    tmp.sync_all()?;
    drop(tmp);
    let path = dir.join(name);
    fs::rename(&tmp_path, &path)?;
    sync_dir(dir)?;
    crate::sys::wrote_durably(&path);
    Ok(())
}

/// The injected bug of `vote-not-durable`: `write_file_atomic` without its fsyncs, so that a
/// crash can take back a vote already answered.
#[cfg(feature = "vote-not-durable")]
pub fn write_file_unsynced(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp_path = dir.join(format!("{name}.tmp"));
    File::create(&tmp_path)?.write_all(bytes)?;
    fs::rename(&tmp_path, dir.join(name))
}

/// Reads `dir/name`, or `None` if it does not exist.
pub fn read_file(dir: &Path, name: &str) -> io::Result<Option<Vec<u8>>> {
    match fs::read(dir.join(name)) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error),
    }
}

pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    crate::sys::sync_dir(dir)
}

/// Creates `dir` (and its parents) and fsyncs its parent, so that its name survives a power cut.
pub fn create_dir_durably(dir: &Path) -> io::Result<()> {
    if crate::sys::is_dir(dir) {
        return Ok(());
    }
    fs::create_dir_all(dir)?;
    // The new directory's own entry must survive a crash too, or the segments in it vanish with it.
    let parent = dir.parent().filter(|parent| !parent.as_os_str().is_empty());
    sync_dir(parent.unwrap_or(Path::new(".")))
}

pub(crate) fn remove_file_durably(dir: &Path, path: &Path) -> io::Result<()> {
    fs::remove_file(path)?;
    sync_dir(dir)
}
