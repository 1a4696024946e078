//! Saving a `Backup` stream to a file, as the shell and `tagstore backup`
//! do: the chunks go to `<file>.partial`, which becomes `<file>` (synced,
//! then renamed) only once the server's `done` has come and the bytes
//! received are the bytes it sent. A stream that ends any other way leaves
//! no file (the partial one is removed).

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use tonic::Status;

use crate::auth::Client;
use crate::backup_response::Part;
use crate::{BackupDone, BackupProgress, BackupRequest};

/// Bytes of a backup file's header, which an increment's request carries
/// (`BackupRequest.since`).
pub const HEADER_LEN: usize = 88;

/// Why a backup was not saved.
#[derive(Debug)]
pub enum SaveError {
    /// The server refused or ended it.
    Server(Status),
    /// A local file could not be read or written, or the stream ended
    /// without its `done`.
    Local(String),
}

/// Runs `Backup` (an increment of the backup in `since` when given) into
/// the new file `to`, telling `progress` of each progress message.
pub async fn save(
    client: &mut Client,
    since: Option<&Path>,
    to: &Path,
    mut progress: impl FnMut(&BackupProgress),
) -> Result<BackupDone, SaveError> {
    if to.exists() {
        return Err(SaveError::Local(format!(
            "{} exists: a backup never replaces a file",
            to.display()
        )));
    }
    let since = match since {
        None => Vec::new(),
        Some(base) => {
            let mut head = vec![0u8; HEADER_LEN];
            File::open(base)
                .and_then(|mut f| f.read_exact(&mut head))
                .map_err(|e| {
                    SaveError::Local(format!("cannot read the header of {}: {e}", base.display()))
                })?;
            head
        }
    };
    let mut partial = to.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let local = |what: &str, e: std::io::Error| {
        SaveError::Local(format!("{what} {}: {e}", partial.display()))
    };
    let mut stream = client
        .backup(BackupRequest { since })
        .await
        .map_err(SaveError::Server)?
        .into_inner();
    let mut file = File::create(&partial).map_err(|e| local("cannot create", e))?;
    let res = async {
        let mut written = 0u64;
        while let Some(msg) = stream.message().await.map_err(SaveError::Server)? {
            match msg.part {
                Some(Part::Chunk(bytes)) => {
                    file.write_all(&bytes)
                        .map_err(|e| local("cannot write", e))?;
                    written += bytes.len() as u64;
                }
                Some(Part::Progress(p)) => progress(&p),
                Some(Part::Done(done)) => {
                    if done.backup_bytes != written {
                        return Err(SaveError::Local(format!(
                            "the server sent {} bytes and {written} arrived",
                            done.backup_bytes
                        )));
                    }
                    file.sync_all().map_err(|e| local("cannot sync", e))?;
                    return Ok(done);
                }
                None => {}
            }
        }
        Err(SaveError::Local(
            "the stream ended before the backup was whole".into(),
        ))
    }
    .await;
    drop(file);
    match res {
        Ok(done) => {
            std::fs::rename(&partial, to).map_err(|e| local("cannot rename", e))?;
            if let Some(dir) = to.parent().filter(|d| !d.as_os_str().is_empty()) {
                File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| SaveError::Local(format!("cannot sync {}: {e}", dir.display())))?;
            }
            Ok(done)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            Err(e)
        }
    }
}
