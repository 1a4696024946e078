//! `tagstore-shell` against a real server: every command non-interactively
//! (`-c`, `-f`, `--json`, exit codes), and an interactive session in a
//! pseudo-terminal (completion, Ctrl-C at the prompt and during a command,
//! multi-line input).

use std::process::{Command, Output};

mod common {
    use tagstore_test_support::{ServerProcess, server_binary, try_start};

    /// The workspace's server on `dir`; panics if it does not start.
    pub fn start(dir: &std::path::Path, extra: &[&str]) -> ServerProcess {
        try_start(&server_binary(None), dir, extra).unwrap_or_else(|e| panic!("{e}"))
    }
}

fn shell(addr: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tagstore-shell"))
        .arg("--addr")
        .arg(addr)
        .args(args)
        .env("TAGSTORE_HISTORY", "/dev/null")
        .output()
        .expect("run tagstore-shell")
}

/// Runs `-c command`, expecting success; returns stdout.
fn ok(addr: &str, command: &str) -> String {
    let out = shell(addr, &["-c", command]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        out.status.success(),
        "{command}: exit {:?}\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    stdout
}

/// Runs `-c command`, expecting failure; returns stderr.
fn fails(addr: &str, command: &str) -> String {
    let out = shell(addr, &["-c", command]);
    assert_eq!(out.status.code(), Some(1), "{command} should fail: {out:?}");
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_non_interactively() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let a = server.addr.as_str();

    assert_eq!(
        ok(
            a,
            "create tag 高价值用户 category 价值 description \"spent over ¥5,000\""
        )
        .trim(),
        "created tag 高价值用户"
    );
    assert_eq!(
        ok(a, "create tag \"with space\"").trim(),
        "created tag \"with space\""
    );
    assert!(fails(a, "create tag 高价值用户").contains("already exists"));
    assert_eq!(
        ok(
            a,
            "add 高价值用户 phone:13800001111 wechat:oX9a jd:pin_7781"
        )
        .trim(),
        "added 3 (3 new customers)"
    );
    assert_eq!(
        ok(a, "add \"with space\" jd:pin_7781").trim(),
        "added 1 (0 new customers)"
    );
    assert_eq!(ok(a, "remove \"with space\" nobody").trim(), "removed 0");

    let count = ok(a, "count 高价值用户 AND NOT \"with space\"");
    assert!(count.starts_with("2  ("), "{count}");
    assert!(count.trim_end().ends_with("ms)"), "{count}");

    // A query error: one line, then the query with a caret under the position.
    let err = fails(a, "count 高价值用户 AND (");
    let lines: Vec<&str> = err.lines().collect();
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains("position 11"),
        "{err}"
    );
    assert_eq!(lines[1], "  高价值用户 AND (");
    assert_eq!(lines[2], format!("  {}^", " ".repeat(16)), "{err}");
    assert!(fails(a, "count nope").contains("unknown tag"));

    // A saved audience: its name stands for its query.
    assert_eq!(
        ok(
            a,
            "create audience 高价值无空格 owner marketing category campaigns as 高价值用户 AND NOT \"with space\""
        )
        .trim(),
        "saved audience 高价值无空格"
    );
    assert!(ok(a, "count 高价值无空格").starts_with("2  ("));
    let audiences = ok(a, "audiences");
    assert!(
        audiences.contains("高价值无空格")
            && audiences.contains("marketing")
            && audiences.contains("1 saved audiences in all"),
        "{audiences}"
    );
    let taken = ok(a, "snapshot 高价值无空格 note \"approved\"");
    assert!(
        taken.contains("snapshot 1 of 高价值无空格: 2 members"),
        "{taken}"
    );
    assert!(ok(a, "snapshot 高价值无空格").contains("shares its members"));
    assert!(ok(a, "count SNAPSHOT 1 AND NOT SNAPSHOT 2").starts_with("0  ("));
    let list = ok(a, "snapshots");
    assert!(
        list.contains("approved") && list.contains("= 1") && list.contains("2 snapshots in all"),
        "{list}"
    );
    assert_eq!(ok(a, "drop snapshot 2 --yes").trim(), "dropped snapshot 2");
    assert!(fails(a, "count SNAPSHOT 2").contains("no audience snapshot 2"));
    // The server started with nothing to count: no point yet today.
    assert!(ok(a, "history 高价值用户").contains("no points yet"));
    assert!(fails(a, "history nope").contains("no tag or saved audience"));
    assert!(fails(a, "create audience 高价值用户 as ALL").contains("already exists"));
    assert!(fails(a, "create audience x 高价值用户").contains("usage"));
    assert_eq!(
        ok(a, "drop audience 高价值无空格 --yes").trim(),
        "dropped audience 高价值无空格"
    );
    assert!(ok(a, "audiences").contains("(no saved audiences)"));
    let tags = ok(a, "tags");
    assert!(
        tags.contains("高价值用户  价值") && tags.contains("(2 tags)"),
        "{tags}"
    );
    let tag = ok(a, "tag 高价值用户");
    assert!(
        tag.contains("spent over ¥5,000") && tag.contains("members"),
        "{tag}"
    );

    let page = ok(a, "find ALL limit 2");
    assert!(
        page.contains("phone:13800001111") && page.contains("wechat:oX9a"),
        "{page}"
    );
    assert!(page.contains("`more` for the next page"), "{page}");
    // `more` continues the last find within one session (-f runs one session).
    let script = dir.path().join("pages.tsq");
    std::fs::write(&script, "-- two pages\nfind ALL limit 2\nmore\n").unwrap();
    let out = shell(a, &["-f", script.to_str().unwrap()]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("jd:pin_7781") && text.contains("(1 shown;"),
        "{text}"
    );
    assert!(fails(a, "more").contains("run `find` first"));

    let profile = ok(a, "profile jd:pin_7781");
    assert!(
        profile.contains("2 tags")
            && profile.contains("with space")
            && profile.contains("高价值用户"),
        "{profile}"
    );
    assert!(fails(a, "profile nobody").contains("not found"));

    // Import: keys one per line, a CSV column, rejected lines with reasons.
    let file = dir.path().join("keys.csv");
    std::fs::write(
        &file,
        "customer,name\nphone:1,A\n\"phone:2\",B\nbad\u{1}key,C\n\njd:pin_7781,D\n",
    )
    .unwrap();
    let imported = ok(
        a,
        &format!("import 高价值用户 from {} column 1", file.display()),
    );
    assert!(
        imported.contains("read 6 lines, sent 3 keys: 2 added"),
        "{imported}"
    );
    assert!(
        imported.contains("1 rejected")
            && imported.contains("line 4: ")
            && imported.contains("control character"),
        "{imported}"
    );
    let created = ok(a, &format!("import 新标签 from {} create", file.display()));
    assert!(created.contains("added to 新标签"), "{created}");

    // Export writes a CSV file with every member.
    let csv = dir.path().join("out.csv");
    let exported = ok(a, &format!("export 高价值用户 to {}", csv.display()));
    assert!(exported.starts_with("exported 5 customers"), "{exported}");
    let body = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(body.lines().count(), 6);
    assert_eq!(body.lines().next(), Some("customer"));

    // Confirmation: refused without a terminal unless --yes.
    assert!(fails(a, "drop tag \"with space\"").contains("add --yes"));
    assert!(
        ok(a, "drop tag \"with space\" --yes").contains("dropped tag \"with space\" (1 members)")
    );
    let out = shell(a, &["--yes", "-c", "delete customers phone:1"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("deleted 1 customers"),
        "{out:?}"
    );

    let stats = ok(a, "stats");
    assert!(
        stats.contains("customers") && stats.contains("data directory"),
        "{stats}"
    );
    assert!(ok(a, "checkpoint").starts_with("checkpoint at lsn"));
    assert!(ok(a, "help").contains("export <query> to <file.csv>"));
    assert!(ok(a, "help import").contains("example:"));
    assert!(ok(a, "\\timing on").contains("Timing is on."));
    assert!(fails(a, "frobnicate").contains("unknown command"));

    // JSON output for scripts.
    // Five customers were created; phone:1 was deleted.
    let text = ok(a, "count ALL");
    assert!(text.starts_with("4  ("), "{text}");
    let out = shell(a, &["--json", "-c", "count ALL"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["count"], 4);
    let out = shell(a, &["--json", "-c", "tags"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tags"].as_array().unwrap().len(), 2);

    // A checkpoint after new customers adds a dictionary section; one that
    // merges the dictionary leaves one.
    let sections = || {
        let out = shell(a, &["--json", "-c", "stats"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["dictionary_sections"].as_u64().unwrap()
    };
    ok(a, "resolve phone:100 phone:101 --create");
    ok(a, "checkpoint");
    assert!(sections() >= 2);
    assert!(ok(a, "checkpoint --merge-dictionary").starts_with("checkpoint at lsn"));
    assert_eq!(sections(), 1);
    assert!(fails(a, "checkpoint --merge").contains("usage: checkpoint [--merge-dictionary]"));
    ok(a, "delete customers phone:100 phone:101 --yes");

    // A script stops at the first failure with exit status 1, naming the line.
    std::fs::write(
        &script,
        "count ALL\ncount (\n  高价值用户 OR\n  新标签)\ncount nope\ncount ALL\n",
    )
    .unwrap();
    let out = shell(a, &["-f", script.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.lines().count(),
        2,
        "multi-line command ran: {stdout}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("(stopped at line 5)"));

    // Piped input works like a script.
    let mut child = Command::new(env!("CARGO_BIN_EXE_tagstore-shell"))
        .args(["--addr", a])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"count ALL\nquit\ncount ALL\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        1,
        "quit stops the input"
    );

    // Output into a pipe nobody reads (`tagstore-shell ... | head -0`) ends
    // the shell quietly, not with a panic.
    let mut child = Command::new(env!("CARGO_BIN_EXE_tagstore-shell"))
        .args(["--addr", a, "-c", "tags"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}: {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_dropped_connection_is_one_line_and_the_next_command_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = common::start(dir.path(), &[]);
    let addr = server.addr.clone();
    ok(&addr, "create tag t");
    ok(&addr, "add t k1 k2");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tagstore-shell"));
    cmd.args(["--addr", &addr])
        .env("TAGSTORE_HISTORY", "/dev/null")
        .env("TERM", "xterm");
    let mut p = rexpect::session::spawn_command(cmd, Some(15_000)).expect("spawn in a pty");
    let prompt = format!("tagstore {addr}> ");
    p.exp_string(&prompt).unwrap();
    server.kill();
    p.send_line("count ALL").unwrap();
    p.exp_string("cannot reach the server").unwrap();
    p.exp_string(&prompt).unwrap();
    // The server comes back on the same address: the next command just works.
    let _server = common::start(dir.path(), &["--listen", &addr]);
    p.send_line("count ALL").unwrap();
    p.exp_string("2  (").unwrap();
    p.exp_string(&prompt).unwrap();
    p.send_control('d').unwrap();
    p.exp_eof().unwrap();
}

#[test]
fn interactive_session_in_a_pseudo_terminal() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let a = server.addr.clone();
    ok(&a, "create tag 高价值用户");
    ok(&a, "create tag 常购护肤品");
    ok(&a, "add 高价值用户 k1 k2 k3");
    ok(&a, "add 常购护肤品 k2");
    drop(rt);

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tagstore-shell"));
    cmd.args(["--addr", &a])
        .env("TAGSTORE_HISTORY", dir.path().join("history"))
        .env("TERM", "xterm");
    let mut p = rexpect::session::spawn_command(cmd, Some(15_000)).expect("spawn in a pty");
    let prompt = format!("tagstore {a}> ");
    p.exp_string(&prompt).unwrap();

    // Completion of a command, then of a Chinese tag name.
    p.send("cou\t").unwrap();
    p.send("高\t").unwrap();
    p.send(" AND 常\t").unwrap();
    p.send_line("").unwrap();
    p.exp_string("1  (").unwrap();
    p.exp_string(&prompt).unwrap();

    // Ctrl-C at the prompt keeps the session.
    p.send("count garbage").unwrap();
    p.send_control('c').unwrap();
    p.exp_string("^C").unwrap();
    p.exp_string(&prompt).unwrap();

    // Ctrl-C during a command that waits (an import reading a FIFO nobody writes).
    let fifo = dir.path().join("fifo");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    p.send_line(&format!("import 高价值用户 from {}", fifo.display()))
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    p.send_control('c').unwrap();
    p.exp_string("cancelled").unwrap();
    p.exp_string(&prompt).unwrap();

    // Multi-line input: an open parenthesis continues the command.
    p.send_line("count (高价值用户 OR").unwrap();
    p.send_line("常购护肤品)").unwrap();
    p.exp_string("3  (").unwrap();
    p.exp_string(&prompt).unwrap();

    // An error is one line and the session goes on.
    p.send_line("count nope").unwrap();
    p.exp_string("unknown tag").unwrap();
    p.exp_string(&prompt).unwrap();
    p.send_line("quit").unwrap();
    p.exp_eof().unwrap();
    let history = std::fs::read_to_string(dir.path().join("history")).unwrap();
    assert!(history.contains("count nope"), "history is kept: {history}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn field_commands() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let a = server.addr.as_str();
    assert_eq!(
        ok(a, "create field total_spend integer").trim(),
        "created integer field total_spend"
    );
    assert_eq!(
        ok(a, "create field lifecycle enum new,active,churned").trim(),
        "created enumerated field lifecycle"
    );
    assert_eq!(
        ok(a, "create field bought behaviour retention 90 daily 30").trim(),
        "created behaviour field bought"
    );
    assert!(fails(a, "create field x enum").contains("enum needs its values"));
    let fields = ok(a, "fields");
    assert!(
        fields.contains("lifecycle    enumerated")
            && fields.contains("Asia/Shanghai, kept 90 days (30 by day)"),
        "{fields}"
    );
    assert_eq!(
        ok(a, "set total_spend u1 600000").trim(),
        "1 set, 0 cleared, 0 new behaviour days, 1 new customers"
    );
    ok(a, "set total_spend u2 100");
    ok(a, "set lifecycle u1 active");
    ok(a, "set lifecycle u2 new");
    assert!(fails(a, "set total_spend u1 lots").contains("not an integer"));
    ok(a, "set total_spend u2 add 250");
    ok(a, "set total_spend u2 max 300");
    ok(a, "set total_spend u2 min 400");
    assert!(ok(a, "count total_spend = 350").starts_with('1'));
    ok(a, "set total_spend u2 100");
    assert!(fails(a, "set lifecycle u1 add 1").contains("enumerated"));
    assert!(fails(a, "set lifecycle u1 vip").contains("not a value"));
    assert!(ok(a, "event bought u1").contains("1 new behaviour days"));
    ok(a, "create tag 高价值用户");
    ok(a, "add 高价值用户 u1");
    assert!(fails(a, "add lifecycle u1").contains("lifecycle"));
    assert!(
        ok(
            a,
            "count total_spend >= 500000 AND lifecycle = active AND bought WITHIN 7d"
        )
        .starts_with("1  (")
    );
    // A query error in a field predicate shows the caret under the operator.
    let err = fails(a, "count lifecycle >= new");
    assert!(err.contains("position 10"), "{err}");
    let agg = ok(a, "aggregate total_spend edges 1000 over ALL");
    assert!(
        agg.contains("600100") && agg.contains("< 1000") && agg.contains(">= 1000"),
        "{agg}"
    );
    let b = ok(a, "breakdown lifecycle over ALL");
    assert!(
        b.contains("active") && b.contains("50.0%") && b.contains("(audience 2)"),
        "{b}"
    );
    let top = ok(a, "top 3 lifecycle = active");
    assert!(top.contains("高价值用户") && top.contains("2.00×"), "{top}");
    // TopTags' options: a category, a minimum count, the query's own tags.
    ok(a, "create tag 常购 category 价值");
    ok(a, "add 常购 u1");
    let top = ok(a, "top 3 category 价值 over lifecycle = active");
    assert!(top.contains("常购") && !top.contains("高价值用户"), "{top}");
    let top = ok(a, "top min 2 over lifecycle = active");
    assert!(
        !top.contains("常购") && !top.contains("高价值用户"),
        "{top}"
    );
    let top = ok(a, "top 高价值用户");
    assert!(top.contains("常购") && !top.contains("高价值用户"), "{top}");
    let top = ok(a, "top with query tags over 高价值用户");
    assert!(top.contains("高价值用户"), "{top}");
    // Profile's window of behaviour dates.
    let days_now = jiff::Timestamp::now().as_second() / 86_400;
    let earlier = jiff::civil::date(1970, 1, 1)
        .checked_add(jiff::Span::new().days(days_now - 20))
        .unwrap()
        .to_string();
    ok(a, &format!("event bought u2 {earlier}"));
    let p = ok(a, "profile u2");
    assert!(
        p.contains(&earlier) && p.contains("days in the last 30"),
        "{p}"
    );
    let p = ok(a, "profile u2 days 10");
    assert!(
        !p.contains(&earlier) && p.contains("days in the last 10"),
        "{p}"
    );
    let o = ok(a, "overlap lifecycle = active ; total_spend > 0");
    assert!(
        o.contains("#1 lifecycle = active") && o.contains("#2 total_spend > 0"),
        "{o}"
    );
    let err = fails(a, "overlap ALL ; nope");
    assert!(err.contains("unknown tag"), "{err}");
    let p = ok(a, "profile u1");
    assert!(
        p.contains("total_spend") && p.contains("600000") && p.contains("active"),
        "{p}"
    );
    let out = shell(a, &["--json", "-c", "aggregate total_spend over ALL"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["sum"], "600100");
    assert_eq!(
        ok(a, "clear lifecycle u1").trim(),
        "0 set, 1 cleared, 0 new behaviour days"
    );
    assert_eq!(
        ok(a, "drop field lifecycle --yes").trim(),
        "dropped field lifecycle"
    );
    assert!(fails(a, "count lifecycle = new").contains("unknown tag or field"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_and_writes_by_id() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let a = server.addr.as_str();
    ok(a, "create tag vip");

    let out = ok(a, "resolve phone:1 wechat:2");
    assert!(out.contains("phone:1") && out.contains(" -"), "{out}");
    let out = ok(a, "resolve phone:1 wechat:2 --create");
    assert!(out.contains("2 new customers"), "{out}");
    let out = shell(a, &["--json", "-c", "resolve wechat:2 nobody"]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = v["ids"][0]["id"].as_u64().expect("wechat:2 has an id");
    assert!(v["ids"][1]["id"].is_null(), "{v}");

    assert_eq!(
        ok(a, &format!("add vip --ids {id}")).trim(),
        "added 1 (0 new customers)"
    );
    let profile = ok(a, "profile wechat:2");
    assert!(
        profile.contains(&format!("internal id {id}")) && profile.contains("vip"),
        "{profile}"
    );
    assert!(fails(a, "add vip --ids 99999").contains("99999"));
    assert!(fails(a, "add vip --ids x").contains("bad id"));
    assert_eq!(
        ok(a, &format!("remove vip --ids {id} 99999")).trim(),
        "removed 1"
    );
    assert!(ok(a, "help resolve").contains("--create"));
}

/// `create source`, `sources`, `ingest` with a reject report, and a file
/// sent twice (the second time every event is a duplicate); `drop source`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingestion_commands() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let a = server.addr.as_str();
    assert_eq!(
        ok(a, "create source tb preset taobao_orders").trim(),
        "created source tb"
    );
    let list = ok(a, "sources");
    assert!(
        list.contains("tb ") && list.contains("pos_orders"),
        "{list}"
    );
    assert!(fails(a, "create source tb preset pos_orders").contains("already exists"));

    // Enough orders for several batches, each with a line break and a comma
    // inside a quoted title, and one malformed row.
    let mut csv = String::from(
        "订单编号,买家昵称,实付金额,下单时间,收货人手机,订单状态,商品编码,商品类目,品牌,宝贝标题\n",
    );
    for i in 0..30_000 {
        csv.push_str(&format!(
            "T{i},nick{},12.50,2026-11-11 19:00:00,,交易成功,X1,skincare,SK-II,\"多行\n标题, 含逗号\"\n",
            i % 1000
        ));
    }
    csv.push_str("T-bad,nick1,免费,2026-11-11 19:00:00,,交易成功,X1,skincare,SK-II,x\n");
    let file = dir.path().join("pos.csv");
    std::fs::write(&file, &csv).unwrap();
    let cmd = format!("ingest tb {}", file.display());
    let out = ok(a, &cmd);
    assert!(
        out.contains("30,001 records: 30,000 accepted, 0 duplicates, 0 ignored, 1 rejected; 1,000 new customers"),
        "{out}"
    );
    let report = std::fs::read_to_string(dir.path().join("pos.csv.rejects.csv")).unwrap();
    // Header line 1, then two lines per receipt: the bad row starts on 60,002.
    assert!(report.starts_with("line,reason\n60002,"), "{report}");
    assert!(report.contains("not a number"), "{report}");
    assert!(ok(a, "count order_count = 30").starts_with("1,000"));
    let again = ok(
        a,
        &format!("{cmd} rejects {}", dir.path().join("r2.csv").display()),
    );
    assert!(again.contains("0 accepted, 30,000 duplicates"), "{again}");
    assert!(ok(a, "count total_spend_fen = 37500").starts_with("1,000"));
    assert!(fails(a, "ingest nowhere x.csv").contains("no source"));
    // A fact written over by hand, rebuilt from the kept events.
    ok(a, "set order_count taobao_nick:nick7 1");
    assert!(ok(a, "count order_count = 30").starts_with("999"));
    let rebuilt = ok(a, "rebuild facts taobao_nick:nick7 taobao_nick:nobody");
    assert!(
        rebuilt.contains("rebuilt the facts of 1 customers from 30 kept events")
            && rebuilt.contains("no such customer: taobao_nick:nobody"),
        "{rebuilt}"
    );
    assert!(ok(a, "count order_count = 30").starts_with("1,000"));
    // Every customer a query selects: the two written over, then all.
    ok(a, "set order_count taobao_nick:nick3 2");
    ok(a, "set order_count taobao_nick:nick4 3");
    let rebuilt = ok(a, "rebuild facts where order_count < 30");
    assert!(
        rebuilt.contains("rebuilt the facts of 2 customers from 60 kept events"),
        "{rebuilt}"
    );
    assert!(ok(a, "count order_count = 30").starts_with("1,000"));
    let rebuilt = ok(a, "rebuild facts where ALL");
    assert!(
        rebuilt.contains("rebuilt the facts of 1,000 customers from 30,000 kept events"),
        "{rebuilt}"
    );
    // More customers than one call takes: in calls of 10,000 (the new
    // ones have no events: their facts are rebuilt to none).
    let mut c = server.client().await.unwrap();
    c.resolve_customers(tagstore_proto::ResolveCustomersRequest {
        customers: (0..24_000).map(|i| format!("bulk{i}")).collect(),
        create_missing: true,
    })
    .await
    .unwrap();
    let rebuilt = ok(a, "rebuild facts where ALL");
    assert!(
        rebuilt.contains(
            "rebuilt the facts of 25,000 customers from 30,000 kept events: 7,000 values set"
        ) && rebuilt.contains("(3 calls of at most 10,000)"),
        "{rebuilt}"
    );
    assert!(ok(a, "count order_count = 30").starts_with("1,000"));
    let err = fails(a, "rebuild facts where 没有这个标签");
    assert!(err.contains("unknown tag"), "{err}");

    // Identities: an order names nick1 with a phone; another names nick2
    // with the same phone: one person, and nick2 joins nick1.
    let head =
        "订单编号,买家昵称,实付金额,下单时间,收货人手机,订单状态,商品编码,商品类目,品牌,宝贝标题\n";
    let phones = format!(
        "{head}P1,nick1,1.00,2026-11-12 10:00:00,13812345678,交易成功,X1,skincare,SK-II,x\n\
         P2,nick2,1.00,2026-11-12 11:00:00,13812345678,交易成功,X1,skincare,SK-II,x\n"
    );
    let file = dir.path().join("phones.csv");
    std::fs::write(&file, phones).unwrap();
    let out = ok(a, &format!("ingest tb {}", file.display()));
    assert!(
        out.contains("0 new customers, 1 identities linked, 1 merged")
            && out.contains(
                "merge 1: taobao_nick:nick2 joined taobao_nick:nick1 (both named by phone:13812345678)"
            ),
        "{out}"
    );
    let ids = ok(a, "identities taobao_nick:nick2");
    assert!(
        ids.contains("taobao_nick:nick1 (internal id")
            && ids.contains("3 identities")
            && ids.contains("phone:13812345678")
            && ids.contains("taobao")
            && ids.contains("2026-11-12 02:00:00"),
        "{ids}"
    );
    let merges = ok(a, "merges phone:13812345678");
    assert!(
        merges.contains("taobao_nick:nick2") && merges.contains("1 merges in all"),
        "{merges}"
    );
    let profile = ok(a, "profile phone:13812345678");
    assert!(profile.contains("first channel"), "{profile}");
    let linked = ok(a, "link phone:13812345678 member_card:VIP-9 channel app");
    assert!(
        linked.contains("linked to taobao_nick:nick1")
            && linked.contains("1 identities linked, 0 merged"),
        "{linked}"
    );
    assert!(ok(a, "identities member_card:vip-9").contains("4 identities"));
    assert!(fails(a, "link nocolon").contains("type:value"));
    // 30 + 1 orders of nick1, 30 of nick2, and P2.
    assert!(ok(a, "count order_count = 62").starts_with('1'));
    let fields = ok(a, "fields");
    assert!(
        fields.contains("on merge") && fields.contains("sum"),
        "{fields}"
    );
    let page = ok(a, "find order_count >= 62 as phone");
    assert!(page.contains("phone:13812345678"), "{page}");
    let export = dir.path().join("phones-out.csv");
    let out = ok(
        a,
        &format!("export order_count >= 30 to {} as phone", export.display()),
    );
    assert!(
        out.contains("exported 1 customers")
            && out.contains("998 without a phone identity left out"),
        "{out}"
    );
    assert_eq!(
        std::fs::read_to_string(&export).unwrap(),
        "phone\n13812345678\n"
    );
    // Hashed for an ad platform (`printf 13812345678 | sha256sum`).
    ok(
        a,
        &format!(
            "export order_count >= 30 to {} as phone hashed sha256",
            export.display()
        ),
    );
    assert_eq!(
        std::fs::read_to_string(&export).unwrap(),
        "phone_sha256\n38aed9048140b0e437ea81461d9ea4524169f6795004da120bcf7d41894e4d15\n"
    );
    // The merge undone: nick2 is itself again with its 30 orders; nick1
    // keeps its own and P2, which named both.
    let undone = ok(a, "unmerge 1");
    assert!(
        undone.contains("merge 1 undone: taobao_nick:nick2")
            && undone.contains("its identities: taobao_nick:nick2"),
        "{undone}"
    );
    assert!(ok(a, "count order_count = 32").starts_with('1'));
    assert!(ok(a, "merges").contains("undone"));
    assert!(fails(a, "unmerge 1").contains("already undone"));
    assert!(fails(a, "unmerge 0").contains("neither a merge id"));
    // The phone taken off nick1: a customer of its own.
    let off = ok(a, "unmerge phone:13812345678");
    assert!(
        off.contains("phone:13812345678 taken off taobao_nick:nick1")
            && off.contains("now customer phone:13812345678"),
        "{off}"
    );
    assert!(ok(a, "merges").contains("identity taken off"));
    assert!(ok(a, "create field stage enum new,active,loyal merge last").contains("stage"));
    assert!(ok(a, "create field level integer merge latest").contains("level"));
    let fields = ok(a, "fields");
    assert!(
        fields.contains("level_at_ms") && fields.contains("latest"),
        "{fields}"
    );
    assert!(fails(a, "create field n2 integer merge last").contains("does not fit"));
    ok(a, "drop source tb --yes");
    assert!(ok(a, "sources").contains("(no sources)"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_commands() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let a = server.addr.as_str();
    ok(a, "create field total_spend_fen integer");
    ok(a, "create field order_count integer");
    ok(a, "set total_spend_fen u1 600000");
    ok(a, "set total_spend_fen u2 100");
    ok(a, "set order_count u2 1");
    assert_eq!(
        ok(
            a,
            "create rule 高价值用户 category 价值 as total_spend_fen >= 500000"
        )
        .trim(),
        "defined rule tag 高价值用户: 1 members"
    );
    assert_eq!(
        ok(
            a,
            "create lifecycle lifecycle as prospect when order_count IS NULL; new when order_count = 1"
        )
        .trim(),
        "defined lifecycle lifecycle: prospect 1, new 1"
    );
    let rules = ok(a, "rules");
    assert!(
        rules.contains("高价值用户")
            && rules.contains("total_spend_fen >= 500000")
            && rules.contains("prospect (1) when order_count IS NULL"),
        "{rules}"
    );
    let profile = ok(a, "profile u1");
    assert!(
        profile.contains("高价值用户  rule") && profile.contains("prospect"),
        "{profile}"
    );
    assert!(ok(a, "tag 高价值用户").contains("total_spend_fen >= 500000"));
    assert!(fails(a, "add 高价值用户 u2").contains("is a rule tag"));
    assert!(fails(a, "set lifecycle u2 new").contains("is a lifecycle"));
    ok(a, "set total_spend_fen u2 700000");
    assert!(ok(a, "count 高价值用户").starts_with("2  ("));
    assert!(
        ok(
            a,
            "create rule 高价值用户 replace as total_spend_fen >= 650000"
        )
        .contains("redefined rule tag 高价值用户: 1 members")
    );
    assert_eq!(ok(a, "turn days").trim(), "every rule is on today already");
    assert!(fails(a, "create lifecycle x as new order_count = 1").contains("when"));
    assert!(ok(a, "drop rule 高价值用户 --yes").contains("dropped rule 高价值用户"));
    assert!(fails(a, "tag 高价值用户").contains("not found"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_who_entered_and_left_and_where_to_resume() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let a = server.addr.as_str();
    ok(a, "create field order_count integer");
    ok(
        a,
        "create lifecycle stage as new when order_count = 1; loyal when order_count >= 2",
    );
    ok(a, "create tag vip");
    assert!(
        ok(a, "create audience 忠实vip kept as vip AND stage = loyal")
            .contains("saved audience 忠实vip (kept current")
    );
    assert!(
        fails(a, "watch audience vip for 1").contains("not found"),
        "a tag is not an audience"
    );
    ok(a, "add vip u1 u2");
    ok(a, "set order_count u1 1");
    ok(a, "set order_count u1 5");
    ok(a, "remove vip u2");
    let out = ok(a, "watch audience 忠实vip after 0 for 1");
    assert!(out.contains("u1  +audience 忠实vip"), "{out}");
    assert!(!out.contains("u2"), "{out}");
    let listed = ok(a, "audiences");
    assert!(
        listed
            .lines()
            .any(|l| l.contains("忠实vip") && l.contains("yes")),
        "{listed}"
    );
    let out = ok(a, "watch vip stage=* after 0 for 1");
    assert!(out.contains("watching from lsn 0"), "{out}");
    assert!(out.contains("u1  +vip"), "{out}");
    assert!(out.contains("u1  stage: - → new"), "{out}");
    assert!(out.contains("u1  stage: new → loyal"), "{out}");
    assert!(out.contains("u2  -vip"), "{out}");
    let last = out.lines().last().unwrap();
    assert!(
        last.starts_with("time is up: 6 changes; every change up to lsn"),
        "{out}"
    );
    // Compact: a line per tag and write, with its ids.
    let out = ok(a, "watch vip compact after 0 for 1");
    assert!(out.contains("  vip  +2 (#"), "{out}");
    assert!(out.contains("  vip  -1 (#"), "{out}");
    assert!(!out.contains("u1"), "no keys: {out}");
    assert!(out.lines().last().unwrap().contains("3 changes"), "{out}");
    assert!(fails(a, "watch nosuch for 1").contains("not found"));
    assert!(fails(a, "watch order_count=* for 1").contains("enumerated"));
    assert!(fails(a, "watch").contains("usage"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_lists_who_read_which_customer() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let a = server.addr.as_str();
    ok(a, "create tag vip");
    ok(a, "add vip phone:13800001111");
    ok(a, "profile phone:13800001111");
    ok(a, "count vip");
    let out = ok(a, "audit about 13800001111");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        lines[2].contains("Profile") && lines[2].contains("OK"),
        "{out}"
    );
    let all = ok(a, "audit limit 1");
    assert!(
        all.contains("Update") && all.contains("audit after 1"),
        "{all}"
    );
    assert!(fails(a, "audit who").contains("usage"));
    // By UTC day: the records are of today, not before 2000 nor since 2999.
    let since = ok(a, "audit about 13800001111 since 2000-01-01");
    assert!(since.contains("Profile"), "{since}");
    let none = "no audit records match";
    assert!(ok(a, "audit since 2999-01-01").contains(none));
    assert!(ok(a, "audit before 2000-01-01").contains(none));
    assert!(fails(a, "audit since 2026-13-01").contains("is not a day"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_writes_a_full_backup_and_an_increment() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(&dir.path().join("data"), &[]);
    let a = server.addr.as_str();
    let full = dir.path().join("full.tsbak");
    let inc = dir.path().join("inc.tsbak");
    ok(a, "create tag vip");
    ok(a, "add vip u1 u2");
    let out = ok(a, &format!("backup {}", full.display()));
    assert!(
        out.contains("(full) holds every write up to lsn 2") && full.exists(),
        "{out}"
    );
    ok(a, "checkpoint");
    ok(a, "add vip u3");
    let out = ok(
        a,
        &format!("backup {} since {}", inc.display(), full.display()),
    );
    assert!(
        out.contains("increment of") && out.contains("up to lsn 3"),
        "{out}"
    );
    assert!(fails(a, &format!("backup {}", full.display())).contains("exists"));
    assert!(fails(a, "backup").contains("usage"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_of_reads_the_store_as_it_was_until_as_of_now() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(&dir.path().join("data"), &[]);
    let a = server.addr.as_str();
    ok(a, "create tag vip");
    ok(a, "add vip u1 u2");
    ok(a, "checkpoint");
    let lsn: u64 = {
        let out = shell(a, &["--json", "-c", "stats"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["lsn"].as_u64().unwrap()
    };
    ok(a, "add vip u3 u4 u5");
    let script = dir.path().join("past.tsh");
    std::fs::write(
        &script,
        format!("as of position {lsn}\ncount vip\nfind vip\nas of now\ncount vip\n"),
    )
    .unwrap();
    let out = shell(a, &["-f", script.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{out:?}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines[0].contains(&format!("as of position {lsn}"))
            && lines[0].contains("(2 customers then)"),
        "{stdout}"
    );
    assert!(lines[1].starts_with("2 "), "{stdout}");
    assert!(stdout.contains("u2") && !stdout.contains("u3"), "{stdout}");
    assert!(stdout.contains("as it is now"), "{stdout}");
    assert!(lines.last().unwrap().starts_with("5 "), "{stdout}");
    // Ahead of the store, a day not written as a date: refused, nothing kept.
    assert!(fails(a, &format!("as of position {}", lsn + 100)).contains("ahead"));
    assert!(fails(a, "as of 11/11").contains("usage"));
}

/// `tags`, `fields` and `breakdown category` list every tag, field and row
/// of a store whose listings take several answers (1,100 tags with 4 KiB
/// descriptions; 40 enumerated fields of 1,024 values of 128 bytes; a
/// category of 22,100 tags, 21,000 of them with 200-byte names).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_fields_and_a_category_breakdown_list_a_store_of_many_long_ones_whole() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let mut c = server.client().await.unwrap();
    for i in 0..1100 {
        c.create_tag(tagstore_proto::CreateTagRequest {
            name: format!("t{i:04}"),
            description: "描述".repeat(680),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let out = shell(&server.addr, &["--json", "-c", "tags"]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = v["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    let want_tags: Vec<String> = (0..1100).map(|i| format!("t{i:04}")).collect();
    assert_eq!(names, want_tags);

    let values: Vec<String> = (0..1024)
        .map(|i| format!("{i:04}{}", "v".repeat(124)))
        .collect();
    for i in 0..40 {
        c.create_field(tagstore_proto::CreateFieldRequest {
            name: format!("f{i:02}"),
            kind: tagstore_proto::FieldKind::Enum as i32,
            values: values.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let out = shell(&server.addr, &["--json", "-c", "fields"]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = v["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    let want: Vec<String> = (0..40).map(|i| format!("f{i:02}")).collect();
    assert_eq!(names, want);

    // A breakdown by a category of 22,100 tags (the 1,100 above and 21,000
    // of 200-byte names, none with a category) comes in pages: all rows.
    let long: Vec<String> = (0..21_000)
        .map(|i| format!("{i:05}{}", "t".repeat(195)))
        .collect();
    c.update(tagstore_proto::UpdateRequest {
        mutations: long
            .iter()
            .map(|tag| tagstore_proto::Mutation {
                tag: tag.clone(),
                add: vec!["k".into()],
                ..Default::default()
            })
            .collect(),
        create_missing_tags: true,
    })
    .await
    .unwrap();
    let out = shell(
        &server.addr,
        &["--json", "-c", "breakdown category \"\" over ALL"],
    );
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 22_100);
    // By name: the long ones ("00000t…") come before "t0000".
    let labels: Vec<&str> = rows.iter().map(|r| r["label"].as_str().unwrap()).collect();
    assert!(labels[..21_000] == long, "the 21,000 long tags, in order");
    assert!(labels[21_000..] == want_tags, "then the 1,100 others");
    assert!(rows[..21_000].iter().all(|r| r["count"] == 1));
    assert_eq!(v["total"], 1);
}
