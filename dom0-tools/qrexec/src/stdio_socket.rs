//! A call's `QREXEC_AGENT_PID` and the switch to one socket for a
//! process's stdin and stdout (SIGUSR1).
//!
//! In Qubes, a service (or qrexec-client-vm's local program) has a
//! socketpair as its stdin, and `QREXEC_AGENT_PID` names the process that
//! runs the call. A program that sends that process SIGUSR1 says: "from now
//! on, read my output from my stdin socket" — the call stops reading its
//! stdout and reads the stdin socket instead (once; later signals are
//! ignored).
//!
//! Ours: each call gets a stand-in process ([`CallProcess`]: our own
//! program run with [`CALL_PROCESS_ARG`], which only waits), whose PID is
//! the call's `QREXEC_AGENT_PID`, so a signal to it can never end the agent
//! and every other call. SIGUSR1 ends the stand-in (default action); the
//! call watches it through a pidfd and, when it was ended by SIGUSR1,
//! switches ([`SwitchingOutput`]). The process's stdin is a socketpair whose
//! write direction we shut down at the remote's EOF ([`SocketStdin`]), so
//! the process can still write to it.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use rustix::event::{PollFd, PollFlags};
use rustix::process::{Pid, PidfdFlags, Signal, WaitId, WaitIdOptions};

/// Argument that makes `qrexec-agent` or `qrexec-client-vm` a call's
/// stand-in process (see [`CallProcess`]).
pub const CALL_PROCESS_ARG: &str = "--qrexec-call-process";

/// A process standing for one call (`QREXEC_AGENT_PID`): our own program
/// started with [`CALL_PROCESS_ARG`], which only waits; it is killed when
/// the call ends, and leaves by itself if its parent is gone.
#[derive(Debug)]
pub struct CallProcess(std::process::Child);

impl CallProcess {
    /// Start one (`None` if our own program cannot be run again).
    pub fn start() -> Option<Self> {
        let exe = std::env::current_exe().ok()?;
        std::process::Command::new(exe)
            .arg(CALL_PROCESS_ARG)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()
            .map(CallProcess)
    }

    /// Its PID, for `QREXEC_AGENT_PID`.
    pub fn pid(&self) -> String {
        self.0.id().to_string()
    }

    /// A pidfd for it (readable once it has ended), if the kernel has them.
    pub fn pidfd(&self) -> Option<OwnedFd> {
        let pid = Pid::from_raw(i32::try_from(self.0.id()).ok()?)?;
        rustix::process::pidfd_open(pid, PidfdFlags::empty()).ok()
    }

    /// End it (at the end of the call).
    pub fn stop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for CallProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The body of a call's stand-in process: wait until killed, or until the
/// program that started it is gone.
pub fn call_process_main() -> i32 {
    let parent = rustix::process::getppid();
    loop {
        std::thread::sleep(Duration::from_secs(1));
        if rustix::process::getppid() != parent {
            return 0;
        }
    }
}

/// A socketpair for a process's stdin: the process's end (to give it as
/// fd 0) and ours.
pub fn stdin_pair() -> io::Result<(OwnedFd, UnixStream)> {
    let (ours, theirs) = UnixStream::pair()?;
    Ok((OwnedFd::from(theirs), ours))
}

/// Our end of a process's stdin socket, as its stdin writer: dropping it
/// shuts down only the direction towards the process, so the process can
/// still send its output through the socket after a switch.
#[derive(Debug)]
pub struct SocketStdin(pub UnixStream);

impl Write for SocketStdin {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl Drop for SocketStdin {
    fn drop(&mut self) {
        let _ = self.0.shutdown(std::net::Shutdown::Write);
    }
}

/// A process's output: its stdout until the call's stand-in is ended by
/// SIGUSR1, then its stdin socket (the stdout is closed then, as Qubes
/// does, once what was written to it before the signal has been read).
pub struct SwitchingOutput<R> {
    stdout: Option<R>,
    socket: UnixStream,
    pidfd: Option<OwnedFd>,
    switched: bool,
}

impl<R> std::fmt::Debug for SwitchingOutput<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwitchingOutput")
            .field("switched", &self.switched)
            .finish_non_exhaustive()
    }
}

impl<R: Read + AsFd> SwitchingOutput<R> {
    /// `stdout` is the process's stdout, `socket` a clone of our end of its
    /// stdin socket, `pidfd` the stand-in's (none: never switch).
    pub fn new(stdout: R, socket: UnixStream, pidfd: Option<OwnedFd>) -> Self {
        SwitchingOutput {
            stdout: Some(stdout),
            socket,
            pidfd,
            switched: false,
        }
    }

