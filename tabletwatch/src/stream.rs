//! One tablet's `StreamHealth` subscription: connect, forward every message, and on any break
//! reconnect with backoff, forever (until the task is aborted because the tablet deregistered
//! or moved).

use std::sync::Arc;
use std::time::Instant;

use backoff::Backoff;
use myha_proto::agent::agent_client::AgentClient;
use myha_proto::agent::{Health, StreamHealthRequest};
use tokio::sync::mpsc;
use tonic::transport::Endpoint;

use crate::snapshot::{HealthSample, StreamState};
use crate::WatchOptions;

/// What a stream task reports to the supervisor. `generation` identifies the task, so reports
/// of a replaced task are ignored.
#[derive(Debug)]
pub(crate) enum Report {
    Health {
        alias: String,
        generation: u64,
        sample: Arc<HealthSample>,
    },
    State {
        alias: String,
        generation: u64,
        state: StreamState,
    },
}

/// The gRPC endpoint of an agent's `host:port`.
pub(crate) fn endpoint(grpc_addr: &str, opts: &WatchOptions) -> Result<Endpoint, String> {
    if grpc_addr.trim().is_empty() {
        return Err("the registration has no grpc_addr".into());
    }
    let ep = pki::grpc_endpoint(grpc_addr, opts.tls.as_ref())?;
    Ok(ep
        .connect_timeout(opts.connect_timeout)
        .tcp_nodelay(true)
        // A frozen or partitioned agent does not close the connection: HTTP/2 pings notice it.
        .http2_keep_alive_interval(opts.keepalive_interval)
        .keep_alive_timeout(opts.connect_timeout)
        .keep_alive_while_idle(true))
}

type HealthStream = tonic::Streaming<Health>;

async fn subscribe(grpc_addr: &str, opts: &WatchOptions) -> Result<HealthStream, String> {
    let ep = endpoint(grpc_addr, opts)?;
    let channel = ep
        .connect()
        .await
        .map_err(|e| format!("connect to {grpc_addr}: {}", error_chain(&e)))?;
    let mut client = AgentClient::new(channel);
    match tokio::time::timeout(
        opts.connect_timeout,
        client.stream_health(StreamHealthRequest {}),
    )
    .await
    {
        Err(_) => Err(format!(
            "StreamHealth on {grpc_addr}: no answer within {:?}",
            opts.connect_timeout
        )),
        Ok(Err(status)) => Err(format!(
            "StreamHealth on {grpc_addr}: {}",
            status_text(&status)
        )),
        Ok(Ok(resp)) => Ok(resp.into_inner()),
    }
}

fn status_text(s: &tonic::Status) -> String {
    let mut text = format!("{:?}: {}", s.code(), s.message());
    if let Some(src) = std::error::Error::source(s) {
        text.push_str(&format!(" ({})", error_chain(src)));
    }
    text
}

/// An error and its sources, joined with ": ".
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = s.source();
    }
    parts.join(": ")
}

pub(crate) fn now_ms() -> u64 {
    topo::now_ms()
}

/// Runs until aborted or until the supervisor is gone.
pub(crate) async fn run(
    alias: String,
    grpc_addr: String,
    generation: u64,
    reports: mpsc::Sender<Report>,
    opts: WatchOptions,
) {
    let tablet_label = alias.clone();
    let reconnects = metrics::counter!("myha_tabletwatch_stream_reconnects_total", "tablet" => tablet_label.clone());
    let messages =
        metrics::counter!("myha_tabletwatch_health_messages_total", "tablet" => tablet_label);
    let mut backoff = Backoff::new(opts.backoff_min, opts.backoff_max);
    let mut failures: u32 = 0;
    let mut down_since = (Instant::now(), now_ms());
    let state = |state: StreamState| Report::State {
        alias: alias.clone(),
        generation,
        state,
    };
    loop {
        let error = match subscribe(&grpc_addr, &opts).await {
            Err(e) => e,
            Ok(mut stream) => {
                let connected = StreamState::Connected {
                    since: Instant::now(),
                    since_ms: now_ms(),
                };
                if reports.send(state(connected)).await.is_err() {
                    return;
                }
                if failures > 0 {
                    tracing::info!(tablet = %alias, addr = %grpc_addr, after_failures = failures, "health stream re-established");
                } else {
                    tracing::debug!(tablet = %alias, addr = %grpc_addr, "health stream established");
                }
                failures = 0;
                let why = loop {
                    match tokio::time::timeout(opts.idle_timeout, stream.message()).await {
                        Ok(Ok(Some(health))) => {
                            messages.increment(1);
                            backoff.reset();
                            let sample = Arc::new(HealthSample {
                                health: Arc::new(health),
                                received_at: Instant::now(),
                                received_ms: now_ms(),
                            });
                            let report = Report::Health {
                                alias: alias.clone(),
                                generation,
                                sample,
                            };
                            if reports.send(report).await.is_err() {
                                return;
                            }
                        }
                        Ok(Ok(None)) => break "the agent ended the health stream".to_string(),
                        Ok(Err(status)) => {
                            break format!("health stream broke: {}", status_text(&status))
                        }
                        Err(_) => break format!("no health message for {:?}", opts.idle_timeout),
                    }
                };
                tracing::warn!(tablet = %alias, addr = %grpc_addr, error = %why, "health stream lost; reconnecting");
                down_since = (Instant::now(), now_ms());
                why
            }
        };
        failures = failures.saturating_add(1);
        reconnects.increment(1);
        if failures > 1 {
            tracing::debug!(tablet = %alias, addr = %grpc_addr, failures, error = %error, "health stream: attempt failed");
        }
        let down = StreamState::Connecting {
            since: down_since.0,
            since_ms: down_since.1,
            failures,
            last_error: Some(error),
        };
        if reports.send(state(down)).await.is_err() {
            return;
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let opts = WatchOptions::default();
        assert!(endpoint("127.0.0.1:15999", &opts).is_ok());
        assert!(endpoint("http://127.0.0.1:15999", &opts).is_ok());
        assert!(endpoint("", &opts).unwrap_err().contains("no grpc_addr"));
        assert!(endpoint("bad host:1", &opts)
            .unwrap_err()
            .contains("invalid gRPC address"));
    }
}
