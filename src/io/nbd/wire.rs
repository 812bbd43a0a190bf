//! The NBD protocol on the wire (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md):
//! the fixed-newstyle handshake (structured replies, the `base:allocation` metadata context,
//! `NBD_OPT_GO` with block sizes) and the transmission-phase request and reply headers.
//!
//! Invariant: nothing here trusts a length from the server beyond what was asked for; a reply
//! that does not fit the protocol is an error that ends the connection.

use std::io::{self, Read, Write};

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;

const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_SET_META_CONTEXT: u32 = 10;

const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_FLAG_ERROR: u32 = 1 << 31;
const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;

const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags (from `NBD_INFO_EXPORT`).
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

pub const CMD_READ: u16 = 0;
pub const CMD_DISC: u16 = 2;
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Structured reply chunk flag: the last chunk of the reply.
pub const REPLY_FLAG_DONE: u16 = 1;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;

/// `base:allocation` flags of a block status descriptor.
pub const STATE_ZERO: u32 = 2;

/// The metadata context that reports holes and zeroes.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// What the handshake agreed on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Export {
    pub size: u64,
    pub transmission_flags: u16,
    /// The server's block size constraints (1, 4096, 32 MiB when it sends none).
    pub min_block: u32,
    pub preferred_block: u32,
    pub max_block: u32,
    /// Structured replies were negotiated (reads may come back in chunks and holes).
    pub structured: bool,
    /// The id of the `base:allocation` context, if the server offers it.
    pub base_allocation: Option<u32>,
}

impl Export {
    pub fn can_multi_conn(&self) -> bool {
        self.transmission_flags & TFLAG_CAN_MULTI_CONN != 0
    }
}

