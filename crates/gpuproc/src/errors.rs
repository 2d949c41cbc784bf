//! How the public error types print: `Debug` reads like `Display`, followed by the causes.
//!
//! Every public error's `Display` is one sentence about what failed, without its cause; the
//! cause is [`source()`](std::error::Error::source), so a report that prints the chain (as
//! `anyhow`'s `{:#}` does) shows each cause once. `Debug` is what `fn main() -> Result<..>`,
//! `unwrap()` and `expect()` print, so instead of a dump of variant names and fields it writes
//! the message, then each cause after `": "`: `{e:?}` is the whole story in one line.

use std::error::Error;
use std::fmt;

/// Writes `err`'s message, then each cause in its `source()` chain after `": "`, skipping a
/// cause whose text is already part of what was written (some foreign errors repeat their
/// source in their own message).
pub(crate) fn write_chain(err: &dyn Error, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    let mut last = err.to_string();
    f.write_str(&last)?;
    let mut cause = err.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !text.is_empty() && !last.contains(&text) {
            write!(f, ": {text}")?;
        }
        last = text;
        cause = c.source();
    }
    Ok(())
}

/// `impl Debug` for error types as [`write_chain`].
macro_rules! debug_as_display {
    ($($ty:ty),+ $(,)?) => {
        $(
            impl fmt::Debug for $ty {
                fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    write_chain(self, f)
                }
            }
        )+
    };
}

impl fmt::Debug for crate::gpu::Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

debug_as_display!(
    crate::ProcessError,
    crate::PoolError,
    crate::ChannelError,
    crate::connection::ConnectionError,
    crate::SyncError,
    crate::ShmError,
    crate::gpu::GpuError,
    crate::gpu::PickError,
    crate::time::InvalidDuration,
    crate::managers::ManagerError,
);

#[cfg(test)]
mod tests {
    use std::io;
    use std::path::PathBuf;
    use std::time::Duration;

    use super::*;
    use crate::connection::ConnectionError;
    use crate::gpu::{GpuError, GpuErrorKind, PickError, Unavailable, Verdict};
    use crate::sys::ExitStatus;
    use crate::{ChannelError, PoolError, ProcessError, SendError, ShmError, SyncError};
    use nvml_wrapper::error::NvmlError;

    fn enoent() -> io::Error {
        io::Error::from_raw_os_error(2)
    }

    fn none_free() -> PickError {
        PickError::NoneFree(Box::new(Unavailable {
            needed: 2,
            devices: vec![
                Verdict {
                    index: 0,
                    uuid: None,
                    rejection: None,
                },
                Verdict {
                    index: 1,
                    uuid: None,
                    rejection: Some(crate::gpu::Rejection::MemoryUnknown),
                },
            ],
            waited: None,
        }))
    }

    fn lease() -> PickError {
        PickError::Lease {
            context: "locking the table",
            path: PathBuf::from("/run/gpuproc"),
            source: enoent(),
        }
    }

    fn nvml() -> GpuError {
        GpuError::new(
            GpuErrorKind::GpuLost,
            "the GPU fell off the bus while reading GPU 1",
        )
        .with_source(NvmlError::GpuLost)
    }

    /// NVML's error for a library that cannot be loaded, which repeats its own source.
    fn no_library() -> NvmlError {
        let Err(e) = nvml_wrapper::Nvml::builder()
            .lib_path(std::ffi::OsStr::new("/nonexistent/libnvidia-ml.so.1"))
            .init()
        else {
            panic!("a library that does not exist was loaded");
        };
        e
    }

    /// One instance of every public error type, with a cause wherever the type can have one.
    fn samples() -> Vec<Box<dyn Error>> {
        vec![
            Box::new(ProcessError::NotInitialized {
                method: "forkserver",
            }),
            Box::new(ProcessError::Io {
                context: "creating the control socket",
                source: enoent(),
            }),
            Box::new(ProcessError::Gpu {
                name: "w".into(),
                source: none_free(),
            }),
            Box::new(PoolError::Start(ProcessError::NotInitialized {
                method: "forkserver",
            })),
            Box::new(PoolError::Gpu(lease())),
            Box::new(PoolError::Io {
                context: "starting the driver",
                source: enoent(),
            }),
            Box::new(PoolError::WorkerDied {
                index: 1,
                pid: 2,
                status: ExitStatus::Signal(9),
            }),
            Box::new(ChannelError::Timeout(Duration::from_secs(1))),
            Box::new(ChannelError::Io {
                context: "sending",
                source: enoent(),
            }),
            Box::new(SendError::new(
                7u32,
                ChannelError::Io {
                    context: "sending",
                    source: enoent(),
                },
            )),
            Box::new(SendError::new(7u32, ChannelError::Disconnected)),
            Box::new(ConnectionError::Io {
                context: "cannot listen on 127.0.0.1:1".into(),
                source: enoent(),
            }),
            Box::new(ConnectionError::Authentication(
                "digest received was wrong".into(),
            )),
            Box::new(ConnectionError::AuthkeyRequired {
                side: "listener",
                address: "127.0.0.1:1".into(),
            }),
            Box::new(SyncError::Os {
                op: "futex wait",
                source: enoent(),
            }),
            Box::new(SyncError::WouldDeadlock),
            Box::new(ShmError::Os {
                op: "memfd_create".into(),
                source: enoent(),
            }),
            Box::new(ShmError::Lock(SyncError::NotOwner)),
            Box::new(nvml()),
            Box::new(
                GpuError::new(GpuErrorKind::NoLibrary, "no NVIDIA driver")
                    .with_source(no_library()),
            ),
            Box::new(PickError::Gpu(nvml())),
            Box::new(none_free()),
            Box::new(lease()),
            Box::new(PickError::invalid("zero GPUs")),
            Box::new(crate::time::InvalidDuration(-1.0)),
        ]
    }

    #[test]
    fn debug_reads_like_display_with_each_cause_once() {
        for e in samples() {
            let display = e.to_string();
            let debug = format!("{e:?}");
            assert!(debug.starts_with(&display), "{debug} / {display}");
            let mut cause = e.source();
            while let Some(c) = cause {
                let text = c.to_string();
                assert_eq!(debug.matches(&text).count(), 1, "{text} in {debug}");
                cause = c.source();
            }
            assert!(!debug.contains(" {") && !debug.contains("None"), "{debug}");
        }
        let e = PoolError::Start(ProcessError::NotInitialized {
            method: "forkserver",
        });
        assert_eq!(
            format!("{e:?}"),
            format!(
                "cannot start a pool worker: {}",
                ProcessError::NotInitialized {
                    method: "forkserver"
                }
            )
        );
        let e = ProcessError::Io {
            context: "creating the control socket",
            source: enoent(),
        };
        assert_eq!(
            format!("{e:?}"),
            format!("creating the control socket: {}", enoent())
        );
        // Without a cause, Debug is Display.
        let e = SyncError::WouldDeadlock;
        assert_eq!(format!("{e:?}"), e.to_string());
        let e = none_free();
        assert_eq!(format!("{e:?}"), e.to_string());
        assert_eq!(format!("{:?}", e.unavailable().unwrap()), e.to_string());
    }

    #[test]
    fn no_display_repeats_its_source() {
        for e in samples() {
            let display = e.to_string();
            let mut cause = e.source();
            while let Some(c) = cause {
                assert!(
                    !display.contains(&c.to_string()),
                    "{display:?} repeats its cause {c}"
                );
                cause = c.source();
            }
        }
    }
}
