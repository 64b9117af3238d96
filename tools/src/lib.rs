//! Shared code of the sealfs command-line tools.

pub mod image_ref;
pub mod keyfiles;
pub mod signals;
