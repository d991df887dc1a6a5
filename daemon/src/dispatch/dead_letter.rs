//! Entries that cannot be run go to the dead-letter stream with the reason.

use super::*;

impl Dispatcher {
    /// Moves an entry to the dead-letter stream with the reason and its
    /// original fields, tells its session (when known), and acks it.
    pub(super) async fn dead_letter(
        &self,
        delivery: &Delivery,
        agent_type: &str,
        reason: String,
        session: Option<String>,
    ) {
        let mut fields: Vec<(String, Vec<u8>)> = vec![
            ("reason".into(), reason.clone().into_bytes()),
            ("source_stream".into(), delivery.stream.as_bytes().to_vec()),
            ("source_id".into(), delivery.id.clone().into_bytes()),
            (
                "consumer_group".into(),
                self.settings.group.as_bytes().to_vec(),
            ),
            (
                "worker_id".into(),
                self.settings.worker_id.as_bytes().to_vec(),
            ),
            (
                "delivery_count".into(),
                delivery.deliveries.to_string().into_bytes(),
            ),
            (
                "dead_lettered_at".into(),
                wire::now_ms().to_string().into_bytes(),
            ),
        ];
        for (name, value) in &delivery.fields {
            let name = if fields.iter().any(|(n, _)| n == name) {
                format!("original_{name}")
            } else {
                name.clone()
            };
            fields.push((name, value.clone()));
        }
        let mut writes = vec![Write::Fields {
            stream: self.settings.dead_letter_stream.clone(),
            fields,
            maxlen: self.settings.dead_letter_maxlen,
        }];
        if let Some(session_id) = &session {
            let (trace_id, message_id) = delivery
                .field("data")
                .and_then(|d| serde_json::from_slice::<serde_json::Value>(d).ok())
                .map(|v| {
                    let h = &v["header"];
                    (
                        h["trace_id"].as_str().unwrap_or_default().to_owned(),
                        h["message_id"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .unwrap_or_default();
            let origin = EventOrigin {
                trace_id,
                session_id: session_id.clone(),
                agent_id: agent_type.to_owned(),
                message_id,
                plugin: None,
            };
            writes.push(Write::Event {
                stream: Arc::from(keys::session_data_stream(session_id)),
                data: wire::state_event(&origin, &format!("FAILED: {reason}"), None),
                refresh_ttl: true,
            });
        }
        writes.push(self.ack(delivery));
        let lane = session.as_deref().unwrap_or(&delivery.id);
        if self.writer.commit(lane, writes).await.is_err() {
            tracing::warn!(stream = %delivery.stream, entry_id = %delivery.id, %reason, "writer stopped; entry not dead-lettered, left pending");
        } else {
            self.services.metrics.emit(DeadLettered {
                stream: &delivery.stream,
                entry_id: &delivery.id,
                deliveries: delivery.deliveries,
                reason: &reason,
            });
        }
    }
}
