//! An in-memory directory that tells written data from synced data.
//!
//! Every file keeps two copies: what was written, and what the last `sync_data` made durable.
//! Names likewise: the current set and the set made durable by the last directory sync. A
//! *crash image* is the durable half of everything: what a machine would find after a power
//! loss at that moment. With [`MemDir::capture_crash_images`] on, an image is recorded at every
//! sync point (after each `sync_data` and each directory sync), so a test can run a workload once
//! and then recover from every moment at which durability changed.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use crate::{check_name, Dir, File, OpenMode};

/// The durable contents of a [`MemDir`] at one moment: file name → bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CrashImage {
    pub files: BTreeMap<String, Vec<u8>>,
    /// How many sync points had passed when the image was taken.
    pub sync_point: u64,
}

#[derive(Default)]
struct Inner {
    names: BTreeMap<String, Arc<MemFile>>,
    durable_names: BTreeMap<String, Arc<MemFile>>,
    sync_points: u64,
    images: Option<Vec<CrashImage>>,
}

#[derive(Default)]
struct World {
    inner: Mutex<Inner>,
    /// Fault injection: writes (incl. zeroing) and syncs of every file fail with EIO.
    fail_writes: AtomicBool,
    fail_syncs: AtomicBool,
    /// Fault injection: the filesystem is full, a write that would make a file longer fails
    /// with ENOSPC (writes inside a file's length still work, like on preallocated blocks).
    full: AtomicBool,
}

fn eio(what: &str) -> io::Error {
    io::Error::other(format!("injected I/O error on {what}"))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic in another test thread must not turn into a cascade of poison errors here.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl World {
    fn sync_point(&self) {
        let mut g = lock(&self.inner);
        g.sync_points += 1;
        if g.images.is_some() {
            let img = Self::image(&g);
            g.images.as_mut().expect("checked").push(img);
        }
    }

    fn image(g: &Inner) -> CrashImage {
        let files = g
            .durable_names
            .iter()
            .map(|(n, f)| (n.clone(), lock(&f.state).synced.clone()))
            .collect();
        CrashImage {
            files,
            sync_point: g.sync_points,
        }
    }
}

/// A flat in-memory directory. Clones share the same files.
#[derive(Clone, Default)]
pub struct MemDir {
    world: Arc<World>,
}

impl std::fmt::Debug for MemDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = lock(&self.world.inner);
        f.debug_struct("MemDir")
            .field("files", &g.names.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl MemDir {
    pub fn new() -> Self {
        Self::default()
    }

    /// A fresh directory holding exactly the image's files, all of them durable.
    pub fn from_image(img: &CrashImage) -> Self {
        let d = Self::new();
        {
            let mut g = lock(&d.world.inner);
            for (name, data) in &img.files {
                let f = Arc::new(MemFile {
                    state: Mutex::new(FileState {
                        data: data.clone(),
                        synced: data.clone(),
                    }),
                    world: Arc::downgrade(&d.world),
                });
                g.names.insert(name.clone(), f.clone());
                g.durable_names.insert(name.clone(), f);
            }
        }
        d
    }

    /// What survives a power loss right now.
    pub fn crash_image(&self) -> CrashImage {
        World::image(&lock(&self.world.inner))
    }

    /// Starts recording a crash image at every sync point.
    pub fn capture_crash_images(&self) {
        lock(&self.world.inner).images = Some(Vec::new());
    }

    /// The images recorded since [`Self::capture_crash_images`] (and stops recording).
    pub fn take_crash_images(&self) -> Vec<CrashImage> {
        lock(&self.world.inner).images.take().unwrap_or_default()
    }

    /// Number of sync points so far.
    pub fn sync_points(&self) -> u64 {
        lock(&self.world.inner).sync_points
    }

    /// From now on, every write (`fail_writes`) and/or every sync (`fail_syncs`) of a file in
    /// this directory fails with an I/O error, like a dying disk.
    pub fn inject_faults(&self, fail_writes: bool, fail_syncs: bool) {
        self.world.fail_writes.store(fail_writes, Ordering::SeqCst);
        self.world.fail_syncs.store(fail_syncs, Ordering::SeqCst);
    }

    /// From now on (`full`), or no longer, every write that would make a file longer fails with
    /// ENOSPC, like on a full filesystem. Creating, removing and renaming files still works.
    pub fn fill_up(&self, full: bool) {
        self.world.full.store(full, Ordering::SeqCst);
    }

    /// Direct access to a file's current bytes (for tests that corrupt or inspect).
    pub fn contents(&self, name: &str) -> Option<Vec<u8>> {
        let g = lock(&self.world.inner);
        g.names.get(name).map(|f| lock(&f.state).data.clone())
    }
}

impl Dir for MemDir {
    fn open(&self, name: &str, mode: OpenMode) -> io::Result<Arc<dyn File>> {
        check_name(name)?;
        let mut g = lock(&self.world.inner);
        match (g.names.get(name), mode) {
            (Some(_), OpenMode::CreateNew) => Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{name} exists"),
            )),
            (Some(f), _) => Ok(f.clone()),
            (None, OpenMode::Existing) => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{name} not found"),
            )),
            (None, _) => {
                let f = Arc::new(MemFile {
                    state: Mutex::default(),
                    world: Arc::downgrade(&self.world),
                });
                g.names.insert(name.to_owned(), f.clone());
                Ok(f)
            }
        }
    }

    fn list(&self) -> io::Result<Vec<String>> {
        Ok(lock(&self.world.inner).names.keys().cloned().collect())
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        check_name(name)?;
        lock(&self.world.inner)
            .names
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{name} not found")))
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        check_name(from)?;
        check_name(to)?;
        let mut g = lock(&self.world.inner);
        let f = g
            .names
            .remove(from)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{from} not found")))?;
        g.names.insert(to.to_owned(), f);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        {
            let mut g = lock(&self.world.inner);
            g.durable_names = g.names.clone();
        }
        self.world.sync_point();
        Ok(())
    }
}

