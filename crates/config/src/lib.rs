//! Identifiers and settings shared by every crate: resource and host names, sizes.
//!
//! Names follow the original MARS rules (`marsadm` refuses the same names), so that an operator's
//! scripts and habits carry over: host names are plain, dot-free, lowercase; resource names are
//! file-name safe. Both are used verbatim in file names (`resource-RES/log-000000001-HOST`), which
//! is why the character set is narrow.

mod names;
mod size;

pub use names::{HostName, NameError, ResourceName, RESERVED_NAMES};
pub use size::{format_size, parse_size, SizeError};
