//! A minimal, synchronous NBD client for tests that must know exactly which requests were
//! acknowledged (crash tests): one request at a time, fixed-newstyle handshake with NBD_OPT_GO.
//! Independent of the server crate on purpose: it is written from the spec, not from our code.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const FLAG_FUA: u16 = 1;

pub struct Client {
    s: UnixStream,
    pub size: u64,
    cookie: u64,
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl Client {
    pub fn connect(socket: &Path, export: &str) -> io::Result<Client> {
        let mut s = UnixStream::connect(socket)?;
        let mut b8 = [0u8; 8];
        s.read_exact(&mut b8)?;
        if u64::from_be_bytes(b8) != NBDMAGIC {
            return Err(bad("no NBDMAGIC"));
        }
        s.read_exact(&mut b8)?;
        if u64::from_be_bytes(b8) != IHAVEOPT {
            return Err(bad("not newstyle"));
        }
        let mut b2 = [0u8; 2];
        s.read_exact(&mut b2)?;
        // FIXED_NEWSTYLE | NO_ZEROES
        s.write_all(&3u32.to_be_bytes())?;
        let mut data = Vec::new();
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        let mut opt = Vec::new();
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
        opt.extend_from_slice(&data);
        s.write_all(&opt)?;
        let mut size = None;
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h)?;
            if u64::from_be_bytes(h[0..8].try_into().expect("8")) != REPLY_MAGIC {
                return Err(bad("bad option reply magic"));
            }
            let typ = u32::from_be_bytes(h[12..16].try_into().expect("4"));
            let len = u32::from_be_bytes(h[16..20].try_into().expect("4")) as usize;
            let mut payload = vec![0u8; len];
            s.read_exact(&mut payload)?;
            match typ {
                REP_ACK => break,
                REP_INFO if payload.len() >= 12 && payload[0..2] == [0, 0] => {
                    size = Some(u64::from_be_bytes(payload[2..10].try_into().expect("8")));
                }
                REP_INFO => {}
                t if t & 0x8000_0000 != 0 => {
                    return Err(bad(format!(
                        "GO refused: {t:#x} {}",
                        String::from_utf8_lossy(&payload)
                    )))
                }
                _ => {}
            }
        }
        Ok(Client {
            s,
            size: size.ok_or_else(|| bad("no NBD_INFO_EXPORT"))?,
            cookie: 0,
        })
    }

    fn request(
        &mut self,
        typ: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> io::Result<()> {
        self.cookie += 1;
        let mut r = Vec::with_capacity(28 + data.len());
        r.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        r.extend_from_slice(&flags.to_be_bytes());
        r.extend_from_slice(&typ.to_be_bytes());
        r.extend_from_slice(&self.cookie.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        r.extend_from_slice(data);
        self.s.write_all(&r)
    }

    fn reply(&mut self) -> io::Result<()> {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h)?;
        if u32::from_be_bytes(h[0..4].try_into().expect("4")) != SIMPLE_REPLY_MAGIC {
            return Err(bad("bad reply magic"));
        }
        let err = u32::from_be_bytes(h[4..8].try_into().expect("4"));
        if u64::from_be_bytes(h[8..16].try_into().expect("8")) != self.cookie {
            return Err(bad("cookie mismatch"));
        }
        if err != 0 {
            return Err(io::Error::from_raw_os_error(err as i32));
        }
        Ok(())
    }

    /// Returns once the server acknowledged the write.
    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        let flags = if fua { FLAG_FUA } else { 0 };
        self.request(CMD_WRITE, flags, offset, data.len() as u32, data)?;
        self.reply()
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.request(CMD_FLUSH, 0, 0, 0, &[])?;
        self.reply()
    }

    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.request(CMD_READ, 0, offset, buf.len() as u32, &[])?;
        self.reply()?;
        self.s.read_exact(buf)
    }

    pub fn disconnect(mut self) -> io::Result<()> {
        self.request(CMD_DISC, 0, 0, 0, &[])
    }
}
