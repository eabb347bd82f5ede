//! The admin HTTP endpoint: `GET /metrics` (Prometheus text) and `GET /healthz`, served
//! by one thread off the data path. It reads the cores' counters and never writes them.
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::metrics::{render, CoreMetrics};

pub struct Admin {
    pub cores: Vec<Arc<CoreMetrics>>,
    pub workers: Vec<String>,
    /// Set once draining: /healthz then answers 503 so load balancers stop sending.
    pub draining: Arc<AtomicBool>,
}

impl Admin {
    /// Serves until the process exits.
    pub fn serve(self, listener: TcpListener) {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            if let Err(e) = self.handle(stream) {
                tracing::debug!("admin request failed: {e}");
            }
        }
    }

    fn handle(&self, stream: TcpStream) -> std::io::Result<()> {
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        stream.set_write_timeout(Some(Duration::from_secs(2)))?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut request_line = String::new();
        reader.read_line(&mut request_line)?;
        // Read the headers so the client sees a clean close.
        let mut line = String::new();
        while reader.read_line(&mut line)? > 2 {
            line.clear();
        }
        let mut parts = request_line.split_whitespace();
        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let path = path.split('?').next().unwrap_or("");
        let (status, ctype, body) = match (method, path) {
            ("GET", "/metrics") => (
                "200 OK",
                "text/plain; version=0.0.4",
                render(&self.cores, &self.workers),
            ),
            ("GET", "/healthz") if !self.draining.load(Ordering::Relaxed) => {
                ("200 OK", "text/plain", "ok\n".to_string())
            }
            ("GET", "/healthz") => (
                "503 Service Unavailable",
                "text/plain",
                "draining\n".to_string(),
            ),
            ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
            _ => (
                "405 Method Not Allowed",
                "text/plain",
                "only GET\n".to_string(),
            ),
        };
        let mut s = stream;
        write!(s, "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len())?;
        s.write_all(body.as_bytes())?;
        s.flush()
    }
}
