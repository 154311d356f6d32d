//! The one error type of the crate: generation itself cannot fail, writing files can.

use std::path::PathBuf;

/// What can go wrong while writing generated data.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An output file already holds data and overwriting was not allowed.
    #[error("{} already exists and is not empty", .0.display())]
    WouldOverwrite(PathBuf),
    /// Creating, writing or flushing an output file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory being written.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