#[derive(Default)]
struct FileState {
    data: Vec<u8>,
    synced: Vec<u8>,
}

/// A file of a [`MemDir`].
pub struct MemFile {
    state: Mutex<FileState>,
    world: Weak<World>,
}

impl MemFile {
    fn fault(&self, flag: fn(&World) -> &AtomicBool, what: &str) -> io::Result<()> {
        match self.world.upgrade() {
            Some(w) if flag(&w).load(Ordering::SeqCst) => Err(eio(what)),
            _ => Ok(()),
        }
    }
}

impl File for MemFile {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        let s = lock(&self.state);
        let Ok(off) = usize::try_from(off) else {
            return Ok(0);
        };
        if off >= s.data.len() {
            return Ok(0);
        }
        let n = buf.len().min(s.data.len() - off);
        buf[..n].copy_from_slice(&s.data[off..off + n]);
        Ok(n)
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.fault(|w| &w.fail_writes, "write")?;
        let off = usize::try_from(off).map_err(|_| io::Error::other("offset too large"))?;
        let mut s = lock(&self.state);
        let end = off + buf.len();
        if s.data.len() < end {
            if self
                .world
                .upgrade()
                .is_some_and(|w| w.full.load(Ordering::SeqCst))
            {
                const ENOSPC: i32 = 28;
                return Err(io::Error::from_raw_os_error(ENOSPC));
            }
            s.data.resize(end, 0);
        }
        s.data[off..end].copy_from_slice(buf);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(lock(&self.state).data.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::Error::other("length too large"))?;
        lock(&self.state).data.resize(len, 0);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        self.fault(|w| &w.fail_syncs, "fdatasync")?;
        {
            let mut s = lock(&self.state);
            s.synced = s.data.clone();
        }
        if let Some(w) = self.world.upgrade() {
            w.sync_point();
        }
        Ok(())
    }

    fn write_zeroes(&self, off: u64, len: u64, _punch: bool) -> io::Result<()> {
        self.fault(|w| &w.fail_writes, "write")?;
        let off = usize::try_from(off).map_err(|_| io::Error::other("offset too large"))?;
        let len = usize::try_from(len).map_err(|_| io::Error::other("length too large"))?;
        let mut s = lock(&self.state);
        let end = (off + len).min(s.data.len());
        if off < end {
            s.data[off..end].fill(0);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsynced_data_and_names_are_lost() {
        let d = MemDir::new();
        d.capture_crash_images();
        let a = d.open("a", OpenMode::CreateNew).unwrap();
        a.write_at(b"one", 0).unwrap();
        a.sync_data().unwrap(); // data durable, name not yet
        assert!(d.crash_image().files.is_empty());
        d.sync().unwrap();
        a.write_at(b"two", 3).unwrap();
        let img = d.crash_image();
        assert_eq!(img.files["a"], b"one");
        a.sync_data().unwrap();
        d.rename("a", "b").unwrap();
        assert_eq!(d.crash_image().files.keys().collect::<Vec<_>>(), ["a"]);
        d.sync().unwrap();
        let imgs = d.take_crash_images();
        assert_eq!(imgs.len(), 4);
        assert_eq!(imgs[3].files["b"], b"onetwo");
        let r = MemDir::from_image(&imgs[1]);
        let f = r.open("a", OpenMode::Existing).unwrap();
        assert_eq!(f.len().unwrap(), 3);
    }
}
