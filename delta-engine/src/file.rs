//! File helpers: read-only maps, data extents (holes skipped), sparse copies.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use memmap2::Mmap;

/// A read-only view of a whole image file.
pub(crate) struct Mapped {
    map: Option<Mmap>,
    len: u64,
}

impl Mapped {
    pub fn open(path: &Path) -> io::Result<(File, Self)> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        let map = if len == 0 {
            None
        } else {
            // SAFETY: image files are snapshot artefacts (registered bases are read-only, custom
            // images belong to a stopped VM); nobody truncates or rewrites them while mapped.
            // A concurrent writer could only change the bytes we read, never memory safety of
            // our own allocations, and every result is checked against digests.
            let m = unsafe { Mmap::map(&file)? };
            let _ = m.advise(memmap2::Advice::Sequential);
            Some(m)
        };
        Ok((file, Mapped { map, len }))
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }
}

/// Byte ranges of `file` that may hold data (holes skipped), each widened to 4 KiB chunk
/// boundaries and clipped to `len`. Falls back to the whole file where SEEK_DATA is not
/// supported.
pub(crate) fn data_extents(file: &File, len: u64) -> Vec<(u64, u64)> {
    const CS: u64 = overlay_format::CHUNK_SIZE as u64;
    let fd = file.as_raw_fd();
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut pos: u64 = 0;
    while pos < len {
        // SAFETY: lseek on a valid, open file descriptor; no memory is touched.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                break; // no more data
            }
            return vec![(0, len)];
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let hole = if hole < 0 { len as i64 } else { hole };
        let start = (data as u64) / CS * CS;
        let end = ((hole as u64).div_ceil(CS) * CS).min(len);
        match out.last_mut() {
            Some(last) if last.1 >= start => last.1 = last.1.max(end),
            _ => out.push((start, end)),
        }
        pos = hole as u64;
    }
    out
}

/// Copies `src` to a new file at `dst` keeping holes: tries a reflink first, then copies only
/// the data extents. `dst` is created (must not exist) and sized to `len` (truncated or
/// extended with a hole).
pub(crate) fn sparse_copy(src: &Path, dst: &Path, len: u64) -> io::Result<File> {
    let input = File::open(src)?;
    let src_len = input.metadata()?.len();
    let out = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(dst)?;
    // FICLONE = _IOW(0x94, 9, int)
    const FICLONE: libc::c_ulong = 0x4004_9409;
    // SAFETY: ioctl with two valid open file descriptors; FICLONE reads no user memory.
    let cloned = src_len > 0 && unsafe { libc::ioctl(out.as_raw_fd(), FICLONE as _, input.as_raw_fd()) } == 0;
    if !cloned {
        for (start, end) in data_extents(&input, src_len) {
            copy_range(&input, &out, start, end - start)?;
        }
    }
    out.set_len(len)?;
    Ok(out)
}

fn copy_range(input: &File, out: &File, start: u64, len: u64) -> io::Result<()> {
    let mut off_in = start as libc::loff_t;
    let mut off_out = start as libc::loff_t;
    let mut left = len as usize;
    while left > 0 {
        // SAFETY: valid fds, and the offsets are plain integers owned by this frame.
        let n =
            unsafe { libc::copy_file_range(input.as_raw_fd(), &mut off_in, out.as_raw_fd(), &mut off_out, left, 0) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if matches!(err.raw_os_error(), Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL)) {
                return copy_range_rw(input, out, off_in as u64, left as u64);
            }
            return Err(err);
        }
        if n == 0 {
            break; // source shorter than expected: the rest stays a hole
        }
        left -= n as usize;
    }
    Ok(())
}

fn copy_range_rw(input: &File, out: &File, start: u64, len: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = start;
    let end = start + len;
    while pos < end {
        let n = ((end - pos) as usize).min(buf.len());
        let got = input.read_at(&mut buf[..n], pos)?;
        if got == 0 {
            break;
        }
        // Keep zero chunks as holes.
        for (i, c) in buf[..got].chunks(overlay_format::CHUNK_SIZE).enumerate() {
            if !overlay_format::digest::is_zero(c) {
                out.write_all_at(c, pos + (i * overlay_format::CHUNK_SIZE) as u64)?;
            }
        }
        pos += got as u64;
    }
    Ok(())
}

/// Makes `[start, start+len)` of `file` read as zeros, as a hole where the filesystem can.
pub(crate) fn zero_range(file: &File, start: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on a valid fd with integer arguments.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            start as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        return Ok(());
    }
    use std::os::unix::fs::FileExt;
    let zeros = vec![0u8; (len as usize).min(1 << 20)];
    let mut pos = start;
    while pos < start + len {
        let n = ((start + len - pos) as usize).min(zeros.len());
        file.write_all_at(&zeros[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}
