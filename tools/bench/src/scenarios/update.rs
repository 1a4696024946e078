//! The `update` scenario: single and batched writes from 1 to many clients,
//! and the floor a durable write stands on (an fdatasync, a round trip).

use crate::*;

impl Bench {
    pub(crate) async fn update(&mut self) -> Result<(), BoxError> {
        let server = self.start(&self.dir.clone(), &[])?;
        if let Some(r) = &self.redis {
            r.conn()?
                .cmd(&[b"CONFIG", b"SET", b"appendfsync", b"always"])?;
        }
        let mut figures = Vec::new();
        // Redis takes the customer as a bit offset; tagstore is measured both
        // ways: by key (it resolves each one) and by internal id (the same
        // work Redis is given). The Redis figure is shared by both rows.
        let ids = Arc::new(ops::resolve_ids(&server.addr, &self.data).await?);
        let nonce = store_lsn(&server).await?;
        let floor = self.write_floor(&server, &ids).await?;
        self.new_memberships(&server, &ids, nonce, floor).await?;
        for &batch in &self.cli.update_batches.clone() {
            for &clients in &self.cli.update_clients.clone() {
                let op = Op::Update { batch };
                let by_id = Op::UpdateByIds {
                    batch,
                    ids: ids.clone(),
                };
                // By key and by id each get writes of their own: by id
                // repeating the writes just made by key would find them done.
                let seed = self.write_seed(nonce);
                let (ours, theirs) = self.on_both(&server.addr, &op, clients, seed).await?;
                let seed = self.write_seed(nonce);
                let ours_by_id = tagstore_loop(
                    &server.addr,
                    &self.data,
                    &by_id,
                    clients,
                    self.cli.seconds,
                    seed,
                )
                .await?;
                let label = format!(
                    "batch {batch}, {clients} clients (durable: fsync / appendfsync always)"
                );
                self.rows_for(
                    "update",
                    &label,
                    &ours,
                    theirs.as_ref(),
                    batch as f64,
                    "memberships/s",
                );
                self.rows_for(
                    "update",
                    &format!("batch {batch}, {clients} clients, by internal id (durable)"),
                    &ours_by_id,
                    theirs.as_ref(),
                    batch as f64,
                    "memberships/s",
                );
                figures.push(json!({ "batch": batch, "clients": clients, "tagstore": measured_json(&ours), "tagstore_by_id": measured_json(&ours_by_id), "redis": theirs.as_ref().map(measured_json) }));
            }
        }
        // The relaxed comparison: Redis fsyncs once a second.
        if let Some(r) = &self.redis {
            r.conn()?
                .cmd(&[b"CONFIG", b"SET", b"appendfsync", b"everysec"])?;
            let op = Op::Update { batch: 1000 };
            let (port, secs) = (r.port, self.cli.seconds);
            let seed = self.write_seed(nonce);
            let ours = tagstore_loop(&server.addr, &self.data, &op, 8, secs, seed).await?;
            let theirs = redis_loop(port, &self.data, &op, 8, secs, seed)?;
            self.report.add(
                "update",
                "batch 1000, 8 clients: memberships/s (redis appendfsync everysec)",
                "/s",
                Better::Higher,
                Some(ours.rate() * 1000.0),
                Some(theirs.rate() * 1000.0),
            );
        }
        self.report.extra.insert("update".into(), json!(figures));
        let mut server = server;
        server.stop()?;
        Ok(())
    }

