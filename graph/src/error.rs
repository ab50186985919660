//! kiln's one error type. Every fallible public function in kiln returns [`Error`].

use std::fmt;

/// What went wrong, in onnxruntime's vocabulary (its `OrtErrorCode`s).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A caller-supplied argument (feed, option, output name) is wrong.
    InvalidArgument,
    /// The model bytes are not a valid ONNX model, or the graph is inconsistent.
    InvalidModel,
    /// The model uses an operator, attribute or element type kiln does not implement.
    NotImplemented,
    /// A file or external-data blob could not be read.
    Io,
    /// Evaluation failed.
    Runtime,
    /// The requested execution provider is unavailable.
    ProviderUnavailable,
}

impl ErrorKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            ErrorKind::InvalidArgument => "INVALID_ARGUMENT",
            ErrorKind::InvalidModel => "INVALID_GRAPH",
            ErrorKind::NotImplemented => "NOT_IMPLEMENTED",
            ErrorKind::Io => "NO_SUCHFILE",
            ErrorKind::Runtime => "RUNTIME_EXCEPTION",
            ErrorKind::ProviderUnavailable => "EP_FAIL",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error { kind, message: message.into() }
    }
    pub fn invalid_argument(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::InvalidArgument, message)
    }
    pub fn invalid_model(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::InvalidModel, message)
    }
    pub fn not_implemented(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::NotImplemented, message)
    }
    pub fn runtime(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Runtime, message)
    }
    pub fn io(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Io, message)
    }
    /// Wraps a tract error (an anyhow chain) keeping the whole chain in the message.
    pub fn from_tract(kind: ErrorKind, context: &str, e: &tract_onnx::prelude::TractError) -> Error {
        Error::new(kind, format!("{context}: {e:#}"))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}] {}", self.kind.as_str(), self.message)
    }
}

impl std::error::Error for Error {}

pub type Result<T, E = Error> = std::result::Result<T, E>;
