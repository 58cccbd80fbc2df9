//! The real filesystem: `std::fs` with positional I/O, `fdatasync`, `fallocate` and, for block
//! devices, `BLKZEROOUT`.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::{check_name, write_zeroes_slow, Dir, File, OpenMode};

/// A directory on the real filesystem.
#[derive(Debug, Clone)]
pub struct RealDir {
    path: PathBuf,
}

impl RealDir {
    /// Opens (creating if needed, mode 0700) the directory at `path`.
    pub fn create(path: impl Into<PathBuf>) -> io::Result<Self> {
        let path = path.into();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&path)?;
        Ok(Self { path })
    }
    /// Opens an existing directory.
    pub fn open(path: impl Into<PathBuf>) -> io::Result<Self> {
        let path = path.into();
        if !path.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} is not a directory", path.display()),
            ));
        }
        Ok(Self { path })
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
}

use std::os::unix::fs::DirBuilderExt;

impl Dir for RealDir {
    fn open(&self, name: &str, mode: OpenMode) -> io::Result<Arc<dyn File>> {
        check_name(name)?;
        let mut o = OpenOptions::new();
        o.read(true).write(true).mode(0o600);
        match mode {
            OpenMode::Existing => {}
            OpenMode::Create => {
                o.create(true);
            }
            OpenMode::CreateNew => {
                o.create_new(true);
            }
        }
        let f = o.open(self.path.join(name))?;
        Ok(Arc::new(RealFile::new(f)?))
    }

    fn open_direct(&self, name: &str, mode: OpenMode) -> io::Result<Arc<dyn File>> {
        check_name(name)?;
        let f = self.open(name, mode)?;
        drop(f);
        let path = self.path.join(name);
        let f = OpenOptions::new().read(true).write(true).open(&path)?;
        let mut rf = RealFile::new(f)?;
        // As for the disk (`open_disk`): a second descriptor for the aligned pieces; a
        // filesystem without O_DIRECT (tmpfs) keeps the buffered path.
        rf.direct = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .ok();
        Ok(Arc::new(rf))
    }

    fn list(&self) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        for e in fs::read_dir(&self.path)? {
            let e = e?;
            if e.file_type()?.is_file() {
                if let Some(n) = e.file_name().to_str() {
                    out.push(n.to_owned());
                }
            }
        }
        Ok(out)
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        check_name(name)?;
        fs::remove_file(self.path.join(name))
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        check_name(from)?;
        check_name(to)?;
        fs::rename(self.path.join(from), self.path.join(to))
    }

    fn sync(&self) -> io::Result<()> {
        fs::File::open(&self.path)?.sync_all()
    }
}

/// A regular file or a block device.
#[derive(Debug)]
pub struct RealFile {
    file: fs::File,
    block_device: bool,
    /// A second descriptor opened with O_DIRECT, for large aligned writes (see `write_at_direct`).
    direct: Option<fs::File>,
}

/// Alignment of buffer address, offset and length for O_DIRECT writes. 4096 satisfies every
/// logical block size in use.
pub const DIRECT_ALIGN: usize = 4096;
/// Smallest write that goes the direct way.
pub const DIRECT_MIN: usize = 64 << 10;

impl RealFile {
    pub fn new(file: fs::File) -> io::Result<Self> {
        let block_device = file.metadata()?.file_type().is_block_device();
        Ok(Self {
            file,
            block_device,
            direct: None,
        })
    }
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }
}