    /// What any durable write of one membership costs on this machine,
    /// whatever the server: one fdatasync of a small append to a file on the
    /// data directory's file system (preallocated, as tagstore's log is),
    /// and one gRPC round trip of the lightest request (a count of the two
    /// tiniest tags, answered on the network thread).
    /// Then the same single write as [`Op::AddNew`] sends, to a gRPC server
    /// that does only what any server with a synced log must
    /// ([`crate::sync_floor`]): what that costs here with the two taken
    /// together, the sync following a request's read rather than its
    /// predecessor.
    async fn write_floor(
        &mut self,
        server: &ServerProcess,
        ids: &Arc<Vec<u32>>,
    ) -> Result<Floor, BoxError> {
        use std::io::Write;
        let parent = self
            .dir
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let mut probe = tempfile::NamedTempFile::new_in(parent)?;
        {
            use std::os::fd::AsRawFd;
            // SAFETY: posix_fallocate on a file descriptor the probe owns.
            let rc = unsafe { libc::posix_fallocate(probe.as_file().as_raw_fd(), 0, 4 << 20) };
            if rc != 0 {
                probe.as_file().set_len(4 << 20)?;
            }
        }
        probe.as_file().sync_all()?;
        let record = [0x5au8; 64];
        let mut times = Vec::with_capacity(2000);
        let started = Instant::now();
        while times.len() < 2000 && started.elapsed() < Duration::from_secs_f64(self.cli.seconds) {
            let t0 = Instant::now();
            probe.write_all(&record)?;
            probe.as_file().sync_data()?;
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        let fsync_ms = times[times.len() / 2];
        let p = picks(&self.data);
        let tiny = Op::Count(Q::And(p.tiny.iter().map(|&t| Q::Tag(t)).collect()));
        let rtt = tagstore_loop(
            &server.addr,
            &self.data,
            &tiny,
            1,
            self.cli.seconds.min(2.0),
            self.cli.seed,
        )
        .await?;
        self.report.add(
            "update",
            "floor: fdatasync of a 64-byte append, p50 (no server)",
            "ms",
            Better::Lower,
            Some(fsync_ms),
            None,
        );
        self.report.add(
            "update",
            "floor: gRPC round trip of the lightest count, 1 client, p50",
            "ms",
            Better::Lower,
            Some(rtt.ms(0.5)),
            None,
        );
        let bare = crate::sync_floor::SyncFloor::start(parent)?;
        let synced = tagstore_loop(
            &bare.addr,
            &self.data,
            &Op::AddNew { ids: ids.clone() },
            1,
            self.cli.seconds.min(2.0),
            self.cli.seed,
        )
        .await?;
        drop(bare);
        self.report.add(
            "update",
            "floor: a bare gRPC server's durable write (a 151-byte append and fdatasync on the network thread, no engine), 1 client, p50",
            "ms",
            Better::Lower,
            Some(synced.ms(0.5)),
            None,
        );
        self.report.extra.insert(
            "write_floor".into(),
            json!({ "fdatasync_p50_ms": fsync_ms, "grpc_round_trip": measured_json(&rtt), "bare_synced_server": measured_json(&synced) }),
        );
        Ok(Floor {
            apart_ms: rtt.ms(0.5) + fsync_ms,
        })
    }

    /// Single durable writes that each add a new membership (to a tag that
    /// starts empty), from 1 and 8 clients: the like-for-like cost of a write
    /// that must reach the disk on both sides.
    async fn new_memberships(
        &mut self,
        server: &ServerProcess,
        ids: &Arc<Vec<u32>>,
        nonce: u64,
        floor: Floor,
    ) -> Result<(), BoxError> {
        let mut c = server.client().await?;
        let _ = c
            .drop_tag(DropTagRequest {
                name: ops::FRESH_TAG.into(),
            })
            .await;
        c.create_tag(CreateTagRequest {
            name: ops::FRESH_TAG.into(),
            ..Default::default()
        })
        .await?;
        if let Some(r) = &self.redis {
            r.conn()?.cmd(&[b"DEL", ops::FRESH_KEY.as_bytes()])?;
        }
        let op = Op::AddNew { ids: ids.clone() };
        let mut figures = Vec::new();
        for clients in [1, 8] {
            let seed = self.write_seed(nonce);
            let (ours, theirs) = self.on_both(&server.addr, &op, clients, seed).await?;
            self.rows_for(
                "update",
                &format!("batch 1, {clients} clients, each a new membership (durable)"),
                &ours,
                theirs.as_ref(),
                1.0,
                "memberships/s",
            );
            if clients == 1 {
                // The target: at most 20 µs over a round trip and an fdatasync.
                self.report.add(
                    "update",
                    "batch 1, 1 client, a new membership: p50 less (lightest round trip + fdatasync)",
                    "ms",
                    Better::Lower,
                    Some(ours.ms(0.5) - floor.apart_ms),
                    None,
                );
                self.beside_the_bare_server(server, ids, nonce).await?;
            }
            figures.push(json!({ "clients": clients, "tagstore": measured_json(&ours), "redis": theirs.as_ref().map(measured_json) }));
            let seed = self.write_seed(nonce);
            self.pipelined_changes(server, ids, clients, seed).await?;
        }
        self.report
            .extra
            .insert("update_new_memberships".into(), json!(figures));
        Ok(())
    }
}

/// The floor a single durable write is read against (a p50, in ms).
#[derive(Clone, Copy)]
struct Floor {
    /// The lightest round trip plus an `fdatasync`, each measured alone.
    apart_ms: f64,
}

/// Turns of [`Bench::beside_the_bare_server`]: each server this many times.
const TURNS: usize = 3;

impl Bench {
    /// The engine's own share of a single durable write: the same write
    /// (one new membership, 1 client) to tagstore and to the bare server
    /// that only appends and syncs ([`crate::sync_floor`]), taking turns
    /// ([`TURNS`] slices of each, a third of `--seconds` at least half a
    /// second each, the bare server first) so that the machine's drift
    /// falls on both alike; each side's latencies pooled over its slices.
    async fn beside_the_bare_server(
        &mut self,
        server: &ServerProcess,
        ids: &Arc<Vec<u32>>,
        nonce: u64,
    ) -> Result<(), BoxError> {
        let parent = self
            .dir
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let bare = crate::sync_floor::SyncFloor::start(parent)?;
        let slice = (self.cli.seconds / TURNS as f64).max(0.5);
        let op = Op::AddNew { ids: ids.clone() };
        let (mut theirs, mut ours): (Option<Measured>, Option<Measured>) = (None, None);
        for _ in 0..TURNS {
            for (addr, pooled) in [(&bare.addr, &mut theirs), (&server.addr, &mut ours)] {
                let seed = self.write_seed(nonce);
                let m = tagstore_loop(addr, &self.data, &op, 1, slice, seed).await?;
                pool(pooled, m)?;
            }
        }
        drop(bare);
        let (Some(theirs), Some(ours)) = (theirs, ours) else {
            return Err("no turn of single writes was timed".into());
        };
        let what = format!("batch 1, 1 client, a new membership, {TURNS} turns of each");
        self.report.add(
            "update",
            &format!("{what}: the bare server's p50"),
            "ms",
            Better::Lower,
            Some(theirs.ms(0.5)),
            None,
        );
        self.report.add(
            "update",
            &format!("{what}: tagstore's p50"),
            "ms",
            Better::Lower,
            Some(ours.ms(0.5)),
            None,
        );
        self.report.add(
            "update",
            "batch 1, 1 client, a new membership: p50 less the bare server's durable write (taking turns)",
            "ms",
            Better::Lower,
            Some(ours.ms(0.5) - theirs.ms(0.5)),
            None,
        );
        self.report.extra.insert(
            "single_write_turns".into(),
            json!({ "turns": TURNS, "slice_s": slice, "tagstore": measured_json(&ours), "bare_synced_server": measured_json(&theirs) }),
        );
        Ok(())
    }
}

/// `m` added to the latencies and time pooled in `into`.
fn pool(into: &mut Option<Measured>, m: Measured) -> Result<(), BoxError> {
    match into {
        None => *into = Some(m),
        Some(p) => {
            p.hist
                .add(&m.hist)
                .map_err(|e| format!("pooling latencies: {e}"))?;
            p.requests += m.requests;
            p.seconds += m.seconds;
        }
    }
    Ok(())
}
