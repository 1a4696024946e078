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
            synced_server_ms: synced.ms(0.5),
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
                // The engine's own share: over a server that only syncs.
                self.report.add(
                    "update",
                    "batch 1, 1 client, a new membership: p50 less the bare server's durable write",
                    "ms",
                    Better::Lower,
                    Some(ours.ms(0.5) - floor.synced_server_ms),
                    None,
                );
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

/// The floors a single durable write is read against (p50s, in ms).
#[derive(Clone, Copy)]
struct Floor {
    /// The lightest round trip plus an `fdatasync`, each measured alone.
    apart_ms: f64,
    /// The same write to [`crate::sync_floor`]'s server.
    synced_server_ms: f64,
}
