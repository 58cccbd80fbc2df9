//! A loop device of somebody else: what the next loop device set up on the machine does to the
//! number a killed `marsd`'s device had. The device tests use it to check that a restarted
//! daemon replaces its own stale device link and leaves the foreign loop device alone.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Whether loop device `lo` (`/dev/loopN`) is bound to a backing file.
pub fn loop_bound(lo: &Path) -> bool {
    let name = lo.file_name().expect("loop name").to_string_lossy();
    Path::new("/sys/block")
        .join(&*name)
        .join("loop/backing_file")
        .exists()
}

/// A loop device of somebody else, bound to a file of its own; detached when dropped.
pub struct Foreign(PathBuf);

impl Foreign {
    /// Binds exactly `lo` to a new 1 MiB file in `dir`, retrying while the kernel still
    /// releases it (autoclear runs once the last opener is gone).
    pub fn take(lo: &Path, dir: &Path) -> Foreign {
        let file = dir.join("foreign.img");
        std::fs::File::create(&file)
            .and_then(|f| f.set_len(1 << 20))
            .expect("foreign file");
        let mut last = String::new();
        for _ in 0..100 {
            let o = Command::new("losetup")
                .arg(lo)
                .arg(&file)
                .output()
                .expect("losetup");
            if o.status.success() {
                return Foreign(lo.to_path_buf());
            }
            last = String::from_utf8_lossy(&o.stderr).into_owned();
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("cannot bind {}: {last}", lo.display());
    }
}

impl Drop for Foreign {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}
