//! The operator CLI's logic: [`client`] talks to the controller; [`commands`] turns
//! replies into tables or JSON and decides the exit status (success only when every
//! expected reply came).

pub mod client;
pub mod commands;
pub mod tasks;

pub use client::{CliError, Ctx, Outcome, Reply, Session, request};