    /// The stand-in has ended: was it SIGUSR1? (It is not reaped here.)
    fn ended_by_sigusr1(pidfd: &OwnedFd) -> bool {
        let status = rustix::process::waitid(
            WaitId::PidFd(pidfd.as_fd()),
            WaitIdOptions::EXITED | WaitIdOptions::NOWAIT | WaitIdOptions::NOHANG,
        );
        matches!(status, Ok(Some(s)) if s.terminating_signal() == Some(Signal::USR1.as_raw()))
    }
}

impl<R: Read + AsFd> Read for SwitchingOutput<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.switched {
                return self.socket.read(buf);
            }
            let Some(stdout) = self.stdout.as_mut() else {
                return Ok(0);
            };
            let Some(pidfd) = self.pidfd.as_ref() else {
                return stdout.read(buf);
            };
            let (out_ready, pid_ready) = {
                let mut fds = [
                    PollFd::new(stdout, PollFlags::IN),
                    PollFd::new(pidfd, PollFlags::IN),
                ];
                match rustix::event::poll(&mut fds, None) {
                    Ok(_) => {}
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(e) => return Err(e.into()),
                }
                let [out, pid] = &fds;
                (!out.revents().is_empty(), !pid.revents().is_empty())
            };
            if pid_ready {
                if Self::ended_by_sigusr1(pidfd) {
                    // What the process wrote to stdout before it signalled
                    // is in the pipe already (poll saw it with the signal):
                    // pass it on first, then switch.
                    if out_ready {
                        let n = stdout.read(buf)?;
                        if n > 0 {
                            return Ok(n);
                        }
                    }
                    self.switched = true;
                    self.stdout = None;
                } else {
                    // Ended otherwise: nothing more to watch.
                    self.pidfd = None;
                }
                continue;
            }
            if out_ready {
                let n = stdout.read(buf)?;
                if n > 0 {
                    return Ok(n);
                }
                // Stdout ended. A SIGUSR1 sent before it closed may not
                // have ended the stand-in yet: end the stand-in ourselves
                // and see which signal it died of (a pending SIGUSR1, the
                // lower number, is taken before our SIGTERM). When the
                // socket is at its end already (the process closed it and
                // left nothing in it: the usual end of a call), switching
                // or not reads the same nothing, so the stand-in need not
                // be waited for.
                if let Some(pidfd) = self.pidfd.take()
                    && !socket_at_end(&self.socket)
                    && Self::settle(&pidfd)
                {
                    self.switched = true;
                    self.stdout = None;
                    continue;
                }
                return Ok(0);
            }
        }
    }
}

/// Whether reading `socket` would give end of file now: its peer has
/// closed (or shut down) its sending side and nothing is left unread.
/// Nothing is consumed.
fn socket_at_end(socket: &UnixStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        rustix::net::recv(
            socket,
            &mut byte[..],
            rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT
        ),
        Ok((0, _))
    )
}

impl<R> SwitchingOutput<R> {
    /// Ends the stand-in with SIGTERM and waits for it (not reaped here):
    /// whether SIGUSR1 ended it instead.
    fn settle(pidfd: &OwnedFd) -> bool {
        let _ = rustix::process::pidfd_send_signal(pidfd.as_fd(), Signal::TERM);
        loop {
            match rustix::process::waitid(
                WaitId::PidFd(pidfd.as_fd()),
                WaitIdOptions::EXITED | WaitIdOptions::NOWAIT,
            ) {
                Ok(Some(status)) => {
                    return status.terminating_signal() == Some(Signal::USR1.as_raw());
                }
                Err(rustix::io::Errno::INTR) => continue,
                _ => return false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_stdin_shuts_down_only_towards_the_process() {
        let (theirs, ours) = stdin_pair().unwrap();
        let mut theirs = UnixStream::from(theirs);
        let mut reader = ours.try_clone().unwrap();
        let mut w = SocketStdin(ours);
        w.write_all(b"in").unwrap();
        drop(w);
        let mut got = Vec::new();
        theirs.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"in");
        theirs.write_all(b"out").unwrap();
        drop(theirs);
        let mut back = Vec::new();
        reader.read_to_end(&mut back).unwrap();
        assert_eq!(back, b"out");
    }

    #[test]
    fn without_a_stand_in_the_output_is_stdout() {
        let (mut w, r) = UnixStream::pair().unwrap();
        let (_, socket) = stdin_pair().unwrap();
        w.write_all(b"stdout").unwrap();
        drop(w);
        let mut out = SwitchingOutput::new(r, socket, None);
        let mut got = Vec::new();
        out.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"stdout");
    }
}
