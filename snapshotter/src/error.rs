//! Errors of the snapshotter, and the one map from them to gRPC status codes.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong while serving a request.
///
/// The four caller-caused kinds carry a message that names the key; containerd relies on
/// their exact gRPC codes (its garbage collector, for one, tolerates only
/// FailedPrecondition from Remove).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{context} {path}: {source}")]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("metadata store: {0}")]
    Store(Box<redb::Error>),
    #[error("metadata store: {0}")]
    Corrupt(String),
}

impl Error {
    /// An I/O error with the operation and path that failed.
    pub fn io(context: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            context,
            path: path.into(),
            source,
        }
    }

    /// The gRPC code this error maps to. The one place where that mapping lives.
    pub fn code(&self) -> tonic::Code {
        match self {
            Error::NotFound(_) => tonic::Code::NotFound,
            Error::AlreadyExists(_) => tonic::Code::AlreadyExists,
            Error::FailedPrecondition(_) => tonic::Code::FailedPrecondition,
            Error::InvalidArgument(_) => tonic::Code::InvalidArgument,
            Error::Unavailable(_) => tonic::Code::Unavailable,
            Error::Io { .. } | Error::Store(_) | Error::Corrupt(_) => tonic::Code::Unknown,
        }
    }

    /// True when the caller caused the error (logged quietly), false for internal failures.
    pub fn is_caller_error(&self) -> bool {
        !matches!(
            self,
            Error::Io { .. } | Error::Store(_) | Error::Corrupt(_) | Error::Unavailable(_)
        )
    }
}

/// Longest status message sent. The message travels in the `grpc-message` trailer, and a
/// key of tens of KiB quoted in it would exceed the client's header list limit: hyper/h2
/// then tears down the whole connection (GOAWAY) instead of delivering the code.
pub const MAX_STATUS_MESSAGE: usize = 1024;

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let mut msg = e.to_string();
        if msg.len() > MAX_STATUS_MESSAGE {
            let total = msg.len();
            let mut cut = MAX_STATUS_MESSAGE;
            while !msg.is_char_boundary(cut) {
                cut -= 1;
            }
            msg.truncate(cut);
            msg.push_str(&format!("... ({total} bytes, cut)"));
        }
        tonic::Status::new(e.code(), msg)
    }
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Error::Store(Box::new(e.into()))
            }
        }
    )*};
}

from_redb!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_are_exact() {
        let cases = [
            (Error::NotFound("k".into()), tonic::Code::NotFound),
            (Error::AlreadyExists("k".into()), tonic::Code::AlreadyExists),
            (
                Error::FailedPrecondition("k".into()),
                tonic::Code::FailedPrecondition,
            ),
            (
                Error::InvalidArgument("k".into()),
                tonic::Code::InvalidArgument,
            ),
            (Error::Unavailable("k".into()), tonic::Code::Unavailable),
            (
                Error::io("read", "/x", io::Error::other("boom")),
                tonic::Code::Unknown,
            ),
        ];
        for (err, code) in cases {
            let status = tonic::Status::from(err);
            assert_eq!(status.code(), code);
        }
    }

    #[test]
    fn long_messages_are_cut_keeping_the_code() {
        let key = "é".repeat(40_000);
        let status =
            tonic::Status::from(Error::NotFound(format!("snapshot {key:?} does not exist")));
        assert_eq!(status.code(), tonic::Code::NotFound);
        assert!(status.message().len() < MAX_STATUS_MESSAGE + 64);
        assert!(status.message().starts_with("snapshot \"éé"));
        assert!(status.message().ends_with("bytes, cut)"));
    }

    #[test]
    fn message_names_the_key() {
        let status = tonic::Status::from(Error::NotFound("snapshot \"ns/1/abc\" not found".into()));
        assert!(status.message().contains("ns/1/abc"));
    }
}
