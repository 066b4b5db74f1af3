//! `flotilla-bench transport`: the data plane's ceiling on loopback.
//!
//! A throwaway fleet is made with the coordinator's own `Fleet::init` and
//! `Fleet::enroll`, and two of its hosts, `source` and `sink`, open the agents'
//! real QUIC endpoints (`TransferEndpoint`: fleet CA, mutual TLS, the agents'
//! transport settings). The source sends `--bytes` over 1, 4, … parallel
//! streams of one connection, in 1 MiB writes of one reused random buffer; the
//! sink reads every stream to its end, discards, and answers one byte. Each run
//! is timed from the first write until the last answer. The same bytes then go
//! through one plain TCP connection the same way. TCP has no encryption here,
//! so the ratio includes the cost of QUIC's TLS.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use flotilla_agent::{Identity, TransferEndpoint};
use flotilla_coordinator::Fleet;
use flotilla_protocol::{Bundle, HostName};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// Size of one write, and of the reused buffer.
const CHUNK: usize = 1 << 20;
/// The byte the receiver answers once it has read a stream to its end.
const DONE: u8 = 1;
/// Most streams per run: the agents' limit of concurrent bidirectional
/// streams (`MAX_BIDI_STREAMS` in `agent/src/transfer/tls.rs`). Every stream
/// is opened before the first write, so more would wait forever.
const MAX_STREAMS: usize = 64;
const MIB: f64 = 1024.0 * 1024.0;

/// Flags of `flotilla-bench transport`.
#[derive(Debug, clap::Args)]
pub struct TransportArgs {
    /// Bytes per run: a plain number, or with a suffix (K, M, G, KiB, MiB, GiB; KB, MB, GB are powers of 1000).
    #[arg(long, default_value = "1GiB", value_parser = parse_bytes)]
    pub bytes: u64,
    /// Parallel QUIC stream counts to try, comma-separated (each 1 to 64).
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    pub streams: Vec<usize>,
    /// Ignored: the fleet is made with the coordinator's library. Accepted so
    /// that `bench/run.sh` may pass the same flag to every subcommand.
    #[arg(long = "flotilla", value_name = "PATH", hide = true)]
    pub _flotilla: Option<PathBuf>,
}

/// What `transport` prints.
#[derive(Debug, Serialize)]
pub struct TransportReport {
    /// Bytes sent in each run.
    pub bytes: u64,
    /// One QUIC run per stream count.
    pub quic: Vec<QuicRun>,
    /// The plain TCP run.
    pub tcp: Rate,
    /// Best QUIC throughput divided by TCP's.
    pub quic_to_tcp: Option<f64>,
}

/// One QUIC run.
#[derive(Debug, Serialize)]
pub struct QuicRun {
    /// Parallel streams.
    pub streams: usize,
    /// Throughput.
    pub mib_per_s: f64,
    /// Time from the first write until the last stream was confirmed read.
    pub seconds: f64,
}

/// Throughput of one run.
#[derive(Debug, Serialize)]
pub struct Rate {
    /// Throughput.
    pub mib_per_s: f64,
    /// Time from the first write until the receiver confirmed the end.
    pub seconds: f64,
}

impl Rate {
    fn of(bytes: u64, elapsed: Duration) -> Rate {
        let seconds = elapsed.as_secs_f64();
        let mib_per_s = if seconds > 0.0 {
            bytes as f64 / MIB / seconds
        } else {
            0.0
        };
        Rate { mib_per_s, seconds }
    }
}

/// Runs every QUIC run, then the TCP run.
pub async fn run(args: &TransportArgs) -> Result<TransportReport> {
    ensure!(args.bytes > 0, "--bytes must be more than 0");
    ensure!(
        args.streams.iter().all(|s| (1..=MAX_STREAMS).contains(s)),
        "--streams takes counts from 1 to {MAX_STREAMS} (the agents' stream limit), got {:?}",
        args.streams
    );
    let buf: Arc<[u8]> = random_buffer(CHUNK).into();
    let dir = tempfile::tempdir().context("cannot create a directory for the throwaway fleet")?;
    let (sink, source) = throwaway_fleet(dir.path())?;

    let mut quic = Vec::new();
    let pair = QuicPair::open(&sink, &source).await?;
    for &streams in &args.streams {
        let elapsed = quic_run(&pair.conn, &buf, args.bytes, streams).await?;
        let rate = Rate::of(args.bytes, elapsed);
        eprintln!(
            "QUIC, {streams} stream(s): {:.0} MiB/s ({:.2} s)",
            rate.mib_per_s, rate.seconds
        );
        quic.push(QuicRun {
            streams,
            mib_per_s: rate.mib_per_s,
            seconds: rate.seconds,
        });
    }
    pair.close().await;

    let tcp = Rate::of(args.bytes, tcp_run(&buf, args.bytes).await?);
    eprintln!(
        "plain TCP: {:.0} MiB/s ({:.2} s)",
        tcp.mib_per_s, tcp.seconds
    );
    let best = quic.iter().map(|q| q.mib_per_s).fold(0.0, f64::max);
    let quic_to_tcp = (tcp.mib_per_s > 0.0).then(|| best / tcp.mib_per_s);
    Ok(TransportReport {
        bytes: args.bytes,
        quic,
        tcp,
        quic_to_tcp,
    })
}