fn proto(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

pub fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

pub fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

pub fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// Reads and drops `n` bytes.
pub fn skip(r: &mut impl Read, n: u64) -> io::Result<()> {
    let copied = io::copy(&mut r.take(n), &mut io::sink())?;
    if copied != n {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

fn send_option(w: &mut impl Write, opt: u32, data: &[u8]) -> io::Result<()> {
    let mut m = Vec::with_capacity(16 + data.len());
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    w.write_all(&m)?;
    w.flush()
}

/// One option reply: its type and data (at most 64 KiB; the spec's limit for what we ask).
fn read_option_reply(r: &mut impl Read, opt: u32) -> io::Result<(u32, Vec<u8>)> {
    if read_u64(r)? != OPT_REPLY_MAGIC {
        return Err(proto("bad option reply magic"));
    }
    let got_opt = read_u32(r)?;
    let kind = read_u32(r)?;
    let len = read_u32(r)?;
    if got_opt != opt {
        return Err(proto(format!(
            "option reply for option {got_opt}, expected {opt}"
        )));
    }
    if len > 64 << 10 {
        return Err(proto(format!("option reply of {len} bytes")));
    }
    let mut data = vec![0u8; len as usize];
    r.read_exact(&mut data)?;
    Ok((kind, data))
}

fn reply_error(what: &str, kind: u32, data: &[u8]) -> io::Error {
    let msg = String::from_utf8_lossy(data);
    let name = match kind {
        REP_ERR_UNSUP => "not supported",
        REP_ERR_UNKNOWN => "no such export",
        x if x == REP_FLAG_ERROR | 2 => "refused by policy",
        x if x == REP_FLAG_ERROR | 3 => "invalid",
        x if x == REP_FLAG_ERROR | 5 => "TLS required",
        x if x == REP_FLAG_ERROR | 8 => "server shutting down",
        _ => "error",
    };
    let kind_io = if kind == REP_ERR_UNKNOWN {
        io::ErrorKind::NotFound
    } else {
        io::ErrorKind::PermissionDenied
    };
    let detail = if msg.is_empty() {
        String::new()
    } else {
        format!(": {msg}")
    };
    io::Error::new(
        kind_io,
        format!("the server answered {what} with {name}{detail}"),
    )
}

fn name_field(export: &str) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(export.len() as u32).to_be_bytes());
    d.extend_from_slice(export.as_bytes());
    d
}

/// The fixed-newstyle handshake for `export`, asking for structured replies and the
/// `base:allocation` context (both optional: a server without them is still used).
pub fn handshake<S: Read + Write>(s: &mut S, export: &str) -> io::Result<Export> {
    if read_u64(s)? != NBDMAGIC {
        return Err(proto("not an NBD server (no NBDMAGIC)"));
    }
    match read_u64(s)? {
        IHAVEOPT => {}
        OLDSTYLE_MAGIC => return Err(proto("oldstyle NBD server; only newstyle is supported")),
        _ => return Err(proto("bad handshake magic")),
    }
    let server_flags = read_u16(s)?;
    if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(proto("the server does not speak fixed newstyle"));
    }
    let client_flags = u32::from(server_flags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
    s.write_all(&client_flags.to_be_bytes())?;

    send_option(s, OPT_STRUCTURED_REPLY, &[])?;
    let structured = loop {
        let (kind, data) = read_option_reply(s, OPT_STRUCTURED_REPLY)?;
        match kind {
            REP_ACK => break true,
            k if k & REP_FLAG_ERROR != 0 => break false,
            _ => {
                let _ = data;
            }
        }
    };

    let mut base_allocation = None;
    if structured {
        let mut d = name_field(export);
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
        d.extend_from_slice(BASE_ALLOCATION.as_bytes());
        send_option(s, OPT_SET_META_CONTEXT, &d)?;
        loop {
            let (kind, data) = read_option_reply(s, OPT_SET_META_CONTEXT)?;
            match kind {
                REP_ACK => break,
                REP_META_CONTEXT if data.len() >= 4 => {
                    let id = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                    if &data[4..] == BASE_ALLOCATION.as_bytes() {
                        base_allocation = Some(id);
                    }
                }
                k if k & REP_FLAG_ERROR != 0 => break,
                _ => return Err(proto("bad meta context reply")),
            }
        }
    }

    let mut d = name_field(export);
    d.extend_from_slice(&1u16.to_be_bytes());
    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(s, OPT_GO, &d)?;
    let mut size_flags = None;
    let (mut min_block, mut preferred_block, mut max_block) = (1u32, 4096u32, 32u32 << 20);
    loop {
        let (kind, data) = read_option_reply(s, OPT_GO)?;
        match kind {
            REP_ACK => break,
            REP_INFO if data.len() >= 2 => match u16::from_be_bytes([data[0], data[1]]) {
                INFO_EXPORT if data.len() >= 12 => {
                    let size =
                        u64::from_be_bytes(data[2..10].try_into().map_err(|_| proto("info"))?);
                    let flags = u16::from_be_bytes([data[10], data[11]]);
                    size_flags = Some((size, flags));
                }
                INFO_BLOCK_SIZE if data.len() >= 14 => {
                    let word = |i: usize| {
                        u32::from_be_bytes([data[i], data[i + 1], data[i + 2], data[i + 3]])
                    };
                    (min_block, preferred_block, max_block) = (word(2), word(6), word(10));
                }
                _ => {}
            },
            k if k & REP_FLAG_ERROR != 0 => {
                return Err(reply_error(&format!("export {export:?}"), k, &data))
            }
            _ => return Err(proto("bad NBD_OPT_GO reply")),
        }
    }
    let (size, transmission_flags) =
        size_flags.ok_or_else(|| proto("NBD_OPT_GO succeeded without the export's size"))?;
    if min_block == 0 || !min_block.is_power_of_two() || max_block < min_block {
        return Err(proto(format!(
            "bad block sizes min {min_block} max {max_block}"
        )));
    }
    Ok(Export {
        size,
        transmission_flags,
        min_block,
        preferred_block: preferred_block.max(min_block),
        max_block,
        structured,
        base_allocation,
    })
}

/// A transmission-phase request header.
pub fn request(flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut m = [0u8; 28];
    m[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    m[4..6].copy_from_slice(&flags.to_be_bytes());
    m[6..8].copy_from_slice(&cmd.to_be_bytes());
    m[8..16].copy_from_slice(&cookie.to_be_bytes());
    m[16..24].copy_from_slice(&offset.to_be_bytes());
    m[24..28].copy_from_slice(&len.to_be_bytes());
    m
}

/// The error numbers the NBD protocol defines (Linux errno values); a server's other
/// numbers mean EINVAL (the spec says so).
const NBD_ERRORS: [i32; 8] = [
    libc::EPERM,
    libc::EIO,
    libc::ENOMEM,
    libc::EINVAL,
    libc::ENOSPC,
    libc::EOVERFLOW,
    libc::ENOTSUP,
    libc::ESHUTDOWN,
];

/// An NBD error number as an `io::Error`. Only a server shutting down says the source is
/// away; every other error is about the data asked for (a number outside the protocol's,
/// such as ETIMEDOUT, is EINVAL: it must not pass for an unreachable source).
pub fn nbd_error(code: u32, msg: &str) -> io::Error {
    let code = i32::try_from(code)
        .ok()
        .filter(|c| NBD_ERRORS.contains(c))
        .unwrap_or(libc::EINVAL);
    let base = io::Error::from_raw_os_error(code);
    // A server shutting down is going away, not failing the data asked for.
    let kind = if code == libc::ESHUTDOWN {
        io::ErrorKind::NotConnected
    } else {
        base.kind()
    };
    if msg.is_empty() && kind == base.kind() {
        base
    } else if msg.is_empty() {
        io::Error::new(kind, base.to_string())
    } else {
        io::Error::new(kind, format!("{base}: {msg}"))
    }
}
