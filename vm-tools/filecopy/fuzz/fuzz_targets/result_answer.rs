//! Fuzzes the sender's side of the answer: any bytes from the receiver must
//! be read and judged (accepted or turned into a message) without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qubes_filecopy::pack::{judge, read_answer};

fuzz_target!(|data: &[u8]| {
    let answer = read_answer(data);
    let crc = data.first().map_or(0, |&b| u32::from(b));
    let _ = judge(answer.as_ref(), crc);
});