/// Opens a backing disk: a regular file or a block device, read-write. Does not create it: a
/// missing disk is an operator error that must be reported, not papered over.
pub fn open_disk(path: &Path) -> io::Result<Arc<RealFile>> {
    let md = fs::metadata(path)?;
    let ft = md.file_type();
    if !(ft.is_file() || ft.is_block_device()) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is neither a regular file nor a block device",
                path.display()
            ),
        ));
    }
    let mut o = OpenOptions::new();
    o.read(true).write(true);
    if ft.is_block_device() {
        // Like MARS: a block device in use elsewhere (mounted, another resource) is refused.
        o.custom_flags(libc::O_EXCL);
    }
    let f = o.open(path)?;
    let mut rf = RealFile::new(f)?;
    // Writeback of large aligned pieces skips the page cache. Mixing with buffered I/O on the
    // same file is coherent (the kernel flushes and invalidates the range around a direct
    // write), and fdatasync on the buffered descriptor flushes the device cache for both.
    // Filesystems without O_DIRECT (tmpfs) just keep the buffered path.
    rf.direct = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok();
    Ok(Arc::new(rf))
}

/// Most iovecs one `pwritev` takes (`IOV_MAX` on Linux).
const IOV_MAX: usize = 1024;

/// Writes all of `bufs`, concatenated, at `off` with `pwritev`, continuing after short writes
/// and `EINTR`.
fn pwritev_all(f: &fs::File, bufs: &[&[u8]], off: u64) -> io::Result<()> {
    let mut i = 0; // first buffer not completely written
    let mut skip = 0; // bytes of bufs[i] already written
    let mut at = off;
    while i < bufs.len() {
        if bufs[i].len() == skip {
            i += 1;
            skip = 0;
            continue;
        }
        let iov: Vec<libc::iovec> = bufs[i..]
            .iter()
            .take(IOV_MAX)
            .enumerate()
            .map(|(k, b)| {
                let b = if k == 0 { &b[skip..] } else { b };
                libc::iovec {
                    iov_base: b.as_ptr() as *mut libc::c_void,
                    iov_len: b.len(),
                }
            })
            .collect();
        let pos = libc::off_t::try_from(at)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
        // SAFETY: every iovec points into a live slice of `bufs` for the call's duration; the
        // kernel only reads them.
        let n = unsafe { libc::pwritev(f.as_raw_fd(), iov.as_ptr(), iov.len() as i32, pos) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let mut n = n as usize;
        at += n as u64;
        while n > 0 {
            let left = bufs[i].len() - skip;
            if n < left {
                skip += n;
                n = 0;
            } else {
                n -= left;
                i += 1;
                skip = 0;
            }
        }
    }
    Ok(())
}

// <linux/fs.h>: _IO(0x12, 127) = BLKZEROOUT takes u64[2] = {start, len}.
const BLKZEROOUT: libc::c_ulong = 0x127f;

impl File for RealFile {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        loop {
            match self.file.read_at(buf, off) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.file.write_all_at(buf, off)
    }

    fn write_at_direct(&self, buf: &[u8], off: u64) -> io::Result<()> {
        // Small writes are better left to the page cache, which batches and sorts them; a
        // synchronous direct write per 4 KiB block would cap writeback at the device latency.
        let aligned = buf.len() >= DIRECT_MIN
            && (buf.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN)
            && buf.len().is_multiple_of(DIRECT_ALIGN)
            && off.is_multiple_of(DIRECT_ALIGN as u64)
            && !buf.is_empty();
        match &self.direct {
            Some(d) if aligned => match d.write_all_at(buf, off) {
                // EINVAL: the device wants a larger alignment after all; fall back.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.write_at(buf, off),
                r => r,
            },
            _ => self.write_at(buf, off),
        }
    }

    fn write_vectored_at_direct(&self, bufs: &[&[u8]], off: u64) -> io::Result<()> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        // The direct way only when every piece is aligned in address and length (O_DIRECT
        // checks each iovec), the same rule as for a single buffer.
        let aligned = total >= DIRECT_MIN
            && off.is_multiple_of(DIRECT_ALIGN as u64)
            && bufs.iter().all(|b| {
                (b.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN)
                    && b.len().is_multiple_of(DIRECT_ALIGN)
            });
        match &self.direct {
            Some(d) if aligned => match pwritev_all(d, bufs, off) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    pwritev_all(&self.file, bufs, off)
                }
                r => r,
            },
            _ => pwritev_all(&self.file, bufs, off),
        }
    }

    fn len(&self) -> io::Result<u64> {
        if self.block_device {
            // SAFETY: lseek on a valid fd; positional I/O elsewhere ignores the file offset.
            let n = unsafe { libc::lseek(self.file.as_raw_fd(), 0, libc::SEEK_END) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(n as u64)
        } else {
            Ok(self.file.metadata()?.len())
        }
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if self.block_device {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "cannot change the size of a block device",
            ));
        }
        self.file.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn drop_cache(&self, off: u64, len: u64) {
        if let (Ok(o), Ok(l)) = (i64::try_from(off), i64::try_from(len)) {
            // SAFETY: plain syscall on a valid fd.
            unsafe { libc::posix_fadvise(self.file.as_raw_fd(), o, l, libc::POSIX_FADV_DONTNEED) };
        }
    }

    fn preallocate(&self, len: u64) {
        if self.block_device {
            return;
        }
        // Never more than an eighth of the free space: on a small or nearly full filesystem a
        // large reservation (ext4 may allocate part of it and then fail) would take the space
        // that the log itself and the low-space handling need.
        // SAFETY: fstatvfs fills the struct we pass, on a valid fd.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstatvfs(self.file.as_raw_fd(), &mut st) } != 0 {
            return;
        }
        let free = st.f_bavail as u64 * st.f_frsize as u64;
        let len = len.min(free / 8);
        if let Ok(l) = i64::try_from(len) {
            // SAFETY: plain syscall on a valid fd.
            unsafe { libc::fallocate(self.file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, 0, l) };
        }
    }

    fn release_reserve(&self) {
        if self.block_device {
            return;
        }
        // A truncate to the current length frees the blocks beyond it (ext4 and XFS both drop
        // KEEP_SIZE preallocations past i_size on truncate), and changes no byte of the file.
        if let Ok(m) = self.file.metadata() {
            let _ = self.file.set_len(m.len());
        }
    }

    fn write_zeroes(&self, off: u64, len: u64, punch: bool) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let fd = self.file.as_raw_fd();
        let (Ok(o), Ok(l)) = (i64::try_from(off), i64::try_from(len)) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "range too large",
            ));
        };
        let fits = !self.block_device && off.saturating_add(len) <= self.len()?;
        // Punching a hole reads back as zeros on files and (since Linux 4.9) block devices;
        // ZERO_RANGE keeps the space allocated.
        let mode = if punch {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        if fits || self.block_device {
            // SAFETY: plain syscall on a valid fd.
            if unsafe { libc::fallocate(fd, mode, o, l) } == 0 {
                return Ok(());
            }
        }
        if self.block_device {
            let range: [u64; 2] = [off, len];
            // SAFETY: BLKZEROOUT reads two u64 from the pointer, which lives across the call.
            if unsafe { libc::ioctl(fd, BLKZEROOUT, range.as_ptr()) } == 0 {
                return Ok(());
            }
        }
        write_zeroes_slow(self, off, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_and_file_roundtrip() {
        let t = tempfile::tempdir().unwrap();
        let d = RealDir::create(t.path().join("x")).unwrap();
        let f = d.open("a", OpenMode::CreateNew).unwrap();
        assert!(d.open("a", OpenMode::CreateNew).is_err());
        f.write_at(b"hello world", 0).unwrap();
        f.write_zeroes(2, 3, true).unwrap();
        let mut b = [0u8; 11];
        f.read_exact_at(&mut b, 0).unwrap();
        assert_eq!(&b, b"he\0\0\0 world");
        f.write_zeroes(0, 2, false).unwrap();
        f.read_exact_at(&mut b, 0).unwrap();
        assert_eq!(&b, b"\0\0\0\0\0 world");
        assert_eq!(f.len().unwrap(), 11);
        d.write_atomic("pos", b"42").unwrap();
        assert_eq!(d.read_all("pos").unwrap().unwrap(), b"42");
        assert_eq!(d.read_all("nope").unwrap(), None);
        let mut names = d.list().unwrap();
        names.sort();
        assert_eq!(names, vec!["a", "pos"]);
        assert!(d.open("../evil", OpenMode::Create).is_err());
        assert!(open_disk(t.path()).is_err());
    }
}

#[cfg(test)]
mod direct_tests {
    use super::*;

    #[test]
    fn direct_and_buffered_writes_stay_coherent() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("disk");
        fs::File::create(&p).unwrap().set_len(1 << 20).unwrap();
        let f = open_disk(&p).unwrap();
        const N: usize = DIRECT_MIN * 2;
        let layout = std::alloc::Layout::from_size_align(N, DIRECT_ALIGN).unwrap();
        // SAFETY: non-zero layout; freed below with the same layout.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        // SAFETY: N zeroed bytes we own.
        let buf = unsafe { std::slice::from_raw_parts_mut(raw, N) };
        buf.fill(0xab);
        f.write_at(&[1u8; 100], 4096).unwrap(); // buffered, dirty in the page cache
        f.write_at_direct(buf, 4096).unwrap(); // direct over it
        f.write_at_direct(&buf[1..DIRECT_MIN + 1], 100).unwrap(); // unaligned: buffered path
        let mut back = vec![0u8; N];
        f.read_exact_at(&mut back, 4096).unwrap();
        assert!(back.iter().all(|&b| b == 0xab));
        f.sync_data().unwrap();
        // SAFETY: allocated above with this layout.
        unsafe { std::alloc::dealloc(raw, layout) };
    }
    #[test]
    fn vectored_writes_land_in_order_direct_or_not() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("disk");
        fs::File::create(&p).unwrap().set_len(4 << 20).unwrap();
        let f = open_disk(&p).unwrap();
        const N: usize = DIRECT_MIN;
        let layout = std::alloc::Layout::from_size_align(3 * N, DIRECT_ALIGN).unwrap();
        // SAFETY: non-zero layout; freed below with the same layout.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        // SAFETY: 3 * N zeroed bytes we own.
        let buf = unsafe { std::slice::from_raw_parts_mut(raw, 3 * N) };
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let (a, rest) = buf.split_at(N);
        let (b, c) = rest.split_at(N);
        // Aligned pieces, aligned offset: the direct way, over a dirty buffered range.
        f.write_at(&[7u8; 300], 8192).unwrap();
        f.write_vectored_at_direct(&[a, b, c], 4096).unwrap();
        let mut back = vec![0u8; 3 * N];
        f.read_exact_at(&mut back, 4096).unwrap();
        assert!(back == *buf, "aligned pieces");
        // Unaligned pieces of odd lengths at an odd offset: the buffered way.
        let pieces: [&[u8]; 4] = [&a[1..10], &b[..4097], &[], &c[5..N]];
        f.write_vectored_at_direct(&pieces, 1 << 20 | 3).unwrap();
        let want: Vec<u8> = pieces.concat();
        let mut back = vec![0u8; want.len()];
        f.read_exact_at(&mut back, 1 << 20 | 3).unwrap();
        assert!(back == want, "unaligned pieces");
        // More pieces than one pwritev takes.
        let many: Vec<&[u8]> = (0..IOV_MAX + 10).map(|i| &a[i % 7..i % 7 + 3]).collect();
        f.write_vectored_at_direct(&many, 2 << 20).unwrap();
        let want: Vec<u8> = many.concat();
        let mut back = vec![0u8; want.len()];
        f.read_exact_at(&mut back, 2 << 20).unwrap();
        assert!(back == want, "over IOV_MAX");
        // SAFETY: allocated above with this layout.
        unsafe { std::alloc::dealloc(raw, layout) };
    }
}
