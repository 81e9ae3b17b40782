//! One module per command (or small group of commands). Commands import
//! `context`, `output` and each other's helpers downward; none imports
//! `cli`.

pub mod accounts;
pub mod admin;
pub mod balances;
pub mod console;
pub mod deposit;
pub mod fetch;
pub mod image;
pub mod ledger;
pub mod logs;
pub mod market;
pub mod names;
pub mod recipe;
pub mod run_local;
pub mod status;
pub mod store;
pub mod submit;
pub mod watch;