/// Makes a fleet in `dir` and enrolls `sink` and `source`, as `flotilla init`
/// and `flotilla enroll` do.
fn throwaway_fleet(dir: &Path) -> Result<(Bundle, Bundle)> {
    let fleet = Fleet::init(&dir.join("fleet"), "nats://127.0.0.1:4222", false)
        .context("cannot create the throwaway fleet")?;
    let enroll = |name: &str| -> Result<Bundle> {
        let host = HostName::new(name).context("bench host name")?;
        let out = dir.join(format!("{name}.toml"));
        fleet
            .enroll(&host, &out, None, false, false)
            .with_context(|| format!("cannot enroll {name} in the throwaway fleet"))
    };
    Ok((enroll("sink")?, enroll("source")?))
}

/// Both endpoints and the connection between them.
#[derive(Debug)]
struct QuicPair {
    sink: TransferEndpoint,
    source: TransferEndpoint,
    conn: quinn::Connection,
    server: tokio::task::JoinHandle<Result<()>>,
}

impl QuicPair {
    /// Binds both endpoints on loopback and connects the source to the sink.
    async fn open(sink: &Bundle, source: &Bundle) -> Result<QuicPair> {
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        let sink_id = Identity::from_bundle(sink).context("sink's TLS identity")?;
        let source_id = Identity::from_bundle(source).context("source's TLS identity")?;
        let sink_ep = TransferEndpoint::bind(loopback, &sink_id)
            .context("cannot bind the sink's QUIC endpoint")?;
        let sink_addr = sink_ep
            .local_addr()
            .context("sink endpoint has no address")?;
        let server = tokio::spawn(serve_quic(sink_ep.clone()));
        let source_ep = TransferEndpoint::bind(loopback, &source_id)
            .context("cannot bind the source's QUIC endpoint")?;
        let conn = source_ep
            .connect(sink_addr, &sink.host)
            .await
            .context("source cannot connect to sink over QUIC")?;
        Ok(QuicPair {
            sink: sink_ep,
            source: source_ep,
            conn,
            server,
        })
    }

    /// Closes the connection, then both endpoints.
    async fn close(self) {
        self.conn.close(quinn::VarInt::from_u32(0), b"done");
        self.source.shutdown().await;
        match self.server.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("QUIC sink: {e:#}"),
            Err(e) => eprintln!("QUIC sink crashed: {e}"),
        }
        self.sink.shutdown().await;
    }
}

/// The sink: accepts the one connection, then drains every stream it opens
/// until the source closes it.
async fn serve_quic(endpoint: TransferEndpoint) -> Result<()> {
    let incoming = endpoint
        .accept()
        .await
        .context("sink endpoint closed before the source connected")?;
    let conn = incoming
        .establish()
        .await
        .context("QUIC handshake with the source failed")?;
    let mut drains = JoinSet::new();
    while let Ok((send, recv)) = conn.accept_bi().await {
        drains.spawn(drain_quic(send, recv));
    }
    while let Some(done) = drains.join_next().await {
        if let Ok(Err(e)) = done {
            eprintln!("QUIC sink stream: {e:#}");
        }
    }
    Ok(())
}

/// Reads one stream to its end, discarding, then answers [`DONE`].
async fn drain_quic(mut send: quinn::SendStream, mut recv: quinn::RecvStream) -> Result<()> {
    while recv
        .read_chunk(CHUNK, true)
        .await
        .context("read QUIC stream")?
        .is_some()
    {}
    send.write_all(&[DONE])
        .await
        .context("answer QUIC stream")?;
    send.finish().context("finish QUIC answer")?;
    Ok(())
}

/// Sends `bytes` split over `streams` streams; returns the time from the first
/// write until the last answer.
async fn quic_run(
    conn: &quinn::Connection,
    buf: &Arc<[u8]>,
    bytes: u64,
    streams: usize,
) -> Result<Duration> {
    let mut opened = Vec::with_capacity(streams);
    for _ in 0..streams {
        opened.push(conn.open_bi().await.context("cannot open a QUIC stream")?);
    }
    let started = Instant::now();
    let mut senders = JoinSet::new();
    for ((send, recv), share) in opened.into_iter().zip(shares(bytes, streams)) {
        senders.spawn(send_quic(send, recv, buf.clone(), share));
    }
    while let Some(joined) = senders.join_next().await {
        joined.context("QUIC sender crashed")??;
    }
    Ok(started.elapsed())
}

/// Writes `share` bytes on one stream, finishes it and waits for the answer.
async fn send_quic(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    buf: Arc<[u8]>,
    share: u64,
) -> Result<()> {
    let mut left = share;
    while left > 0 {
        let n = chunk_len(left, buf.len());
        send.write_all(&buf[..n])
            .await
            .context("write to QUIC stream")?;
        left -= n as u64;
    }
    send.finish().context("finish QUIC stream")?;
    let answer = recv
        .read_to_end(16)
        .await
        .context("wait for the sink's answer")?;
    ensure!(answer == [DONE], "sink answered {answer:?}, not [{DONE}]");
    Ok(())
}

