//! The KerasCV ⇄ diffusers mapping: tables from `mappings/`, shape expressions and layout ops.

pub mod expr;
pub mod op;
pub mod table;

pub use expr::{Expr, Symbols};
pub use op::Op;
pub use table::{all_tables, table_for, Heads, LayerSpec, Layout, Table, TensorSpec};
