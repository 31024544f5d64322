//! Benchmark upstream: a tiny single-threaded HTTP/1.1 server.
//!
//! Every request gets `200 OK` with the body `hello`; connections are kept
//! alive. The listen address is taken from the first argument
//! (default `127.0.0.1:9000`).

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

const DEFAULT_ADDR: &str = "127.0.0.1:9000";
const BODY: &[u8] = b"hello";

async fn hello(_req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::new(Full::new(Bytes::from_static(BODY))))
}

async fn serve(addr: SocketAddr) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    eprintln!(
        "portico-bench-upstream listening on {}",
        listener.local_addr()?
    );
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(err) => {
                // Typically EMFILE/ECONNABORTED: log and keep accepting.
                eprintln!("accept error: {err}");
                continue;
            }
        };
        // Disabling Nagle matters for small responses on keep-alive connections.
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(stream);
        tokio::spawn(async move {
            // Errors here are client disconnects and similar; ignore them.
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(io, service_fn(hello))
                .await;
        });
    }
}

fn main() {
    let arg = std::env::args().nth(1);
    let addr_str = arg.as_deref().unwrap_or(DEFAULT_ADDR);
    let addr: SocketAddr = match addr_str.parse() {
        Ok(addr) => addr,
        Err(err) => {
            eprintln!("invalid listen address {addr_str:?}: {err}");
            std::process::exit(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("failed to build tokio runtime: {err}");
            std::process::exit(1);
        }
    };
    if let Err(err) = runtime.block_on(serve(addr)) {
        eprintln!("upstream error: {err}");
        std::process::exit(1);
    }
}
