//! The qrexec programs of a Qubes system (being written).
#![forbid(unsafe_code)]
