//! The "internet" inside the box's `sys-net`: a tiny HTTP server and a tiny
//! DNS server, plus the probes the client qubes use to reach them
//! (`http_get`, `dns_query`). They exist so the box needs no outside tools
//! and never talks to anything outside the namespaces it made.
//!
//! The servers treat every request as hostile: bounded reads, a DNS parser
//! that checks every offset and answers only well-formed single-question
//! queries, no panics. They are test fixtures, not general servers.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::thread;
use std::time::Duration;

/// The body every HTTP response carries (tests look for it).
pub const HTTP_BODY: &str = "hello from sys-net\n";
/// Largest body `GET /bytes/N` serves (1 GiB).
pub const MAX_BENCH_BYTES: u64 = 1 << 30;

/// Serves `GET` on `address` forever: `GET /bytes/N` gets N bytes (at most
/// [`MAX_BENCH_BYTES`]) for throughput measurements; every other request
/// gets `200 OK` with [`HTTP_BODY`] and the request path echoed in an
/// `X-Path` header.
pub fn serve_http(address: SocketAddr) -> io::Result<()> {
    let listener = TcpListener::bind(address)?;
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        thread::spawn(move || {
            let _ = answer_http(stream);
        });
    }
    Ok(())
}

fn answer_http(mut stream: TcpStream) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut request = Vec::new();
    let mut buffer = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        let count = stream.read(&mut buffer)?;
        if count == 0 || request.len() > 16 * 1024 {
            return Ok(());
        }
        request.extend_from_slice(buffer.get(..count).unwrap_or(&[]));
    }
    let line = request.split(|&b| b == b'\r').next().unwrap_or(&[]);
    let path: String = String::from_utf8_lossy(line)
        .split(' ')
        .nth(1)
        .unwrap_or("/")
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(200)
        .collect();
    if let Some(count) = path
        .strip_prefix("/bytes/")
        .and_then(|n| n.parse::<u64>().ok())
        .filter(|n| *n <= MAX_BENCH_BYTES)
    {
        let head = format!(
            "HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {count}\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(head.as_bytes())?;
        let chunk = vec![0x5au8; 64 * 1024];
        let mut left = count;
        while left > 0 {
            let n = usize::try_from(left.min(chunk.len() as u64)).unwrap_or(chunk.len());
            stream.write_all(chunk.get(..n).unwrap_or(&[]))?;
            left -= n as u64;
        }
        return Ok(());
    }
    let response = format!(
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nX-Path: {path}\r\nConnection: close\r\n\r\n{HTTP_BODY}",
        HTTP_BODY.len()
    );
    stream.write_all(response.as_bytes())
}

/// Downloads `GET /bytes/<count>` from `address` and returns the bytes of
/// body received and the seconds it took (a throughput probe).
pub fn http_bench(address: SocketAddr, count: u64, timeout: Duration) -> io::Result<(u64, f64)> {
    let start = std::time::Instant::now();
    let mut stream = TcpStream::connect_timeout(&address, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(format!("GET /bytes/{count} HTTP/1.0\r\n\r\n").as_bytes())?;
    let mut buffer = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = stream.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    Ok((total, start.elapsed().as_secs_f64()))
}

/// Fetches `http://address/path` and returns the body.
pub fn http_get(address: SocketAddr, path: &str, timeout: Duration) -> io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&address, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").as_bytes())?;
    let mut response = Vec::new();
    stream.take(64 * 1024).read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    match text.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.0 200") => Ok(body.to_string()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not an HTTP 200 response",
        )),
    }
}

/// A parsed DNS question (the only part of a query the server uses).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Question {
    /// Transaction id.
    pub id: u16,
    /// The name, dotted, lowercase.
    pub name: String,
    /// QTYPE (1 = A).
    pub qtype: u16,
    /// Where the question ends in the message.
    pub end: usize,
}

fn be16(bytes: &[u8], at: usize) -> Option<u16> {
    let pair = bytes.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([*pair.first()?, *pair.get(1)?]))
}

