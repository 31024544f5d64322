//! Portico's declarative configuration.
//!
//! Owns: the file model (serde types, `deny_unknown_fields`), loading YAML/JSON with
//! source positions, validation that reports every problem with file, line, column
//! and key path, the JSON Schema of the format, and the shared grammar (templates,
//! request keys, path patterns, durations, sizes).
//!
//! Does not own: compiling a configuration into the runtime snapshot (the proxy does
//! that) or knowing what each policy does (the plugin registry implements
//! [`PluginCatalog`]).
#![forbid(unsafe_code)]

pub mod aggregate;
pub mod diag;
pub mod discovery;
pub mod grammar;
pub mod identity;
pub mod load;
pub mod model;
pub mod pattern;
pub mod resilience;
mod semantic;
pub mod split;
mod structure;
pub mod units;
pub mod yaml;

pub use diag::{Diagnostic, Diagnostics, KeyPath, Pos};
pub use load::{load_file, load_str, schema, Loaded, PluginCatalog};
pub use model::*;

/// The built-in configuration used when no file is given.
pub const DEFAULT_CONFIG: &str = include_str!("default.yaml");
