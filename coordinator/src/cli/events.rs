//! `flotilla events`: the event stream as readable lines or JSON lines.

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use flotilla_protocol::{subject, Event, EventBody, HostName, Severity};
use futures::StreamExt;

use super::{output, Global};
use crate::error::{request_err, CliError};

pub(super) async fn run(
    g: &Global,
    follow: bool,
    json: bool,
    kind: Option<&str>,
    host: Option<&HostName>,
) -> Result<(), CliError> {
    let nats = g.connect().await?;
    let stream = match nats.js.get_stream(subject::EVENT_STREAM).await {
        Ok(s) => s,
        Err(_) if !follow => {
            if !json {
                outln!("no events yet: no agent has connected to this NATS server");
            }
            return Ok(());
        }
        Err(e) => return Err(request_err("open event stream")(e)),
    };
    let mut consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: subject::event_filter(kind, host),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(request_err("read event stream"))?;
    let pending = consumer
        .info()
        .await
        .map_err(request_err("read event stream"))?
        .num_pending;
    if pending == 0 && !follow {
        return Ok(());
    }
    let mut messages = consumer
        .messages()
        .await
        .map_err(request_err("read event stream"))?;
    while let Some(msg) = messages.next().await {
        let msg = msg.map_err(request_err("read event stream"))?;
        let caught_up = msg.info().map(|i| i.pending == 0).unwrap_or(false);
        match Event::decode_on(&msg.subject, &msg.payload) {
            Ok(ev) if json => outln!("{}", serde_json::to_string(&ev).unwrap_or_default()),
            Ok(ev) => outln!("{}", line(&ev, g.utc)),
            Err(e) if json => outln!(
                "{}",
                serde_json::json!({"error": format!("undecodable event: {e}"), "subject": msg.subject.as_str()})
            ),
            Err(e) => outln!("(undecodable event on {}: {e})", msg.subject),
        }
        if caught_up && !follow {
            break;
        }
    }
    Ok(())
}

/// One event as a human-readable line, its time in local time (UTC with
/// `utc`).
fn line(ev: &Event, utc: bool) -> String {
    let sev = match ev.severity {
        Severity::Info => "info",
        Severity::Warning => "WARN",
        Severity::Error => "ERROR",
    };
    let extra = match &ev.body {
        EventBody::TaskRejected { reason, .. } => format!(" [{reason}]"),
        _ => String::new(),
    };
    format!(
        "{}  {:<5}  {:<22}  {:<12}  {}{}",
        output::when(ev.time, utc),
        sev,
        ev.body.kind(),
        ev.host.as_str(),
        ev.message,
        extra
    )
}
