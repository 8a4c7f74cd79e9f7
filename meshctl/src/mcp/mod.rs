//! `meshctl mcp`: tools for people who build and test MCP implementations.

pub mod conformance;
pub mod serve;
pub mod watch;
