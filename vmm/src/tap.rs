//! A TAP device: the host end of the guest's network card.
//!
//! The device is opened with `IFF_TAP | IFF_NO_PI` (whole Ethernet frames, no packet
//! information prefix, no virtio-net header) and non-blocking, so the owner can poll it from
//! any thread and hand received frames to the vCPU loop, which delivers them at a delivery
//! point. The interface is not persistent: the kernel removes it when the `Tap` is dropped.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The clone device TAP interfaces are created through.
pub const TUN_PATH: &str = "/dev/net/tun";

/// Errors opening a TAP device.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The interface name is empty, too long or contains a NUL or '/'.
    #[error("TAP name {name:?} is invalid: it must have 1 to {max} bytes, without NUL or '/'")]
    BadName {
        /// The name given.
        name: String,
        /// The longest name the kernel accepts.
        max: usize,
    },
    /// The tun clone device does not exist (no tun module, or no /dev in this namespace).
    #[error("{path} does not exist: is the tun module loaded (modprobe tun)?")]
    NoTunDevice {
        /// The path tried.
        path: PathBuf,
    },
    /// Opening the tun clone device failed.
    #[error("cannot open {path}: {source}")]
    OpenTun {
        /// The path tried.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// Creating or attaching the interface needs CAP_NET_ADMIN (or an existing interface owned
    /// by another user).
    #[error("creating TAP {name}: permission denied (needs CAP_NET_ADMIN, or the interface belongs to another user)")]
    Permission {
        /// The interface name.
        name: String,
    },
    /// The interface exists and is in use, or is not a TAP.
    #[error("TAP {name} is busy or exists as another kind of interface")]
    Busy {
        /// The interface name.
        name: String,
    },
    /// `TUNSETIFF` failed otherwise.
    #[error("TUNSETIFF for {name} failed: {source}")]
    SetIff {
        /// The interface name.
        name: String,
        /// The error.
        source: io::Error,
    },
}

/// An open TAP interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// `TUNSETIFF` on `file` with `req`.
fn tunsetiff(file: &File, req: &mut libc::ifreq) -> io::Result<()> {
    // SAFETY: `file` is an open descriptor of the tun clone device; TUNSETIFF reads and writes
    // only a `struct ifreq`, and `req` is a valid, exclusively borrowed one that outlives the
    // call.
    let ret = unsafe {
        vmm_sys_util::ioctl::ioctl_with_mut_ref(file, libc::TUNSETIFF as libc::c_ulong, req)
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Tap {
    /// Creates (or attaches to) the TAP interface `name` through [`TUN_PATH`].
    pub fn open(name: &str) -> Result<Tap, TapError> {
        Self::open_at(Path::new(TUN_PATH), name)
    }

    /// Like [`open`](Self::open), through the tun clone device at `tun_path`.
    pub fn open_at(tun_path: &Path, name: &str) -> Result<Tap, TapError> {
        let max = libc::IFNAMSIZ - 1;
        if name.is_empty() || name.len() > max || name.contains(['\0', '/']) {
            return Err(TapError::BadName {
                name: name.to_owned(),
                max,
            });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(tun_path)
            .map_err(|source| match source.kind() {
                io::ErrorKind::NotFound => TapError::NoTunDevice {
                    path: tun_path.to_owned(),
                },
                _ => TapError::OpenTun {
                    path: tun_path.to_owned(),
                    source,
                },
            })?;

        // SAFETY: `ifreq` is a plain C struct (a name array and a union of integers and
        // addresses) for which all zero bytes are a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        tunsetiff(&file, &mut req).map_err(|source| match source.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => TapError::Permission {
                name: name.to_owned(),
            },
            Some(libc::EBUSY) | Some(libc::EINVAL) => TapError::Busy {
                name: name.to_owned(),
            },
            _ => TapError::SetIff {
                name: name.to_owned(),
                source,
            },
        })?;
        Ok(Tap {
            file,
            name: name.to_owned(),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame into `buf`: `Some(length)`, or `None` when no frame is waiting. A frame
    /// longer than `buf` is truncated by the kernel; a 65550-byte buffer holds any frame.
    pub fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            match self.file.read(buf) {
                Ok(n) => return Ok(Some(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes one frame. A TAP takes a frame whole or not at all; `WouldBlock` means the
    /// interface's queue is full and the frame was not sent.
    pub fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        loop {
            match self.file.write(frame) {
                Ok(n) if n == frame.len() => return Ok(()),
                Ok(n) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        format!("TAP {} took {n} of {} bytes", self.name, frame.len()),
                    ))
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn sys_path(name: &str) -> PathBuf {
        PathBuf::from(format!("/sys/class/net/{name}"))
    }

    fn rx_packets(name: &str) -> u64 {
        std::fs::read_to_string(sys_path(name).join("statistics/rx_packets"))
            .expect("rx_packets")
            .trim()
            .parse()
            .expect("number")
    }

    #[test]
    fn bad_names_are_refused_before_touching_the_system() {
        for name in ["", "a-name-of-16-byt", "a/b", "a\0b"] {
            let err = Tap::open_at(Path::new("/nonexistent"), name).unwrap_err();
            assert!(matches!(err, TapError::BadName { .. }), "{name:?}: {err}");
        }
    }

    #[test]
    fn missing_tun_device_is_named() {
        let err = Tap::open_at(Path::new("/nonexistent/tun"), "twtest").unwrap_err();
        assert!(matches!(err, TapError::NoTunDevice { .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent/tun"));
    }

    /// Opens a real TAP (needs root and /dev/net/tun; skipped otherwise), reads nothing,
    /// writes a frame that the host side counts as received, and checks the interface is gone
    /// after drop.
    #[test]
    fn real_tap_open_read_write_and_removed_on_drop() {
        let name = format!("twtest{}", std::process::id() % 1_000_000);
        let mut tap = match Tap::open(&name) {
            Ok(t) => t,
            Err(e @ (TapError::Permission { .. } | TapError::NoTunDevice { .. })) => {
                eprintln!("skipped: {e}");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        assert_eq!(tap.name(), name);
        assert!(tap.as_raw_fd() >= 0);
        assert!(sys_path(&name).exists(), "interface exists while open");

        let mut buf = [0u8; 2048];
        assert_eq!(tap.read_frame(&mut buf).unwrap(), None, "nothing to read");

        // Bring the link up so the kernel accepts frames from the TAP (no address, no route).
        let up = Command::new("ip")
            .args(["link", "set", "dev", &name, "up"])
            .status()
            .expect("run ip");
        assert!(up.success());
        let before = rx_packets(&name);
        // A broadcast frame with a local experimental EtherType (0x88b5).
        let mut frame = vec![0xff; 6];
        frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x88, 0xb5]);
        frame.extend_from_slice(b"twinvm tap test payload......................");
        tap.write_frame(&frame).unwrap();
        assert_eq!(rx_packets(&name), before + 1, "host side received it");

        drop(tap);
        assert!(!sys_path(&name).exists(), "interface removed at drop");
    }
}
