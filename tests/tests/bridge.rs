//! The bridge for front ends against a real Redis and daemon: messages in
//! over HTTP, events out over SSE (resumable) and WebSocket, ask-user
//! answers and cancels, tokens and tenants, JSON errors, shutdown.

use anyhow::{Context as _, Result, bail, ensure};
use byclaw_bridge::BridgeToken;
use futures::{SinkExt as _, StreamExt as _};
use integration_tests::*;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(30);

/// A test bed whose daemon also runs the bridge; its base URL.
async fn bed_with_bridge(
    plugins: &[&str],
    ready: &str,
    tokens: Vec<BridgeToken>,
) -> Result<(TestBed, String)> {
    bed_with_bridge_config(plugins, ready, |bridge| bridge.tokens = tokens).await
}

/// The same, with more of `[bridge]` set.
async fn bed_with_bridge_config(
    plugins: &[&str],
    ready: &str,
    tweak: impl FnOnce(&mut byclaw_bridge::BridgeConfig),
) -> Result<(TestBed, String)> {
    let port = free_port();
    let bed = TestBed::start(plugins, ready, |config| {
        config.bridge.enabled = true;
        config.bridge.listen = ([127, 0, 0, 1], port).into();
        config.bridge.keep_alive_s = 1;
        tweak(&mut config.bridge);
    })
    .await?;
    Ok((bed, format!("http://127.0.0.1:{port}")))
}

fn token(token: &str, tenant: &str, prefix: &str) -> BridgeToken {
    BridgeToken {
        token: token.into(),
        tenant: tenant.into(),
        session_prefix: prefix.into(),
        max_streams: None,
        messages_per_s: None,
    }
}

/// One server-sent event.
#[derive(Debug, Clone, PartialEq)]
struct SseEvent {
    id: String,
    data: Value,
}

/// Reads events from an SSE response.
struct SseReader {
    response: reqwest::Response,
    buffer: String,
}

impl SseReader {
    async fn open(request: reqwest::RequestBuilder) -> Result<Self> {
        let response = request.send().await?;
        ensure!(
            response.status() == 200,
            "SSE answered {}: {}",
            response.status(),
            response.text().await.unwrap_or_default()
        );
        let kind = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        ensure!(kind.starts_with("text/event-stream"), "{kind}");
        Ok(SseReader {
            response,
            buffer: String::new(),
        })
    }

    /// The next event (comments skipped); `None` when the server ended the
    /// stream.
    async fn next(&mut self) -> Result<Option<SseEvent>> {
        let deadline = Instant::now() + WAIT;
        loop {
            while let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut id = None;
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(value) = line.strip_prefix("id:") {
                        id = Some(value.trim().to_owned());
                    } else if let Some(value) = line.strip_prefix("data:") {
                        data.push_str(value.trim_start());
                    }
                }
                if let Some(id) = id {
                    return Ok(Some(SseEvent {
                        id,
                        data: serde_json::from_str(&data)?,
                    }));
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let chunk = tokio::time::timeout(left, self.response.chunk())
                .await
                .context("no SSE event in time")??;
            match chunk {
                Some(bytes) => self.buffer.push_str(std::str::from_utf8(&bytes)?),
                None => return Ok(None),
            }
        }
    }

    /// Events until the server cuts the stream (an error) or ends it.
    async fn until_cut(&mut self) -> Vec<SseEvent> {
        let mut events = Vec::new();
        while let Ok(Some(event)) = self.next().await {
            events.push(event);
        }
        events
    }

    /// Events until the task `message_id` reaches a terminal state.
    async fn until_terminal(&mut self, message_id: &str) -> Result<Vec<SseEvent>> {
        let mut events = Vec::new();
        while let Some(event) = self.next().await? {
            let done = event.data["message_id"] == message_id && is_terminal_state(&event.data);
            events.push(event);
            if done {
                return Ok(events);
            }
        }
        bail!("the stream ended before {message_id} did: {events:#?}")
    }
}

/// The text the task streamed (its 1002 chunks, in order).
fn reply_text(events: &[Value], message_id: &str) -> String {
    events
        .iter()
        .filter(|e| e["message_id"] == message_id && e["data"]["contentType"] == "1002")
        .map(delta_content)
        .collect()
}

