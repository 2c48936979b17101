//! KerasCV weight files: reading both Keras formats and writing the legacy one.

pub mod reader;
pub mod strings;
pub mod writer;

pub use reader::{DatasetInfo, KerasFile, KerasFormat, KerasLayer};
pub use writer::LegacyWriter;
