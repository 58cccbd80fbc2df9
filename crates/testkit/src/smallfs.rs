//! A small ext4 filesystem on a loop device, for a host root that fills up (emergency mode).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::run;

/// A small ext4 filesystem mounted at `at` (unmounted, with its loop device, when dropped).
pub struct SmallFs {
    /// The mount point.
    pub at: PathBuf,
}

impl SmallFs {
    /// Makes `img` of `size` bytes, formats it and mounts it at `at`. `None` (the caller
    /// skips) when not root: mounting needs it; in CI (`CI=true`, which runs as root) that is a
    /// failure instead.
    pub fn new(img: &Path, at: &Path, size: u64) -> Option<SmallFs> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            assert!(
                !std::env::var("CI").is_ok_and(|v| v == "true"),
                "CI runs as root"
            );
            eprintln!("SKIPPED: mounting a small root needs root");
            return None;
        }
        std::fs::File::create(img)
            .expect("image")
            .set_len(size)
            .expect("size");
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(img));
        std::fs::create_dir_all(at).expect("mount point");
        run(Command::new("mount").args(["-o", "loop"]).arg(img).arg(at));
        Some(SmallFs {
            at: at.to_path_buf(),
        })
    }

    /// Bytes available on it (`f_bavail`).
    pub fn free(&self) -> u64 {
        let c = std::ffi::CString::new(self.at.to_str().expect("utf8")).expect("path");
        // SAFETY: statvfs fills the struct we pass; the path is a valid C string.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
        st.f_bavail * st.f_frsize
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.at).status();
    }
}
