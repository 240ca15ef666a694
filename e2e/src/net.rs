//! Loopback networking helpers: free ports and a tiny plain-HTTP probe.

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// `n` distinct free TCP ports on 127.0.0.1. All listeners are held until every port is
/// chosen, so the kernel cannot hand the same port out twice in one call.
pub fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind(("127.0.0.1", 0)))
        .collect::<std::io::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect()
}

/// One free TCP port on 127.0.0.1.
pub fn free_port() -> std::io::Result<u16> {
    let mut ports = free_ports(1)?;
    ports
        .pop()
        .ok_or_else(|| std::io::Error::other("no port was allocated"))
}

/// A plain HTTP/1.0 `GET` (no TLS): the status code and the body. Enough for etcd's
/// `/health` and the operator's `/readyz` and `/metrics`.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .with_context(|| format!("GET http://{addr}{path} timed out"))?
        .with_context(|| format!("GET http://{addr}{path}"))?;
    parse_response(&String::from_utf8_lossy(&raw))
}

/// Splits a raw HTTP/1.x response into its status code and body.
pub fn parse_response(raw: &str) -> anyhow::Result<(u16, String)> {
    let status_line = raw.lines().next().unwrap_or_default();
    let mut parts = status_line.split_whitespace();
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        bail!("not an HTTP response: {status_line:?}");
    };
    if !version.starts_with("HTTP/") {
        bail!("not an HTTP response: {status_line:?}");
    }
    let code: u16 = code
        .parse()
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct_and_bindable() {
        let ports = free_ports(8).unwrap();
        let unique: std::collections::HashSet<_> = ports.iter().collect();
        assert_eq!(unique.len(), 8);
        for p in ports {
            assert_ne!(p, 0);
            // Released again: binding it works.
            TcpListener::bind(("127.0.0.1", p)).unwrap();
        }
        assert_ne!(free_port().unwrap(), 0);
    }

    #[test]
    fn parses_responses() {
        assert_eq!(
            parse_response("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").unwrap(),
            (200, "ok".to_owned())
        );
        assert_eq!(
            parse_response("HTTP/1.0 503 Service Unavailable\r\n\r\n").unwrap(),
            (503, String::new())
        );
        assert!(parse_response("").is_err());
        assert!(parse_response("SSH-2.0-OpenSSH\r\n").is_err());
    }

    #[tokio::test]
    async fn http_get_talks_to_a_server() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let n = s.read(&mut buf).await.unwrap();
            let req = String::from_utf8_lossy(&buf[..n]).to_string();
            s.write_all(b"HTTP/1.1 200 OK\r\n\r\n{\"health\":\"true\"}")
                .await
                .unwrap();
            req
        });
        let (code, body) = http_get(addr, "/health").await.unwrap();
        assert_eq!((code, body.as_str()), (200, "{\"health\":\"true\"}"));
        assert!(
            server
                .await
                .unwrap()
                .starts_with("GET /health HTTP/1.0\r\n")
        );
    }
}
