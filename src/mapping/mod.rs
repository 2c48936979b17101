//! The layout mappings against diffusers' names, tables from `mappings/`: KerasCV (per-tensor
//! tables with shape expressions and layout ops) and renaming layouts such as the original LDM
//! single file.

pub mod expr;
pub mod op;
pub mod rename;
pub mod table;

pub use expr::{Expr, Symbols};
pub use op::Op;
pub use table::{all_tables, keras_hub_tables, table_for, Heads, LayerSpec, Layout, Rows, Table, TensorSpec, When};
