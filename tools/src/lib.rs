//! Shared code of the sealfs command-line tools.

pub mod keyfiles;
pub mod signals;