/// Entry ids of a session's data stream.
async fn stream_ids(bed: &TestBed, session: &str) -> Result<Vec<String>> {
    let mut conn = bed.conn.clone();
    let stream = format!("byai_gateway:session:{session}:data_stream");
    Ok(xrange(&mut conn, &stream)
        .await?
        .into_iter()
        .map(|e| e.id)
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_posted_message_streams_back_over_sse_and_shutdown_ends_the_stream() -> Result<()> {
    let (mut bed, base) = bed_with_bridge(&["echo"], "echo", Vec::new()).await?;
    let http = reqwest::Client::new();
    let session = format!("sess-{}", suffix());

    // From now on: opened before the message, so it sees all of it.
    let mut sse = SseReader::open(http.get(format!("{base}/v1/sessions/{session}/events"))).await?;
    let response = http
        .post(format!("{base}/v1/sessions/{session}/messages"))
        .json(&json!({"agent_type": "echo", "content": "hello over the bridge"}))
        .send()
        .await?;
    assert_eq!(response.status(), 202);
    let sent: Value = response.json().await?;
    let message_id = sent["message_id"].as_str().context("message_id")?;
    assert!(message_id.starts_with("msg-"), "{sent}");
    assert_eq!(sent["trace_id"].as_str().map(str::len), Some(32), "{sent}");
    assert!(sent["entry_id"].as_str().is_some(), "{sent}");

    let events = sse.until_terminal(message_id).await?;
    let data: Vec<Value> = events.iter().map(|e| e.data.clone()).collect();
    assert_eq!(reply_text(&data, message_id), "hello over the bridge");
    assert_eq!(
        delta_content(&events.last().unwrap().data),
        "COMPLETED",
        "{data:#?}"
    );
    // Every event carries its entry id, as the data stream holds them.
    let ids: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
    assert_eq!(ids, stream_ids(&bed, &session).await?);
    assert_eq!(data, all_events(&mut bed.conn.clone(), &session).await?);

    // The agents the page can offer.
    let agents: Value = http
        .get(format!("{base}/v1/agents"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(
        agents["agents"],
        json!([{"agent_type": "echo", "workers": 1}])
    );

    // Shutdown ends an open stream (after its keep-alives) and the daemon
    // returns promptly.
    let stopping = Instant::now();
    bed.daemon.stop().await?;
    assert_eq!(sse.next().await?, None, "the stream ends at shutdown");
    assert!(
        stopping.elapsed() < Duration::from_secs(10),
        "{:?}",
        stopping.elapsed()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_resumes_after_last_event_id_without_loss_or_duplicates() -> Result<()> {
    let (mut bed, base) = bed_with_bridge(&["echo"], "echo", Vec::new()).await?;
    let http = reqwest::Client::new();
    let session = format!("sess-{}", suffix());
    let client = byclaw_client::Client::connect(&bed.redis.url()).await?;

    // Three tasks' worth of events, the last still to come while we read.
    let first = client
        .send("echo", &session, "one two three", json!({}))
        .await?;
    task_events(&mut bed.conn, &session, &first.message_id, WAIT).await?;
    let url = format!("{base}/v1/sessions/{session}/events");
    let mut sse = SseReader::open(http.get(format!("{url}?after=0"))).await?;
    let mut seen = Vec::new();
    for _ in 0..2 {
        seen.push(sse.next().await?.context("an event")?);
    }
    drop(sse);
    let second = client
        .send("echo", &session, "four five six", json!({}))
        .await?;
    task_events(&mut bed.conn, &session, &second.message_id, WAIT).await?;

    // The browser reconnects with the last id it saw.
    let last = seen.last().unwrap().id.clone();
    let mut sse = SseReader::open(http.get(&url).header("Last-Event-ID", &last)).await?;
    let third = client
        .send("echo", &session, "seven eight", json!({}))
        .await?;
    seen.extend(sse.until_terminal(&third.message_id).await?);

    let ids: Vec<String> = seen.iter().map(|e| e.id.clone()).collect();
    assert_eq!(
        ids,
        stream_ids(&bed, &session).await?,
        "none lost, none twice"
    );
    let data: Vec<Value> = seen.into_iter().map(|e| e.data).collect();
    assert_eq!(reply_text(&data, &second.message_id), "four five six");
    assert_eq!(reply_text(&data, &third.message_id), "seven eight");

    // `?after=` does the same; a bad position is refused.
    let mut sse = SseReader::open(http.get(format!("{url}?after={last}"))).await?;
    let next = sse.next().await?.context("an event")?;
    assert_eq!(next.id, ids[2]);
    let bad = http.get(format!("{url}?after=yesterday")).send().await?;
    assert_eq!(bad.status(), 400);
    let error: Value = bad.json().await?;
    assert!(
        error["error"].as_str().unwrap().contains("entry id"),
        "{error}"
    );
    bed.daemon.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_sse_client_is_dropped_and_resumes_without_loss() -> Result<()> {
    let (mut bed, base) = bed_with_bridge_config(&["echo"], "echo", |bridge| {
        bridge.buffer = 4;
        bridge.stall_timeout_ms = 1000;
    })
    .await?;
    let http = reqwest::Client::new();
    let session = format!("sess-{}", suffix());
    let url = format!("{base}/v1/sessions/{session}/events");
    let mut slow = SseReader::open(http.get(&url)).await?;

    // ~18 MB of events while the client reads nothing: more than the
    // socket buffers hold, so its queue of 4 fills, stays full for a
    // second, and it is dropped.
    let client = byclaw_client::Client::connect(&bed.redis.url()).await?;
    const TASKS: usize = 60;
    for i in 0..TASKS {
        let text = format!("{i:04}{}", "x".repeat(300_000));
        client.send("echo", &session, &text, json!({})).await?;
    }
    let ctrl = "byai_gateway:ctrl:capability:echo";
    wait_for("every echo task done (acked and deleted)", WAIT * 4, || {
        let mut conn = bed.conn.clone();
        async move {
            let len: u64 = redis::cmd("XLEN").arg(ctrl).query_async(&mut conn).await?;
            Ok((len == 0).then_some(()))
        }
    })
    .await?;
    // Its reader gives up once the queue has been full for a second: its
    // Redis connection (the only one doing XREAD here) goes away.
    wait_for("the slow client's reader to give up", WAIT, || {
        let mut conn = bed.conn.clone();
        async move {
            let clients: String = redis::cmd("CLIENT")
                .arg("LIST")
                .query_async(&mut conn)
                .await?;
            Ok((!clients.contains("cmd=xread ")).then_some(()))
        }
    })
    .await?;
    let ids = stream_ids(&bed, &session).await?;
    let mut seen = slow.until_cut().await;
    assert!(
        seen.len() < ids.len(),
        "the slow client got all {} events: it was never dropped",
        ids.len()
    );

    // It reconnects after the last event it got and misses nothing; a
    // client that reads does catch up on the backlog.
    let last = seen.last().map_or_else(|| "0".to_owned(), |e| e.id.clone());
    let mut resumed = SseReader::open(http.get(&url).header("Last-Event-ID", last)).await?;
    while seen.len() < ids.len() {
        seen.push(resumed.next().await?.context("the rest of the events")?);
    }
    let got: Vec<String> = seen.iter().map(|e| e.id.clone()).collect();
    assert_eq!(got, ids, "none lost, none twice");
    bed.daemon.stop().await?;
    Ok(())
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws_send(socket: &mut Socket, frame: Value) -> Result<()> {
    socket.send(Message::text(frame.to_string())).await?;
    Ok(())
}

/// The next JSON frame (pings skipped).
async fn ws_next(socket: &mut Socket) -> Result<Value> {
    loop {
        let message = tokio::time::timeout(WAIT, socket.next())
            .await
            .context("no WebSocket frame in time")?
            .context("the socket closed")??;
        match message {
            Message::Text(text) => return Ok(serde_json::from_str(text.as_str())?),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => bail!("unexpected frame {other:?}"),
        }
    }
}

/// Frames until one matches; the events seen on the way are kept.
async fn ws_until(
    socket: &mut Socket,
    events: &mut Vec<Value>,
    what: &str,
    mut done: impl FnMut(&Value) -> bool,
) -> Result<Value> {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        let frame = ws_next(socket).await?;
        if frame["type"] == "event" {
            assert!(frame["id"].as_str().is_some(), "{frame}");
            events.push(frame["event"].clone());
        }
        if done(&frame) {
            return Ok(frame);
        }
    }
    bail!("no {what} within {WAIT:?}")
}

fn is_state_of(frame: &Value, message_id: &str, state: &str) -> bool {
    frame["type"] == "event"
        && frame["event"]["message_id"] == message_id
        && frame["event"]["data"]["contentType"] == "3003"
        && delta_content(&frame["event"]) == state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_answers_an_ask_user_prompt_and_cancels_a_task() -> Result<()> {
    let (mut bed, base) = bed_with_bridge(
        &["planner", "translator", "researcher", "tools", "faults"],
        "planner",
        Vec::new(),
    )
    .await?;
    let session = format!("sess-{}", suffix());
    let url = format!("{}/v1/sessions/{session}/ws", base.replace("http", "ws"));
    let (mut socket, _) = tokio_tungstenite::connect_async(&url).await?;
    let mut events = Vec::new();

    ws_send(
        &mut socket,
        json!({"type": "message", "request_id": 1, "agent_type": "planner",
               "content": "good morning world", "extra_payload": {"ask_timeout_ms": 20000}}),
    )
    .await?;
    let ack = ws_until(&mut socket, &mut events, "the ack", |f| f["type"] == "ack").await?;
    assert_eq!(ack["for"], "message", "{ack}");
    assert_eq!(ack["request_id"], 1, "{ack}");
    let task = ack["message_id"].as_str().context("message_id")?.to_owned();

    // The ask-user form, then the task waits for the user.
    let form = ws_until(&mut socket, &mut events, "the ask-user form", |f| {
        f["type"] == "event" && f["event"]["data"]["contentType"] == "3013"
    })
    .await?;
    let prompt = byclaw_client::SessionEvent {
        entry_id: form["id"].as_str().unwrap_or_default().to_owned(),
        message: form["event"].clone(),
    }
    .ask_user_prompt()
    .context("a prompt")?;
    assert!(prompt.contains("focus on"), "{prompt}");
    ws_until(&mut socket, &mut events, "WAITING_USER", |f| {
        is_state_of(f, &task, "WAITING_USER")
    })
    .await?;
    ws_send(
        &mut socket,
        json!({"type": "resume", "request_id": "r", "agent_type": "planner",
               "message_id": task, "content": "risks"}),
    )
    .await?;
    let ack = ws_until(&mut socket, &mut events, "the resume ack", |f| {
        f["type"] == "ack"
    })
    .await?;
    assert_eq!(ack["request_id"], "r", "{ack}");
    let done = ws_until(&mut socket, &mut events, "COMPLETED", |f| {
        is_state_of(f, &task, "COMPLETED")
    })
    .await?;
    assert_eq!(
        done["event"]["metadata"]["result"]["focus"], "risks",
        "{done}"
    );
    let text = reply_text(&events, &task);
    assert!(text.contains("Focus: risks."), "{text}");

    // A long task, cancelled over the socket.
    ws_send(
        &mut socket,
        json!({"type": "message", "agent_type": "slow", "content": "20000"}),
    )
    .await?;
    let ack = ws_until(&mut socket, &mut events, "the ack", |f| f["type"] == "ack").await?;
    let slow = ack["message_id"].as_str().context("message_id")?.to_owned();
    ws_until(&mut socket, &mut events, "the slow task running", |f| {
        f["type"] == "event" && f["event"]["message_id"] == slow.as_str()
    })
    .await?;
    ws_send(&mut socket, json!({"type": "cancel", "message_id": slow})).await?;
    let ack = ws_until(&mut socket, &mut events, "the cancel ack", |f| {
        f["type"] == "ack"
    })
    .await?;
    assert_eq!(ack["for"], "cancel", "{ack}");
    assert_eq!(ack["status"], "CANCEL_REQUESTED", "{ack}");
    ws_until(&mut socket, &mut events, "CANCELLED", |f| {
        is_state_of(f, &slow, "CANCELLED")
    })
    .await?;
    // Cancelling it again: the reference's answer, not an error.
    ws_send(&mut socket, json!({"type": "cancel", "message_id": slow})).await?;
    let ack = ws_until(&mut socket, &mut events, "the second ack", |f| {
        f["type"] == "ack"
    })
    .await?;
    assert_eq!(ack["status"], "ALREADY_FINISHED", "{ack}");

    // Mistakes get error frames and the socket stays open.
    for (frame, needle) in [
        (json!({"type": "shout"}), "unknown frame type"),
        (json!({"type": "message", "agent_type": "echo"}), "content"),
        (
            json!({"type": "resume", "agent_type": "planner", "content": "x"}),
            "message_id",
        ),
        (
            json!({"type": "message", "agent_type": "nobody", "content": "x"}),
            "no worker",
        ),
    ] {
        ws_send(&mut socket, frame.clone()).await?;
        let error = ws_until(&mut socket, &mut events, "an error frame", |f| {
            f["type"] == "error"
        })
        .await?;
        assert!(
            error["error"].as_str().unwrap().contains(needle),
            "{frame} → {error}"
        );
    }
    socket.send(Message::text("not json")).await?;
    let error = ws_until(&mut socket, &mut events, "an error frame", |f| {
        f["type"] == "error"
    })
    .await?;
    assert_eq!(error["status"], 400, "{error}");

    // Every event of the session came over the socket, in order.
    let all = all_events(&mut bed.conn.clone(), &session).await?;
    assert_eq!(events, all[..events.len()], "in stream order, none skipped");

    // Shutdown closes the socket.
    bed.daemon.stop().await?;
    let closed = tokio::time::timeout(WAIT, async {
        while let Some(Ok(message)) = socket.next().await {
            if let Message::Close(frame) = message {
                return frame.map(|f| u16::from(f.code));
            }
        }
        None
    })
    .await?;
    assert_eq!(closed, Some(1001));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_required_and_keep_tenants_apart() -> Result<()> {
    const A: &str = "tenant-a-token-0123456789";
    const B: &str = "tenant-b-token-0123456789";
    let (mut bed, base) = bed_with_bridge(
        &["echo"],
        "echo",
        vec![token(A, "a", "a-"), token(B, "b", "b-")],
    )
    .await?;
    let http = reqwest::Client::new();
    let message = json!({"agent_type": "echo", "content": "secret of b"});

    for request in [
        http.get(format!("{base}/v1/agents")),
        http.get(format!("{base}/v1/agents"))
            .bearer_auth("wrong-token-0123456789"),
        http.get(format!("{base}/v1/agents?token=wrong")),
        http.post(format!("{base}/v1/sessions/b-1/messages"))
            .json(&message),
        http.get(format!("{base}/v1/sessions/b-1/events")),
        http.get(format!("{base}/v1/agents"))
            .header("Authorization", format!("Basic {B}")),
    ] {
        let response = request.send().await?;
        assert_eq!(response.status(), 401);
        assert_eq!(
            response
                .headers()
                .get("www-authenticate")
                .map(|v| v.to_str().unwrap()),
            Some("Bearer")
        );
        let body: Value = response.json().await?;
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{body}"
        );
    }

    // B writes to its session; A can neither read nor write it.
    let session_b = format!("b-{}", suffix());
    let sent: Value = http
        .post(format!("{base}/v1/sessions/{session_b}/messages"))
        .bearer_auth(B)
        .json(&message)
        .send()
        .await?
        .json()
        .await?;
    let message_id = sent["message_id"].as_str().context("sent")?;
    task_events(&mut bed.conn, &session_b, message_id, WAIT).await?;
    // Its commands carry its tenant: one to an agent type that only a
    // registry entry serves stays on the stream to be looked at.
    let _: () = redis::cmd("SADD")
        .arg("byai_gateway:registry:capability:workers:idle-agent")
        .arg("nobody-runs-this")
        .query_async(&mut bed.conn)
        .await?;
    let response = http
        .post(format!("{base}/v1/sessions/{session_b}/messages"))
        .bearer_auth(B)
        .json(&json!({"agent_type": "idle-agent", "content": "hello"}))
        .send()
        .await?;
    assert_eq!(response.status(), 202);
    let queued = xrange(&mut bed.conn, "byai_gateway:ctrl:capability:idle-agent").await?;
    let data: String = queued[0].get("data").context("a data field")?;
    let command: Value = serde_json::from_str(&data)?;
    assert_eq!(command["header"]["tenant_id"], "b", "{command}");
    assert_eq!(command["header"]["session_id"], session_b.as_str());
    for request in [
        http.get(format!("{base}/v1/sessions/{session_b}/events?after=0"))
            .bearer_auth(A),
        http.get(format!(
            "{base}/v1/sessions/{session_b}/events?after=0&token={A}"
        )),
        http.post(format!("{base}/v1/sessions/{session_b}/messages"))
            .bearer_auth(A)
            .json(&message),
        http.post(format!("{base}/v1/sessions/{session_b}/cancel"))
            .bearer_auth(A)
            .json(&json!({"message_id": message_id})),
    ] {
        let response = request.send().await?;
        assert_eq!(response.status(), 403);
        let body: Value = response.json().await?;
        assert!(
            body["error"].as_str().unwrap().contains("tenant a"),
            "{body}"
        );
    }
    let ws = format!(
        "{}/v1/sessions/{session_b}/ws?token={A}",
        base.replace("http", "ws")
    );
    match tokio_tungstenite::connect_async(&ws).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403)
        }
        other => bail!("tenant a opened tenant b's socket: {other:?}"),
    }

    // B reads its own, by header or by query.
    let mut sse = SseReader::open(http.get(format!(
        "{base}/v1/sessions/{session_b}/events?after=0&token={B}"
    )))
    .await?;
    let events: Vec<Value> = sse
        .until_terminal(message_id)
        .await?
        .into_iter()
        .map(|e| e.data)
        .collect();
    assert_eq!(reply_text(&events, message_id), "secret of b");
    let (mut socket, _) = tokio_tungstenite::connect_async(format!(
        "{}/v1/sessions/{session_b}/ws?after=0&token={B}",
        base.replace("http", "ws")
    ))
    .await?;
    let first = ws_next(&mut socket).await?;
    assert_eq!(first["type"], "event");
    let agents: Value = http
        .get(format!("{base}/v1/agents"))
        .bearer_auth(A)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(agents["tenant"], "a");
    assert_eq!(agents["session_prefix"], "a-");
    drop(socket);
    bed.daemon.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_4xx_with_a_json_error() -> Result<()> {
    // The bridge on its own (as `gatewayd bridge` runs it), beside a daemon.
    let mut bed = TestBed::start(&["echo"], "echo", |_| {}).await?;
    let config = byclaw_bridge::BridgeConfig {
        listen: ([127, 0, 0, 1], 0).into(),
        ..Default::default()
    };
    let bridge = byclaw_bridge::Bridge::bind(&config, &bed.redis.url()).await?;
    let base = format!("http://{}", bridge.local_addr()?);
    let stop = tokio_util::sync::CancellationToken::new();
    let serving = tokio::spawn(bridge.serve(stop.clone()));
    let http = reqwest::Client::new();
    let messages = format!("{base}/v1/sessions/sess-1/messages");

    let cases = [
        (
            http.post(&messages)
                .header("content-type", "application/json")
                .body("{oops"),
            400,
            "JSON",
        ),
        (
            http.post(&messages)
                .body(r#"{"agent_type":"echo","content":"x"}"#),
            415,
            "Content-Type",
        ),
        (
            http.post(&messages)
                .json(&json!({"agent_type": "echo", "content": "x", "colour": 1})),
            422,
            "colour",
        ),
        (
            http.post(&messages)
                .json(&json!({"agent_type": "echo", "content": ""})),
            400,
            "content",
        ),
        (
            http.post(&messages)
                .json(&json!({"agent_type": "echo", "content": "x", "action_type": "SHOUT"})),
            422,
            "action_type",
        ),
        (
            http.post(&messages)
                .json(&json!({"agent_type": "echo", "content": "x", "action_type": "RESUME"})),
            400,
            "message_id",
        ),
        (
            http.post(&messages)
                .json(&json!({"agent_type": "echo", "content": "x", "extra_payload": [1]})),
            400,
            "extra_payload",
        ),
        (
            http.post(&messages)
                .json(&json!({"agent_type": "no-such-agent", "content": "x"})),
            404,
            "no worker",
        ),
        (
            http.post(&messages)
                .json(&json!({"agent_type": "two words", "content": "x"})),
            400,
            "agent_type",
        ),
        (
            http.post(format!("{base}/v1/sessions/a%20b/messages"))
                .json(&json!({"agent_type": "echo", "content": "x"})),
            400,
            "session id",
        ),
        (
            http.post(format!("{base}/v1/sessions/sess-1/cancel"))
                .json(&json!({})),
            422,
            "message_id",
        ),
        (
            http.get(format!("{base}/v1/sessions/sess-1/events"))
                .header("Last-Event-ID", "nope"),
            400,
            "entry id",
        ),
        (
            http.get(format!("{base}/v1/sessions/sess-1/ws")),
            400,
            "upgrade",
        ),
        (
            http.post(&messages).json(&json!({
                "agent_type": "echo", "content": "x", "action_type": "RESUME",
                "message_id": "not-a-task-of-sess-1",
            })),
            404,
            "has no task",
        ),
        (http.get(format!("{base}/v2/whatever")), 404, "/v2/whatever"),
    ];
    for (request, status, needle) in cases {
        let response = request.send().await?;
        let got = response.status().as_u16();
        let body: Value = response.json().await.context("a JSON body")?;
        let error = body["error"].as_str().unwrap_or_default();
        assert_eq!(got, status, "{body}");
        assert!(error.contains(needle), "{needle:?} not in {body}");
    }
    // The page is there and names the API it uses.
    let page = http.get(&base).send().await?;
    assert_eq!(page.status(), 200);
    assert!(page.text().await?.contains("/v1/agents"));

    stop.cancel();
    tokio::time::timeout(WAIT, serving).await???;
    bed.daemon.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_pages_rebinding_names_and_foreign_answers_are_refused() -> Result<()> {
    const ACME: &str = "acme-token-0123456789abcdef";
    const GLOBEX: &str = "globex-token-0123456789abcdef";
    let (mut bed, base) = bed_with_bridge_config(&["echo", "faults"], "ask-twice", |bridge| {
        bridge.tokens = vec![
            token(ACME, "acme", "acme-"),
            token(GLOBEX, "globex", "globex-"),
        ];
        bridge.allowed_origins = vec!["https://app.example.com".into()];
    })
    .await?;
    let http = reqwest::Client::new();
    let session = format!("acme-{}", suffix());
    let messages = format!("{base}/v1/sessions/{session}/messages");
    let hello = json!({"agent_type": "echo", "content": "hello"});

    // A DNS-rebinding page: its own name in Host, resolving to loopback.
    let response = http
        .get(format!("{base}/v1/agents"))
        .bearer_auth(ACME)
        .header("Host", "evil.example")
        .send()
        .await?;
    assert_eq!(response.status(), 403);
    let body: Value = response.json().await?;
    assert!(
        body["error"].as_str().unwrap().contains("evil.example"),
        "{body}"
    );
    // Another page posting with the user's token.
    let response = http
        .post(&messages)
        .bearer_auth(ACME)
        .header("Origin", "http://evil.example")
        .json(&hello)
        .send()
        .await?;
    assert_eq!(response.status(), 403);
    // A listed origin: let in, with CORS answers; its preflight too.
    let response = http
        .post(&messages)
        .bearer_auth(ACME)
        .header("Origin", "https://app.example.com")
        .json(&hello)
        .send()
        .await?;
    assert_eq!(response.status(), 202);
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    let preflight = |origin: &'static str| {
        http.request(reqwest::Method::OPTIONS, &messages)
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "POST")
            .header(
                "Access-Control-Request-Headers",
                "authorization, content-type",
            )
            .send()
    };
    let allowed = preflight("https://app.example.com").await?;
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    let refused = preflight("http://evil.example").await?;
    assert!(
        refused
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
    // A token in the URL of anything but an event stream.
    let response = http
        .get(format!("{base}/v1/agents?token={ACME}"))
        .send()
        .await?;
    assert_eq!(response.status(), 401);

    // The WebSocket: another page's handshake is refused, the bridge's own
    // page (same origin) gets through.
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    let ws_url = format!(
        "{}/v1/sessions/{session}/ws?token={ACME}",
        base.replace("http", "ws")
    );
    let mut evil = ws_url.as_str().into_client_request()?;
    evil.headers_mut()
        .insert("Origin", "http://evil.example".parse()?);
    match tokio_tungstenite::connect_async(evil).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403)
        }
        other => bail!("another page opened the socket: {other:?}"),
    }
    let mut own = ws_url.as_str().into_client_request()?;
    own.headers_mut().insert("Origin", base.parse()?);
    let (socket, _) = tokio_tungstenite::connect_async(own).await?;
    drop(socket);

    // Globex answers acme's waiting task from its own session: the bridge
    // finds no such task there; sent to Redis directly, the daemon refuses it.
    let sent: Value = http
        .post(&messages)
        .bearer_auth(ACME)
        .json(&json!({"agent_type": "ask-twice", "content": "go"}))
        .send()
        .await?
        .json()
        .await?;
    let task = sent["message_id"].as_str().context("sent")?.to_owned();
    prompt_event(&bed.conn, &session, &task, 1, WAIT).await?;
    let theirs = format!("globex-{}", suffix());
    let answer = json!({
        "agent_type": "ask-twice", "content": "globex says",
        "action_type": "RESUME", "message_id": task,
    });
    let response = http
        .post(format!("{base}/v1/sessions/{theirs}/messages"))
        .bearer_auth(GLOBEX)
        .json(&answer)
        .send()
        .await?;
    assert_eq!(response.status(), 404);
    let forged = byclaw_client::Client::connect(&bed.redis.url())
        .await?
        .for_tenant("globex");
    forged
        .answer_user("ask-twice", &theirs, &task, "globex says")
        .await?;
    wait_for("the forged answer refused", WAIT, || {
        let refused = bed.daemon.stats.metrics.foreign_replies_total();
        async move { Ok((refused >= 1).then_some(())) }
    })
    .await?;
    // Acme's own answers still reach it.
    for text in ["one", "two"] {
        let mut answer = answer.clone();
        answer["content"] = json!(text);
        let response = http
            .post(&messages)
            .bearer_auth(ACME)
            .json(&answer)
            .send()
            .await?;
        assert_eq!(response.status(), 202);
        if text == "one" {
            prompt_event(&bed.conn, &session, &task, 2, WAIT).await?;
        }
    }
    let events = task_events(&mut bed.conn, &session, &task, WAIT).await?;
    assert_eq!(
        task_result(&events).unwrap(),
        &json!({ "first": "one", "second": "two" })
    );
    bed.daemon.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_past_its_limits_gets_429_and_others_go_on() -> Result<()> {
    const GREEDY: &str = "greedy-token-0123456789abcdef";
    const OTHER: &str = "other-token-0123456789abcdef";
    let (mut bed, base) = bed_with_bridge_config(&["echo"], "echo", |bridge| {
        let mut greedy = token(GREEDY, "greedy", "greedy-");
        greedy.max_streams = Some(1);
        greedy.messages_per_s = Some(1);
        bridge.tokens = vec![greedy, token(OTHER, "other", "other-")];
    })
    .await?;
    let http = reqwest::Client::new();
    let events = |tenant: &str, token: &str| {
        http.get(format!("{base}/v1/sessions/{tenant}-{}/events", suffix()))
            .bearer_auth(token.to_owned())
    };
    let held = SseReader::open(events("greedy", GREEDY)).await?;
    let refused = events("greedy", GREEDY).send().await?;
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "1");
    let body: Value = refused.json().await?;
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("tenant greedy has 1 event streams open"),
        "{body}"
    );
    // Another tenant's streams are its own.
    let _other = SseReader::open(events("other", OTHER)).await?;
    // Closing the stream gives it back.
    drop(held);
    wait_for("the stream given back", WAIT, || {
        let request = events("greedy", GREEDY);
        async move {
            let response = request.send().await?;
            Ok((response.status() == 200).then_some(()))
        }
    })
    .await?;

    // One message a second: of five sent at once, the first goes through
    // and the rest are refused with a Retry-After (one more per second
    // the five took, on a slow machine).
    let session = format!("greedy-{}", suffix());
    let started = Instant::now();
    let mut accepted = 0;
    for _ in 0..5 {
        let response = http
            .post(format!("{base}/v1/sessions/{session}/messages"))
            .bearer_auth(GREEDY)
            .json(&json!({"agent_type": "echo", "content": "hi"}))
            .send()
            .await?;
        match response.status().as_u16() {
            202 => accepted += 1,
            429 => {
                let retry: u64 = response.headers()["retry-after"].to_str()?.parse()?;
                assert!(retry >= 1);
            }
            other => bail!("unexpected {other}"),
        }
    }
    let took = started.elapsed().as_secs_f64();
    assert!(accepted >= 1, "the first message is within the rate");
    assert!(
        accepted as f64 <= 1.0 + took,
        "{accepted} of 5 accepted in {took:.2} s at one a second"
    );
    let other = http
        .post(format!("{base}/v1/sessions/other-{}/messages", suffix()))
        .bearer_auth(OTHER)
        .json(&json!({"agent_type": "echo", "content": "hi"}))
        .send()
        .await?;
    assert_eq!(other.status(), 202);
    bed.daemon.stop().await?;
    Ok(())
}
