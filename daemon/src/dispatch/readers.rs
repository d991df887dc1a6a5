//! The loops that feed dispatch: new entries of the capability streams,
//! entries other consumers abandoned, and this worker's control stream.

use super::*;

impl Dispatcher {
    /// Reads new entries of the capability streams while permits are free,
    /// until `stop` fires. The streams are those of the plugin table at each
    /// read, so plugins that come and go are followed from the next fetch.
    ///
    /// Every read covers every servable stream, so an idle stream never
    /// delays a busy one: `COUNT` is the permits held, and what comes back
    /// beyond them (several streams busy at once) waits in the backlog and
    /// starts first as permits free. A read in flight is finished, not abandoned, and the
    /// backlog is started at shutdown, so no entry is delivered to this
    /// consumer and then forgotten.
    pub async fn consume(
        self: Arc<Self>,
        mut conn: Connection,
        permits: Arc<Semaphore>,
        stop: CancellationToken,
    ) {
        let mut rotation = 0usize;
        let mut backoff =
            crate::retry::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut held: Vec<OwnedSemaphorePermit> = Vec::with_capacity(self.settings.fetch_count);
        loop {
            // What an earlier read returned beyond its permits goes first.
            if self.backlog_len() > 0 {
                let permit = tokio::select! {
                    permit = permits.clone().acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => break,
                    },
                    _ = stop.cancelled() => break,
                };
                if let Some(delivery) = self.backlog_pop() {
                    self.spawn(delivery, permit);
                }
                continue;
            }
            let changed = self.services.plugins_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let slot_freed = self.services.plugin_slot_freed.notified();
            tokio::pin!(slot_freed);
            slot_freed.as_mut().enable();
            let table = self.services.plugins.load_full();
            // Streams of plugins at their own concurrency limit wait.
            let mut streams: Vec<Arc<str>> = table
                .by_capability
                .values()
                .zip(table.streams())
                .filter(|(plugin, _)| {
                    plugin
                        .policy()
                        .concurrency
                        .as_ref()
                        .is_none_or(|limit| limit.available_permits() > 0)
                })
                .map(|(_, stream)| stream.clone())
                .collect();
            if streams.is_empty() {
                // Nothing to serve (yet), or every plugin at its limit.
                tokio::select! {
                    _ = changed => continue,
                    _ = slot_freed => continue,
                    _ = stop.cancelled() => break,
                }
            }
            let first = tokio::select! {
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
                _ = stop.cancelled() => break,
            };
            held.push(first);
            while held.len() < self.settings.fetch_count {
                match permits.clone().try_acquire_owned() {
                    Ok(permit) => held.push(permit),
                    Err(_) => break,
                }
            }
            // COUNT applies per stream: each may return as many entries as
            // permits are held, so a busy stream is served in batches
            // however many idle ones are read beside it. What comes back
            // beyond the permits waits in the backlog; with B streams busy
            // at once that is at most (B - 1) × fetch_count entries. The
            // first streams of the list get the first permits, so the list
            // turns by one each read.
            let count = held.len();
            let turn = rotation % streams.len();
            streams.rotate_left(turn);
            rotation = rotation.wrapping_add(1);
            let read = broker::read_group(
                &mut conn,
                &self.settings.group,
                &self.settings.worker_id,
                &streams,
                count,
                self.settings.block,
            )
            .await;
            match read {
                Ok(deliveries) => {
                    if backoff.succeeded() {
                        self.services.metrics.emit(RedisReadsAgain);
                    }
                    for delivery in interleave_streams(deliveries) {
                        match held.pop() {
                            Some(permit) => self.spawn(delivery, permit),
                            None => self.backlog_push(delivery),
                        }
                    }
                }
                Err(error) => {
                    self.services.metrics.emit(RedisFailed {
                        operation: RedisOperation::Read,
                        error: &error,
                    });
                    if error.is_missing_group() {
                        self.recreate_groups(&mut conn, table.streams()).await;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_wait()) => {}
                        _ = stop.cancelled() => break,
                    }
                }
            }
            held.clear();
            if stop.is_cancelled() {
                break;
            }
        }
        self.start_backlog_at_shutdown();
    }

    pub(super) fn backlog_len(&self) -> usize {
        self.backlog
            .lock()
            .expect("backlog lock is never poisoned")
            .len()
    }

    pub(super) fn backlog_pop(&self) -> Option<Delivery> {
        let mut backlog = self.backlog.lock().expect("backlog lock is never poisoned");
        backlog.pop_front().map(|(delivery, _)| delivery)
    }

    pub(super) fn backlog_push(&self, delivery: Delivery) {
        let mut backlog = self.backlog.lock().expect("backlog lock is never poisoned");
        backlog.push_back((delivery, Instant::now()));
    }

    /// The reader stopped with entries in the backlog: each starts when a
    /// permit frees (the shutdown grace covers it like any task), or stays
    /// pending for another worker if the daemon is cut off first.
    pub(super) fn start_backlog_at_shutdown(self: &Arc<Self>) {
        while let Some(delivery) = self.backlog_pop() {
            let this = self.clone();
            let permits = self.services.permits.clone();
            self.tracker.spawn(async move {
                let permit = tokio::select! {
                    permit = permits.acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => return,
                    },
                    _ = this.force_stop.cancelled() => return,
                };
                this.spawn(delivery, permit);
            });
        }
    }

    /// Every `claim_interval`: renews the entries of long tasks running here
    /// and takes over entries other consumers left pending longer than
    /// `claim_idle` (those past `max_deliveries` are dead-lettered).
    pub async fn reclaim(
        self: Arc<Self>,
        mut conn: Connection,
        permits: Arc<Semaphore>,
        stop: CancellationToken,
    ) {
        let mut ticker = tokio::time::interval(self.settings.claim_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.cancelled() => return,
            }
            if let Err(error) = self.renew_leases(&mut conn).await {
                tracing::warn!(%error, "renewing in-flight entries failed");
            }
            let table = self.services.plugins.load_full();
            for stream in table.streams() {
                if stop.is_cancelled() {
                    return;
                }
                if let Err(error) = self.claim_stream(&mut conn, stream, &permits).await {
                    self.services.metrics.emit(RedisFailed {
                        operation: RedisOperation::Claim,
                        error: &error,
                    });
                }
            }
        }
    }

    /// Every `trim_interval`: trims each capability stream served here of
    /// what every consumer group has read and acknowledged, then to
    /// `control_maxlen` when set ([`broker::trim`]).
    pub async fn trim_streams(self: Arc<Self>, mut conn: Connection, stop: CancellationToken) {
        let Some(interval) = self.settings.trim_interval else {
            return;
        };
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.cancelled() => return,
            }
            let table = self.services.plugins.load_full();
            for stream in table.streams() {
                if stop.is_cancelled() {
                    return;
                }
                match broker::trim(&mut conn, stream, self.settings.control_maxlen).await {
                    Ok(trimmed) => self.services.metrics.emit(StreamTrimmed {
                        stream,
                        consumed: trimmed.consumed,
                        over_cap: trimmed.over_cap,
                        control_maxlen: self.settings.control_maxlen,
                    }),
                    Err(error) => {
                        self.services.metrics.emit(RedisFailed {
                            operation: RedisOperation::Trim,
                            error: &error,
                        });
                    }
                }
            }
        }
    }

    pub(super) async fn renew_leases(
        &self,
        conn: &mut Connection,
    ) -> Result<(), broker::BrokerError> {
        // Each entry is renewed a third of claim_idle after it was read or
        // last renewed: twice more before anyone may take it over, and
        // not at every pass (thousands of waiting tasks would cost Redis
        // a renewal each per pass).
        let period = self.settings.claim_idle / 3;
        let now = Instant::now();
        let mut by_stream: HashMap<Arc<str>, Vec<String>> = HashMap::new();
        {
            let mut running = self.running.lock().expect("running lock is never poisoned");
            for task in running.values_mut() {
                if now.duration_since(task.renewed) >= period {
                    task.renewed = now;
                    by_stream
                        .entry(task.stream.clone())
                        .or_default()
                        .push(task.entry_id.clone());
                }
            }
            let mut backlog = self.backlog.lock().expect("backlog lock is never poisoned");
            for (delivery, renewed) in backlog.iter_mut() {
                if now.duration_since(*renewed) >= period {
                    *renewed = now;
                    by_stream
                        .entry(delivery.stream.clone())
                        .or_default()
                        .push(delivery.id.clone());
                }
            }
        }
        for (stream, ids) in by_stream {
            let lost = broker::renew(
                conn,
                &stream,
                &self.settings.group,
                &self.settings.worker_id,
                &ids,
            )
            .await?;
            if !lost.is_empty() {
                self.leases_lost(&stream, &lost);
            }
        }
        Ok(())
    }

    /// Entries of `stream` another worker took over (or acknowledged) while
    /// we held them: their tasks stop without writing an outcome, and
    /// backlog entries are dropped — the other worker runs them.
    fn leases_lost(&self, stream: &Arc<str>, lost: &[String]) {
        {
            let running = self.running.lock().expect("running lock is never poisoned");
            for task in running.values() {
                if task.stream == *stream && lost.contains(&task.entry_id) {
                    tracing::warn!(
                        %stream,
                        entry_id = %task.entry_id,
                        agent_type = %task.agent_type,
                        "another worker holds this task's entry now; stopping it here"
                    );
                    task.lease_lost.cancel();
                }
            }
        }
        let mut backlog = self.backlog.lock().expect("backlog lock is never poisoned");
        backlog.retain(|(delivery, _)| {
            let keep = !(delivery.stream == *stream && lost.contains(&delivery.id));
            if !keep {
                self.services.metrics.emit(LeaseLost::WhileQueued {
                    stream,
                    entry_id: &delivery.id,
                });
            }
            keep
        });
    }

    pub(super) async fn claim_stream(
        self: &Arc<Self>,
        conn: &mut Connection,
        stream: &Arc<str>,
        permits: &Arc<Semaphore>,
    ) -> Result<(), broker::BrokerError> {
        let free = permits.available_permits().min(100);
        if free == 0 {
            return Ok(());
        }
        let pending = broker::pending_idle(
            conn,
            stream,
            &self.settings.group,
            self.settings.claim_idle,
            free,
        )
        .await?;
        let in_flight: Vec<String> = {
            let running = self.running.lock().expect("running lock is never poisoned");
            let backlog = self.backlog.lock().expect("backlog lock is never poisoned");
            running
                .values()
                .map(|r| r.entry_id.clone())
                .chain(backlog.iter().map(|(d, _)| d.id.clone()))
                .collect()
        };
        let mut candidates = Vec::new();
        let mut held = Vec::new();
        for entry in pending {
            if in_flight.contains(&entry.id) {
                continue;
            }
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                break;
            };
            held.push(permit);
            candidates.push(entry);
        }
        if candidates.is_empty() {
            return Ok(());
        }
        let claimed = broker::claim(
            conn,
            stream,
            &self.settings.group,
            &self.settings.worker_id,
            self.settings.claim_idle,
            &candidates,
        )
        .await?;
        for delivery in claimed {
            let from = candidates
                .iter()
                .find(|c| c.id == delivery.id)
                .map(|c| c.consumer.clone())
                .unwrap_or_default();
            self.services.metrics.emit(EntryTakenOver {
                stream: &delivery.stream,
                entry_id: &delivery.id,
                from_consumer: &from,
                deliveries: delivery.deliveries,
            });
            let permit = held.pop().expect("one permit per candidate");
            self.spawn(delivery, permit);
        }
        Ok(())
    }

    /// Creates the consumer group of `streams` again, after Redis lost it
    /// (a restart without persistence): new entries are read from then on.
    pub(super) async fn recreate_groups(&self, conn: &mut Connection, streams: &[Arc<str>]) {
        for stream in streams {
            match broker::ensure_group(conn, stream, &self.settings.group).await {
                Ok(()) => {
                    tracing::warn!(%stream, group = %self.settings.group, "consumer group was missing; created again")
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot create the consumer group again yet")
                }
            }
        }
    }

    /// Reads the worker's control stream (CANCEL_TASK, forwarded RESUMEs) until `stop` fires.
    /// Control entries need no permit: a cancel must get through when every
    /// permit is taken.
    pub async fn control(
        self: Arc<Self>,
        mut conn: Connection,
        stream: Arc<str>,
        stop: CancellationToken,
    ) {
        let streams = [stream.clone()];
        let mut backoff =
            crate::retry::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        // First what this worker id left unacknowledged when it last stopped
        // (forwarded replies in particular), then new entries.
        let mut own_pending = true;
        let mut pending_after = "0".to_owned();
        loop {
            let read = tokio::select! {
                read = async {
                    if own_pending {
                        broker::read_own_pending(&mut conn, &self.settings.group, &self.settings.worker_id, &stream, &pending_after, 16).await
                    } else {
                        broker::read_group(&mut conn, &self.settings.group, &self.settings.worker_id, &streams, 16, self.settings.block).await
                    }
                } => read,
                _ = stop.cancelled() => return,
            };
            if own_pending && let Ok(deliveries) = &read {
                match deliveries.last() {
                    Some(last) => pending_after = last.id.clone(),
                    None => {
                        own_pending = false;
                        continue;
                    }
                }
            }
            let deliveries = match read {
                Ok(deliveries) => {
                    backoff.succeeded();
                    deliveries
                }
                Err(error) => {
                    self.services.metrics.emit(RedisFailed {
                        operation: RedisOperation::Control,
                        error: &error,
                    });
                    if error.is_missing_group() {
                        self.recreate_groups(&mut conn, &streams).await;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_wait()) => {}
                        _ = stop.cancelled() => return,
                    }
                    continue;
                }
            };
            for delivery in deliveries {
                let parsed = delivery
                    .field("data")
                    .ok_or_else(|| wire::MalformedEntry("entry has no `data` field".into()))
                    .and_then(wire::parse_control);
                match parsed {
                    Ok(ControlCommand {
                        action: Action::CancelTask(request),
                        ..
                    }) => {
                        let found = self.cancel(&request);
                        tracing::info!(
                            target_message_id = %request.target_message_id,
                            mode = if request.is_force() { "force" } else { "graceful" },
                            found,
                            "cancel requested"
                        );
                        let _ = self
                            .writer
                            .commit(&delivery.id, vec![self.ack(&delivery)])
                            .await;
                    }
                    Ok(
                        command @ ControlCommand {
                            action: Action::Resume { .. },
                            ..
                        },
                    ) => {
                        self.forwarded_resume(delivery, command, &stop).await;
                    }
                    Ok(other) => {
                        let reason =
                            format!("{} is not a worker control command", other.action.name());
                        self.dead_letter(&delivery, "", reason, None).await;
                    }
                    Err(malformed) => {
                        self.dead_letter(&delivery, "", malformed.0, None).await;
                    }
                }
            }
        }
    }
}

