//! The private FUSE filesystem: a root directory holding one regular file whose contents are
//! the export. Every request on the file goes straight to [`Export`].

use std::cell::RefCell;
use std::ffi::{OsStr, OsString};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, WriteFlags,
};
use mars_nbd::{aligned, Export};

/// Inode of the single file (the root directory is [`INodeNo::ROOT`] = 1).
pub(crate) const FILE_INO: INodeNo = INodeNo(2);

/// Attributes are never cached by the kernel: after a grow, the next `stat` must fetch the new
/// size so the kernel's `i_size` (which `LOOP_SET_CAPACITY` reads) is updated. A `getattr`
/// is cheap and the I/O path (direct I/O) does not ask for attributes.
const ATTR_TTL: Duration = Duration::ZERO;
/// The directory entry never changes, the kernel may cache it.
const ENTRY_TTL: Duration = Duration::from_secs(3600);

/// Block size reported by `stat`/`statfs`. The loop driver takes its discard granularity
/// from `statfs`.
const BLOCK: u32 = 4096;

/// `fallocate` mode bits of `linux/falloc.h`.
const FALLOC_FL_KEEP_SIZE: i32 = 0x01;
const FALLOC_FL_PUNCH_HOLE: i32 = 0x02;
const FALLOC_FL_ZERO_RANGE: i32 = 0x10;

/// Largest single READ/WRITE we let the kernel send. The kernel caps it further at its
/// `max_pages_limit` (256 pages = 1 MiB by default).
pub(crate) const MAX_IO: u32 = 1 << 20;

/// State shared between the [`crate::Device`] and the filesystem threads.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Size of the file in bytes; grows on [`crate::Device::grow`].
    pub(crate) size: AtomicU64,
}

/// Tunables of the FUSE connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FsTuning {
    /// Kernel-side limit of outstanding asynchronous (direct I/O) requests.
    pub(crate) max_background: u16,
}

pub(crate) struct BlockFs {
    pub(crate) export: Arc<dyn Export>,
    pub(crate) shared: Arc<Shared>,
    /// Name of the file in the root directory.
    pub(crate) name: OsString,
    pub(crate) read_only: bool,
    pub(crate) tuning: FsTuning,
    /// Owner of the file (the mounting user).
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) created: SystemTime,
}

thread_local! {
    /// Per-thread read buffer: reads are up to [`MAX_IO`] and very frequent, so the buffer is
    /// reused rather than allocated for each one.
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

fn errno(e: &io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

impl BlockFs {
    fn size(&self) -> u64 {
        self.shared.size.load(Ordering::Acquire)
    }

    fn attr(&self, ino: INodeNo) -> FileAttr {
        let (kind, perm, size, nlink) = if ino == FILE_INO {
            let perm = if self.read_only { 0o400 } else { 0o600 };
            (FileType::RegularFile, perm, self.size(), 1)
        } else {
            (FileType::Directory, 0o700, 0, 2)
        };
        FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.created,
            mtime: self.created,
            ctime: self.created,
            crtime: self.created,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: BLOCK,
            flags: 0,
        }
    }

    /// Checks that `offset..offset+len` lies inside the file. Out of range is `ENOSPC` for
    /// writes (like a full disk) and `EINVAL` otherwise.
    fn check_range(&self, offset: u64, len: u64, write: bool) -> Result<(), Errno> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ if write => Err(Errno::ENOSPC),
            _ => Err(Errno::EINVAL),
        }
    }
}

