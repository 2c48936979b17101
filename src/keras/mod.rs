//! KerasCV weight files: reading the Keras formats (and TensorFlow's checkpoint and SavedModel
//! forms) and writing the legacy one.

pub(crate) mod h5ffi;
pub mod reader;
mod sharded;
pub mod strings;
pub mod tf_bundle;
pub mod tf_objects;
pub mod keras3_writer;
pub mod writer;

pub use reader::{is_checkpoint_prefix, DatasetInfo, KerasFile, KerasFormat, KerasLayer};
pub use writer::LegacyWriter;