/// Parses a standard query with exactly one question (no compression in
/// the question, as every resolver sends it). `None` for anything else.
pub fn parse_query(message: &[u8]) -> Option<Question> {
    let id = be16(message, 0)?;
    let flags = be16(message, 2)?;
    // QR must be 0 (a query), opcode 0 (standard).
    if flags & 0x8000 != 0 || (flags >> 11) & 0xf != 0 {
        return None;
    }
    if be16(message, 4)? != 1 {
        return None;
    }
    let mut at = 12usize;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*message.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        if len > 63 || labels.len() >= 127 {
            return None;
        }
        let label = message.get(at..at + len)?;
        labels.push(String::from_utf8_lossy(label).to_ascii_lowercase());
        at += len;
    }
    let qtype = be16(message, at)?;
    let _qclass = be16(message, at + 2)?;
    Some(Question {
        id,
        name: labels.join("."),
        qtype,
        end: at + 4,
    })
}

/// Builds the answer: the question echoed, one A record with `address` for
/// A queries (TTL 60), no answer (NOERROR) for other types.
pub fn build_answer(query: &[u8], question: &Question, address: Ipv4Addr) -> Vec<u8> {
    let answer_a = question.qtype == 1;
    let mut out = Vec::with_capacity(question.end + 16);
    out.extend_from_slice(&question.id.to_be_bytes());
    // QR=1, opcode 0, AA=1, RD copied, RA=1, RCODE 0.
    let rd = be16(query, 2).unwrap_or(0) & 0x0100;
    out.extend_from_slice(&(0x8400u16 | rd | 0x0080).to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&u16::from(answer_a).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(query.get(12..question.end).unwrap_or(&[]));
    if answer_a {
        out.extend_from_slice(&[0xc0, 0x0c]); // name: pointer to the question
        out.extend_from_slice(&1u16.to_be_bytes()); // A
        out.extend_from_slice(&1u16.to_be_bytes()); // IN
        out.extend_from_slice(&60u32.to_be_bytes());
        out.extend_from_slice(&4u16.to_be_bytes());
        out.extend_from_slice(&address.octets());
    }
    out
}

/// Echoes every TCP connection on `address` back to itself, forever
/// (bounded buffer, one thread per connection).
pub fn serve_tcp_echo(address: SocketAddr) -> io::Result<()> {
    let listener = TcpListener::bind(address)?;
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            while let Ok(count) = stream.read(&mut buffer) {
                if count == 0
                    || stream
                        .write_all(buffer.get(..count).unwrap_or(&[]))
                        .is_err()
                {
                    break;
                }
            }
        });
    }
    Ok(())
}

/// Echoes every UDP datagram on `address` back to its sender, forever.
pub fn serve_udp_echo(address: SocketAddr) -> io::Result<()> {
    let socket = UdpSocket::bind(address)?;
    let mut buffer = [0u8; 2048];
    loop {
        let Ok((count, peer)) = socket.recv_from(&mut buffer) else {
            continue;
        };
        let _ = socket.send_to(buffer.get(..count).unwrap_or(&[]), peer);
    }
}

/// Sends `text` to a UDP echo server and returns what came back.
pub fn udp_echo(server: SocketAddr, text: &str, timeout: Duration) -> io::Result<String> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    socket.set_read_timeout(Some(timeout))?;
    socket.send_to(text.as_bytes(), server)?;
    let mut buffer = [0u8; 2048];
    let (count, _) = socket.recv_from(&mut buffer)?;
    Ok(String::from_utf8_lossy(buffer.get(..count).unwrap_or(&[])).into_owned())
}

/// Holds one TCP connection to an echo server open: sends each line of
/// `input` and writes `echo LINE` to `output` when it comes back, or
/// `cut: ERROR` (and returns the error) when the connection no longer
/// carries data. Prints `connected` first. A probe for "an established
/// connection is cut".
pub fn tcp_hold(
    server: SocketAddr,
    input: impl io::BufRead,
    mut output: impl Write,
    timeout: Duration,
) -> io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&server, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    writeln!(output, "connected")?;
    output.flush()?;
    for line in input.lines() {
        let line = line?;
        let exchange = |stream: &mut TcpStream| -> io::Result<String> {
            stream.write_all(format!("{line}\n").as_bytes())?;
            let mut got = Vec::new();
            let mut byte = [0u8; 1];
            while got.last() != Some(&b'\n') {
                if stream.read(&mut byte)? == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the server closed the connection",
                    ));
                }
                got.push(byte[0]);
                if got.len() > 4096 {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
                }
            }
            Ok(String::from_utf8_lossy(&got).trim_end().to_string())
        };
        match exchange(&mut stream) {
            Ok(echo) => writeln!(output, "echo {echo}")?,
            Err(error) => {
                writeln!(output, "cut: {error}")?;
                output.flush()?;
                return Err(error);
            }
        }
        output.flush()?;
    }
    Ok(())
}

