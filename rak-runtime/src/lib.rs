//! # rak-runtime
//!
//! The part of rak that runs cells: for now the `rak` command line ([`cli`]); models,
//! training, data and configs come next.

pub mod cli;
