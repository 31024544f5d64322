//! A TLS upstream that reads request bodies slowly (small reads with pauses), so the
//! gateway's writes to it keep finding the socket full.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::certs;

/// Starts the sink; each request is answered `200` with the number of body bytes (as
/// sent, chunk framing included) once a chunked body's last chunk has been read.
pub async fn slow_tls_sink(cert_pem: &str, key_pem: &str) -> SocketAddr {
    let mut cfg = certs::server_config(cert_pem, key_pem);
    // HTTP/1.1 only: the point is the gateway's HTTP/1.1 request body writer.
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let cfg = Arc::new(cfg);
    // A small receive buffer: the gateway's writes find the socket full quickly.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 << 10).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(16).unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = vec![0u8; 8192];
                let mut seen: Vec<u8> = Vec::new();
                let mut body = 0u64;
                let mut in_body = false;
                loop {
                    let Ok(n) = tls.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    if in_body {
                        body += n as u64;
                        seen.extend_from_slice(&buf[..n]);
                    } else {
                        seen.extend_from_slice(&buf[..n]);
                        if let Some(i) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            in_body = true;
                            seen.drain(..i + 4);
                            body = seen.len() as u64;
                        }
                    }
                    if seen.len() > 16 {
                        seen.drain(..seen.len() - 16);
                    }
                    if in_body && seen.ends_with(b"0\r\n\r\n") {
                        let answer = body.to_string();
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{answer}",
                            answer.len()
                        );
                        let _ = tls.write_all(resp.as_bytes()).await;
                        let _ = tls.flush().await;
                        in_body = false;
                        seen.clear();
                        continue;
                    }
                    // Read slowly: the gateway's side of the socket stays full.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            });
        }
    });
    addr
}