/// Answers every A query on `bind` with `address`, forever.
pub fn serve_dns(bind: SocketAddr, address: Ipv4Addr) -> io::Result<()> {
    let socket = UdpSocket::bind(bind)?;
    let mut buffer = [0u8; 512];
    loop {
        let Ok((count, peer)) = socket.recv_from(&mut buffer) else {
            continue;
        };
        let query = buffer.get(..count).unwrap_or(&[]);
        if let Some(question) = parse_query(query) {
            let _ = socket.send_to(&build_answer(query, &question, address), peer);
        }
    }
}

/// Asks `server` for the A record of `name`; returns the first address.
pub fn dns_query(server: SocketAddr, name: &str, timeout: Duration) -> io::Result<Ipv4Addr> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    socket.set_read_timeout(Some(timeout))?;
    let mut query = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.').filter(|l| !l.is_empty()) {
        let len = u8::try_from(label.len())
            .ok()
            .filter(|len| *len <= 63)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "label too long"))?;
        query.push(len);
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]);
    socket.send_to(&query, server)?;
    let mut buffer = [0u8; 512];
    let (count, _) = socket.recv_from(&mut buffer)?;
    let reply = buffer.get(..count).unwrap_or(&[]);
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed DNS reply");
    if be16(reply, 0) != Some(0x1234) || be16(reply, 6).unwrap_or(0) == 0 {
        return Err(bad());
    }
    // The answer's RDATA is the last 4 bytes of our one-answer reply.
    let start = count.checked_sub(4).ok_or_else(bad)?;
    let octets = reply.get(start..count).ok_or_else(bad)?;
    Ok(Ipv4Addr::new(octets[0], octets[1], octets[2], octets[3]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_roundtrip_and_malformed_queries() {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let address = socket.local_addr().unwrap();
        drop(socket);
        thread::spawn(move || serve_dns(address, Ipv4Addr::new(192, 0, 2, 80)));
        thread::sleep(Duration::from_millis(100));
        let got = dns_query(address, "Example.com", Duration::from_secs(2)).unwrap();
        assert_eq!(got, Ipv4Addr::new(192, 0, 2, 80));
        assert!(parse_query(&[]).is_none());
        assert!(parse_query(&[0; 11]).is_none());
        let mut truncated = vec![0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 60];
        truncated.extend_from_slice(b"abc");
        assert!(parse_query(&truncated).is_none());
        let response_flag = [0, 1, 0x80, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1];
        assert!(parse_query(&response_flag).is_none());
        let ok = [0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, b'a', 0, 0, 1, 0, 1];
        assert_eq!(parse_query(&ok).unwrap().name, "a");
    }

    #[test]
    fn http_roundtrip() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        drop(listener);
        thread::spawn(move || serve_http(address));
        thread::sleep(Duration::from_millis(100));
        let body = http_get(address, "/x", Duration::from_secs(2)).unwrap();
        assert_eq!(body, HTTP_BODY);
        let (received, _) = http_bench(address, 1_000_000, Duration::from_secs(5)).unwrap();
        // The body plus a header of well under 200 bytes.
        assert!((1_000_000..1_000_200).contains(&received), "{received}");
    }

    #[test]
    fn echo_servers_and_tcp_hold() {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = tcp.local_addr().unwrap();
        drop(tcp);
        thread::spawn(move || serve_tcp_echo(address));
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let udp_address = udp.local_addr().unwrap();
        drop(udp);
        thread::spawn(move || serve_udp_echo(udp_address));
        thread::sleep(Duration::from_millis(100));
        assert_eq!(
            udp_echo(udp_address, "ping", Duration::from_secs(2)).unwrap(),
            "ping"
        );
        let mut out = Vec::new();
        tcp_hold(
            address,
            &b"one\ntwo\n"[..],
            &mut out,
            Duration::from_secs(2),
        )
        .unwrap();
        assert_eq!(out, b"connected\necho one\necho two\n");
        // Nothing listens on the UDP port's number over TCP: refused.
        assert!(tcp_hold(udp_address, &b""[..], Vec::new(), Duration::from_secs(2)).is_err());
    }
}