impl Filesystem for BlockFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Asynchronous direct I/O: the loop driver submits its requests as async kiocbs;
        // with FUSE_ASYNC_DIO the kernel sends them to us concurrently instead of one at a
        // time. Not fatal when the kernel lacks it.
        if let Err(missing) = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO) {
            tracing::warn!(
                ?missing,
                "kernel FUSE lacks async direct I/O: requests are serialised"
            );
        }
        let _ = config.set_max_write(MAX_IO);
        // Async direct I/O requests are "background" requests; the default limit of 12..16
        // would throttle the loop device's queue depth.
        let _ = config.set_max_background(self.tuning.max_background);
        let _ = config.set_congestion_threshold(self.tuning.max_background);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent == INodeNo::ROOT && name == self.name {
            // Not `entry()`: it would give the attributes the entry's long lifetime.
            reply.entry_with_ttls(&ATTR_TTL, &ENTRY_TTL, &self.attr(FILE_INO), Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino == INodeNo::ROOT || ino == FILE_INO {
            reply.attr(&ATTR_TTL, &self.attr(ino));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    /// Only no-op changes are accepted (`touch`, a truncate to the current size): the size is
    /// the export's, and ownership and mode are fixed.
    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if ino != INodeNo::ROOT && ino != FILE_INO {
            return reply.error(Errno::ENOENT);
        }
        let attr = self.attr(ino);
        let changes_size = size.is_some_and(|s| s != attr.size);
        let changes_owner =
            uid.is_some_and(|u| u != attr.uid) || gid.is_some_and(|g| g != attr.gid);
        let changes_mode = mode.is_some_and(|m| m & 0o7777 != u32::from(attr.perm));
        if changes_size || changes_owner || changes_mode {
            reply.error(Errno::EPERM);
        } else {
            reply.attr(&ATTR_TTL, &attr);
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        if self.read_only && flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        // FOPEN_DIRECT_IO: no page cache for this file whatever the opener asks, so every
        // write reaches the export before it is acknowledged and reads always see the
        // export. FOPEN_PARALLEL_DIRECT_WRITES: the kernel does not serialise direct writes
        // that stay inside the file on the inode lock (all of the loop device's writes do).
        reply.opened(
            FileHandle(0),
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
        );
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        // Reads past the end return what exists (a short read), like any file.
        let file_size = self.size();
        if offset >= file_size {
            return reply.data(&[]);
        }
        let len = u64::from(size.min(MAX_IO)).min(file_size - offset) as usize;
        READ_BUF.with_borrow_mut(|buf| {
            if buf.len() < len {
                buf.resize(len, 0);
            }
            match self.export.read(offset, &mut buf[..len]) {
                Ok(()) => reply.data(&buf[..len]),
                Err(e) => {
                    tracing::warn!(offset, len, error = %e, "export read failed");
                    reply.error(errno(&e));
                }
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        if self.read_only {
            return reply.error(Errno::EROFS);
        }
        if data.is_empty() {
            return reply.written(0);
        }
        if let Err(e) = self.check_range(offset, data.len() as u64, true) {
            return reply.error(e);
        }
        // The request's bytes live in fuser's buffer, reused for the next request: one copy
        // is needed. Large ones go into a page-aligned pooled buffer (as NBD payloads do), so
        // writeback can write them with O_DIRECT; from an ordinary allocation (not aligned)
        // it went through the page cache, a second copy of every byte in the kernel.
        let payload = if data.len() >= aligned::MIN_ALIGNED_PAYLOAD {
            aligned::copy_aligned(data)
        } else {
            Bytes::copy_from_slice(data)
        };
        // FUA is not needed: the loop driver does not pass REQ_FUA down, the block layer
        // turns it into a write followed by a FLUSH, which arrives as fsync.
        match self.export.write(offset, payload, false) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => {
                tracing::warn!(offset, len = data.len(), error = %e, "export write failed");
                reply.error(errno(&e));
            }
        }
    }

    /// Called on every `close()` of the file: flushing here costs little (the loop device
    /// closes its file once) and makes the close after a direct writer's last write durable.
    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        if ino != FILE_INO || self.read_only {
            return reply.ok();
        }
        match self.export.flush() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    /// A FLUSH (cache flush / pre-flush of FUA) on the loop device becomes `vfs_fsync` on the
    /// backing file, which arrives here: this is how a filesystem's barriers reach the export.
    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        if ino != FILE_INO || self.read_only {
            return reply.ok();
        }
        match self.export.flush() {
            Ok(()) => reply.ok(),
            Err(e) => {
                tracing::warn!(error = %e, "export flush failed");
                reply.error(errno(&e));
            }
        }
    }

    /// The loop driver maps both DISCARD and WRITE_ZEROES (without `REQ_NOUNMAP`) to
    /// `PUNCH_HOLE`, and WRITE_ZEROES with `REQ_NOUNMAP` to `ZERO_RANGE`. Since a punched
    /// range must read back as zeroes, both become [`Export::write_zeroes`] (with `may_trim`
    /// for a punch, so the export may deallocate); [`Export::trim`] alone would not
    /// guarantee zeroes.
    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        if self.read_only {
            return reply.error(Errno::EROFS);
        }
        let size = self.size();
        // Ranges past the end: with KEEP_SIZE they are clipped (nothing to do there), a
        // request to extend the file is refused like a full disk.
        let end = offset.saturating_add(length);
        let (offset, length) = if end <= size {
            (offset, length)
        } else if mode & FALLOC_FL_KEEP_SIZE != 0 {
            (offset.min(size), size - offset.min(size))
        } else {
            return reply.error(Errno::ENOSPC);
        };
        let result = match mode & !FALLOC_FL_KEEP_SIZE {
            // Plain allocation inside the file: everything is "allocated" already.
            0 => Ok(()),
            _ if length == 0 => Ok(()),
            FALLOC_FL_PUNCH_HOLE if mode & FALLOC_FL_KEEP_SIZE != 0 => {
                self.export.write_zeroes(offset, length, true, false)
            }
            FALLOC_FL_ZERO_RANGE => self.export.write_zeroes(offset, length, false, false),
            _ => return reply.error(Errno::EOPNOTSUPP),
        };
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries: [(INodeNo, FileType, &OsStr); 3] = [
            (INodeNo::ROOT, FileType::Directory, OsStr::new(".")),
            (INodeNo::ROOT, FileType::Directory, OsStr::new("..")),
            (FILE_INO, FileType::RegularFile, &self.name),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            // The offset passed with an entry is the one to resume *after* it.
            if reply.add(*ino, i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.size() / u64::from(BLOCK);
        reply.statfs(blocks, 0, 0, 2, 0, BLOCK, 255, BLOCK);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        // The mount is private to its owner (no allow_other); nothing more to check.
        reply.ok();
    }
}
