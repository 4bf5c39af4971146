//! The gateway's handling of the server greeting. The gateway is an L4 proxy: it decides the
//! route before it connects and never parses the greeting or anything after it; it splices the
//! bytes (`gateway::splice`). So what it must do with any greeting is pass it on unchanged, and
//! the client's answer the other way, whatever they hold and however they end. Where it has no
//! backend it sends its own ERR packet in the greeting's place (`gateway::mysql::err_packet`),
//! with a message that holds names from etcd and error texts: any text must make a well-formed
//! packet.
//!
//! Input: byte 0 picks the splice buffer (1 to 64 bytes, or the proxy's 16 KiB), byte 1 the
//! error code's low byte; the rest is what the server sends first (the seeds are a real
//! MariaDB 10.11 greeting). The client answers with those bytes reversed.

use std::cell::RefCell;
use std::time::Duration;

use metrics::Counter;
use myha_gateway::mysql::{err_packet, MAX_MESSAGE, SQLSTATE_GENERAL};
use myha_gateway::proxy::SPLICE_BUFFER;
use myha_gateway::splice::splice;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

/// Inputs are cut to this: both sides write everything before reading, which the loopback
/// socket buffers always hold at this size (no deadlock of the test's own making).
pub const MAX_INPUT: usize = 16 * 1024;

/// A splice that has not moved a few kilobytes in this long has stalled.
const STALL: Duration = Duration::from_secs(10);

/// One runtime and listener per thread, made on first use: a fresh runtime per input would
/// cost more than the input.
struct Rig {
    rt: Runtime,
    listener: TcpListener,
}

thread_local! {
    static RIG: RefCell<Option<Rig>> = const { RefCell::new(None) };
}

pub fn greeting(data: &[u8]) -> bool {
    let data = &data[..data.len().min(MAX_INPUT)];
    let (buffer, code_low, server_bytes) = match data {
        [b, c, rest @ ..] => (
            if *b < 128 {
                1 + usize::from(*b % 64)
            } else {
                SPLICE_BUFFER
            },
            *c,
            rest,
        ),
        _ => (SPLICE_BUFFER, 0, data),
    };
    error_packet(u16::from_le_bytes([code_low, 0x04]), server_bytes);
    let client_bytes: Vec<u8> = server_bytes.iter().rev().copied().collect();
    RIG.with(|cell| {
        let mut slot = cell.borrow_mut();
        let rig = slot.get_or_insert_with(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a current-thread runtime");
            let listener = rt
                .block_on(TcpListener::bind("127.0.0.1:0"))
                .expect("a loopback listener");
            Rig { rt, listener }
        });
        rig.rt.block_on(pass_through(
            &rig.listener,
            buffer,
            server_bytes,
            &client_bytes,
        ));
    });
    // Every input is valid here: none is kept for its content.
    false
}

/// A connected pair of loopback sockets.
async fn pair(listener: &TcpListener) -> (TcpStream, TcpStream) {
    let addr = listener.local_addr().expect("bound");
    let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
    (a.expect("connect"), b.expect("accept").0)
}

/// Server, gateway splice and client on loopback: the client gets exactly the server's bytes
/// and the server exactly the client's, each side's end passed on, and the splice counts both.
async fn pass_through(
    listener: &TcpListener,
    buffer: usize,
    server_bytes: &[u8],
    client_bytes: &[u8],
) {
    let (mut client, proxy_client) = pair(listener).await;
    let (proxy_backend, mut server) = pair(listener).await;
    let spliced = splice(
        proxy_client,
        proxy_backend,
        buffer,
        Counter::noop(),
        Counter::noop(),
    );
    let server_side = async {
        server.write_all(server_bytes).await?;
        server.shutdown().await?;
        let mut got = Vec::new();
        server.read_to_end(&mut got).await?;
        Ok::<_, std::io::Error>(got)
    };
    let client_side = async {
        client.write_all(client_bytes).await?;
        client.shutdown().await?;
        let mut got = Vec::new();
        client.read_to_end(&mut got).await?;
        Ok::<_, std::io::Error>(got)
    };
    let all = async { tokio::join!(spliced, server_side, client_side) };
    let (moved, at_server, at_client) = tokio::time::timeout(STALL, all)
        .await
        .unwrap_or_else(|_| panic!("the splice stalled (buffer {buffer})"));
    assert_eq!(
        at_client.expect("client side").as_slice(),
        server_bytes,
        "the greeting reached the client changed (buffer {buffer})"
    );
    assert_eq!(
        at_server.expect("server side").as_slice(),
        client_bytes,
        "the client's answer reached the server changed (buffer {buffer})"
    );
    assert_eq!(
        moved.expect("splice"),
        (client_bytes.len() as u64, server_bytes.len() as u64)
    );
}

/// The gateway's ERR packet for a message made of `text`: a header whose length is the
/// payload's, sequence 0, `0xff`, the code, `#HY000`, then the message cut to
/// [`MAX_MESSAGE`] bytes at a character boundary.
fn error_packet(code: u16, text: &[u8]) {
    let message = String::from_utf8_lossy(text);
    let p = err_packet(code, SQLSTATE_GENERAL, &message);
    assert!(p.len() >= 13, "{p:?}");
    let len = u32::from_le_bytes([p[0], p[1], p[2], 0]) as usize;
    assert_eq!(len, p.len() - 4);
    assert_eq!(p[3], 0, "sequence id");
    assert_eq!(p[4], 0xff);
    assert_eq!(u16::from_le_bytes([p[5], p[6]]), code);
    assert_eq!(&p[7..13], b"#HY000");
    let sent = std::str::from_utf8(&p[13..]).expect("the message stays UTF-8");
    assert!(message.starts_with(sent));
    assert!(sent.len() <= MAX_MESSAGE);
    // Cut only as much as the character boundary needs.
    assert!(sent.len() == message.len() || sent.len() + 4 > MAX_MESSAGE);
}