/// Entries of one read, taken one per stream in turn (streams in the order
/// the read named them), so the permits held go round the busy streams
/// rather than to the first one.
fn interleave_streams(deliveries: Vec<Delivery>) -> Vec<Delivery> {
    let mut by_stream: Vec<std::collections::VecDeque<Delivery>> = Vec::new();
    for delivery in deliveries {
        match by_stream
            .iter_mut()
            .find(|queue| queue.front().is_some_and(|d| d.stream == delivery.stream))
        {
            Some(queue) => queue.push_back(delivery),
            None => by_stream.push(std::collections::VecDeque::from([delivery])),
        }
    }
    let mut out = Vec::with_capacity(by_stream.iter().map(|q| q.len()).sum());
    while !by_stream.is_empty() {
        by_stream.retain_mut(|queue| match queue.pop_front() {
            Some(delivery) => {
                out.push(delivery);
                true
            }
            None => false,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn delivery(stream: &str, id: &str) -> Delivery {
        Delivery {
            stream: Arc::from(stream),
            id: id.to_owned(),
            fields: Vec::new(),
            deliveries: 1,
        }
    }

    #[test]
    pub(super) fn one_entry_per_stream_in_turn() {
        let read = vec![
            delivery("a", "1"),
            delivery("a", "2"),
            delivery("a", "3"),
            delivery("b", "4"),
            delivery("c", "5"),
            delivery("c", "6"),
        ];
        let order: Vec<String> = interleave_streams(read)
            .into_iter()
            .map(|d| format!("{}{}", d.stream, d.id))
            .collect();
        assert_eq!(order, ["a1", "b4", "c5", "a2", "c6", "a3"]);
    }
}