/// Sends `bytes` over one TCP connection on loopback, closes the write side,
/// and waits for the receiver's one-byte answer.
async fn tcp_run(buf: &Arc<[u8]>, bytes: u64) -> Result<Duration> {
    let listener = TcpListener::bind(("127.0.0.1", 0))
        .await
        .context("cannot listen on TCP loopback")?;
    let addr = listener.local_addr().context("TCP listener address")?;
    let server = tokio::spawn(async move {
        let (sock, _) = listener.accept().await.context("TCP accept")?;
        drain_tcp(sock).await
    });
    let mut sock = TcpStream::connect(addr)
        .await
        .context("cannot connect over TCP loopback")?;
    let started = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = chunk_len(left, buf.len());
        sock.write_all(&buf[..n]).await.context("write to TCP")?;
        left -= n as u64;
    }
    sock.shutdown().await.context("close TCP write side")?;
    let mut answer = [0u8; 1];
    sock.read_exact(&mut answer)
        .await
        .context("wait for the TCP receiver's answer")?;
    let elapsed = started.elapsed();
    server.await.context("TCP receiver crashed")??;
    ensure!(answer == [DONE], "TCP receiver answered {answer:?}");
    Ok(elapsed)
}

/// Reads to EOF, discarding, then answers [`DONE`].
async fn drain_tcp(mut sock: TcpStream) -> Result<()> {
    let mut scratch = vec![0u8; CHUNK];
    while sock.read(&mut scratch).await.context("read TCP")? > 0 {}
    sock.write_all(&[DONE]).await.context("answer over TCP")?;
    sock.shutdown().await.context("close TCP answer")?;
    Ok(())
}

/// The next write's length: a whole buffer, or what is left.
fn chunk_len(left: u64, buf_len: usize) -> usize {
    usize::try_from(left).map_or(buf_len, |l| l.min(buf_len))
}

/// `total` split into `parts` shares that differ by at most one byte.
fn shares(total: u64, parts: usize) -> Vec<u64> {
    let parts_u64 = parts.max(1) as u64;
    let (base, extra) = (total / parts_u64, total % parts_u64);
    (0..parts_u64)
        .map(|i| base + u64::from(i < extra))
        .collect()
}

/// `len` bytes of xorshift output: incompressible, and cheap to make. Nothing
/// on either path compresses, so this only keeps the data honest.
fn random_buffer(len: usize) -> Vec<u8> {
    let mut state = (uuid::Uuid::new_v4().as_u128() as u64) | 1;
    let mut buf = Vec::with_capacity(len + 8);
    while buf.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        buf.extend_from_slice(&state.to_le_bytes());
    }
    buf.truncate(len);
    buf
}

/// Why a `--bytes` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum BytesError {
    /// No leading number.
    #[error("{0:?} is not a byte count (try 1073741824 or 1GiB)")]
    NotANumber(String),
    /// A suffix that is not a unit.
    #[error("unknown unit {unit:?} in {text:?} (use K, M, G or KiB, MiB, GiB)")]
    UnknownUnit {
        /// The suffix.
        unit: String,
        /// The whole value.
        text: String,
    },
    /// More bytes than a `u64` counts.
    #[error("{0:?} is too large")]
    TooLarge(String),
}

/// Parses `1073741824`, `1GiB`, `512M`, `10MB`.
fn parse_bytes(text: &str) -> Result<u64, BytesError> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, suffix) = text.split_at(split);
    let number: u64 = digits
        .parse()
        .map_err(|_| BytesError::NotANumber(text.to_owned()))?;
    let unit: u64 = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "ki" | "kib" => 1 << 10,
        "m" | "mi" | "mib" => 1 << 20,
        "g" | "gi" | "gib" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        other => {
            return Err(BytesError::UnknownUnit {
                unit: other.to_owned(),
                text: text.to_owned(),
            })
        }
    };
    number
        .checked_mul(unit)
        .ok_or_else(|| BytesError::TooLarge(text.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts_take_plain_numbers_and_units() {
        assert_eq!(parse_bytes("1073741824"), Ok(1 << 30));
        assert_eq!(parse_bytes("1GiB"), Ok(1 << 30));
        assert_eq!(parse_bytes("32M"), Ok(32 << 20));
        assert_eq!(parse_bytes("10MB"), Ok(10_000_000));
        assert_eq!(
            parse_bytes("1TiB"),
            Err(BytesError::UnknownUnit {
                unit: "tib".into(),
                text: "1TiB".into()
            })
        );
        assert_eq!(
            parse_bytes("GiB"),
            Err(BytesError::NotANumber("GiB".into()))
        );
        assert_eq!(
            parse_bytes("99999999999G"),
            Err(BytesError::TooLarge("99999999999G".into()))
        );
    }

    #[test]
    fn shares_add_up_and_differ_by_at_most_one() {
        let s = shares(10, 4);
        assert_eq!(s, vec![3, 3, 2, 2]);
        assert_eq!(shares(3, 4).iter().sum::<u64>(), 3);
    }
}
