//! The capacity harness must not rot: a tiny configuration of every scenario,
//! against Redis too when `redis-server` is installed.

use std::process::Command;

#[test]
fn every_scenario_runs_at_a_tiny_scale() {
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_tagstore-bench"))
        .args([
            "all",
            "--customers",
            "20000",
            "--tags",
            "12",
            "--seconds",
            "0.2",
        ])
        .args([
            "--update-clients",
            "1,2",
            "--query-clients",
            "2",
            "--sweep-densities",
            "0.001,0.5",
        ])
        .arg("--server-bin")
        .arg(tagstore_test_support::server_binary(None))
        .arg("--out")
        .arg(out.path())
        .output()
        .expect("run tagstore-bench");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "exit {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        run.status
    );
    let mut scenarios = vec![
        "load", "update", "query", "mixed", "restart", "sweep", "watch", "backup",
    ];
    // The kafka scenario runs when a tansu broker is installed (CI requires
    // one; elsewhere it says it was skipped).
    if std::env::var_os("TAGSTORE_REQUIRE_KAFKA").is_some() {
        scenarios.push("kafka");
    }
    for scenario in scenarios {
        assert!(
            stdout.lines().any(|l| l.trim_start().starts_with(scenario)),
            "no {scenario} rows:\n{stdout}"
        );
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("bench.json")).unwrap())
            .unwrap();
    let rows = report["rows"].as_array().unwrap();
    assert!(rows.len() > 40, "{} rows", rows.len());
    assert!(
        rows.iter()
            .all(|r| r["tagstore"].is_number() || r["tagstore"].is_null())
    );
    // Counts of 3 or more operands were also timed from one client, taking
    // turns with the same count in-process, back to back and after a sleep.
    let turns = report["query"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| {
            let one = &f["tagstore_1_client"];
            let timed = |k: &str| one[k].as_f64().is_some_and(|ms| ms > 0.0);
            timed("in_process_beside_ms")
                && timed("in_process_after_sleep_ms")
                && one["overhead_after_sleep_p50_round_trips"].is_number()
                && one["client"]["requests"].as_u64().is_some_and(|n| n > 0)
        })
        .count();
    assert!(turns >= 4, "{turns} counts timed in turns");
    // Single writes were also timed against a bare server that only syncs.
    assert!(
        report["write_floor"]["bare_synced_server"]["requests"]
            .as_u64()
            .is_some_and(|n| n > 0),
        "no bare synced server floor: {}",
        report["write_floor"]
    );
    // And taking turns with it, each side timed in every turn.
    for side in ["tagstore", "bare_synced_server"] {
        let turns = &report["single_write_turns"];
        assert!(
            turns[side]["requests"].as_u64().is_some_and(|n| n >= 3),
            "{side} not timed in turns: {turns}"
        );
    }
    let with_redis = rows.iter().filter(|r| r["redis"].is_number()).count();
    let redis_installed = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("redis-server").is_file()))
        .unwrap_or(false);
    if redis_installed {
        assert!(with_redis > 20, "redis figures missing: {with_redis}");
        assert!(report["redis_version"].is_string());
    } else {
        assert_eq!(with_redis, 0);
        assert!(stdout.contains("apt-get install redis-server"));
    }
    assert!(
        std::fs::read_to_string(out.path().join("sweep.svg"))
            .unwrap()
            .contains("<svg")
    );
    assert!(
        std::fs::read_to_string(out.path().join("latency.svg"))
            .unwrap()
            .contains("<svg")
    );
}

/// `--server-arg` reaches every server the harness starts: with a tokens
/// file and the token in TAGSTORE_TOKEN a scenario runs; with a flag the
/// server does not know, the harness stops with the server's own error.
#[test]
fn server_args_reach_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = tagstore_test_support::server_binary(None);
    let tokens = dir.path().join("tokens.toml");
    let made = Command::new(&server)
        .args(["token", "add", "bench", "--role", "admin", "--file"])
        .arg(&tokens)
        .output()
        .unwrap();
    assert!(made.status.success());
    let token = String::from_utf8(made.stdout).unwrap().trim().to_string();
    let bench = |extra: &[String], token: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tagstore-bench"));
        cmd.args(["load", "--customers", "2000", "--tags", "4", "--no-redis"])
            .arg("--server-bin")
            .arg(&server)
            .arg("--out")
            .arg(dir.path().join("out"))
            .args(extra)
            .env_remove("TAGSTORE_TOKEN");
        if let Some(t) = token {
            cmd.env("TAGSTORE_TOKEN", t);
        }
        cmd.output().unwrap()
    };
    let with_tokens = [format!("--server-arg=--tokens={}", tokens.display())];
    let run = bench(&with_tokens, Some(&token));
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    // Without the token the server refuses the harness.
    assert!(!bench(&with_tokens, None).status.success());
    let run = bench(&["--server-arg=--no-such-flag".to_string()], None);
    assert!(!run.status.success());
    assert!(
        String::from_utf8_lossy(&run.stderr).contains("no-such-flag"),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
}
