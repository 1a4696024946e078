//! TLS against the real server: a client that trusts the server's CA is
//! served, a plain-text client and one trusting another CA are not; client
//! certificates when the server asks for them; a new certificate taken on
//! SIGHUP; the shell and the harness's client over TLS.

mod common;

use std::path::Path;
use std::process::Command;

use rcgen::{
    BasicConstraints, Certificate as CaCert, CertificateParams, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, SanType,
};
use tagstore::proto::CountRequest;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

struct Ca {
    cert: CaCert,
    key: KeyPair,
    pem: String,
}

fn ca() -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Ca {
        pem: cert.pem(),
        cert,
        key,
    }
}

/// A certificate signed by `ca`, for `localhost` and 127.0.0.1: (cert, key).
fn leaf(ca: &Ca, usage: ExtendedKeyUsagePurpose) -> (String, String) {
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params
        .subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.cert, &ca.key).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn write_server_cert(dir: &Path, ca: &Ca) {
    let (cert, key) = leaf(ca, ExtendedKeyUsagePurpose::ServerAuth);
    std::fs::write(dir.join("server.pem"), cert).unwrap();
    std::fs::write(dir.join("server.key"), key).unwrap();
}

/// Counts ALL over TLS trusting `ca_pem`, with a client certificate if
/// given; the error text if the connection or the call fails.
async fn count_over_tls(
    port: &str,
    ca_pem: &str,
    client: Option<&(String, String)>,
) -> Result<u64, String> {
    let mut tls = ClientTlsConfig::new()
        .domain_name("localhost")
        .ca_certificate(Certificate::from_pem(ca_pem));
    if let Some((cert, key)) = client {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Channel::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))?;
    let mut c = tagstore::proto::auth::client(channel, Default::default());
    c.count(CountRequest {
        queries: vec!["ALL".into()],
        as_of: None,
    })
    .await
    .map(|r| r.into_inner().counts[0])
    .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_clients_that_trust_it_and_takes_a_new_certificate_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let (ca1, ca2) = (ca(), ca());
    write_server_cert(dir.path(), &ca1);
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let server = common::start(
        &dir.path().join("data"),
        &[
            "--tls-cert",
            &p("server.pem"),
            "--tls-key",
            &p("server.key"),
        ],
    );
    let port = server.addr.rsplit(':').next().unwrap().to_string();
    // Connections that never begin their handshake hold no one up.
    let silent: Vec<std::net::TcpStream> = (0..20)
        .map(|_| std::net::TcpStream::connect(format!("127.0.0.1:{port}")).unwrap())
        .collect();
    assert_eq!(count_over_tls(&port, &ca1.pem, None).await, Ok(0));
    drop(silent);
    // The harness's and the tests' client (what TAGSTORE_CACERT selects).
    let mut c = server
        .client_over_tls(ca1.pem.as_bytes(), "localhost", None)
        .await
        .unwrap();
    assert_eq!(common::count(&mut c, "ALL").await, 0);
    assert!(count_over_tls(&port, &ca2.pem, None).await.is_err());
    // Plain text is not served.
    let plain = async {
        let channel = Channel::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        tagstore::proto::auth::client(channel, Default::default())
            .count(CountRequest {
                queries: vec!["ALL".into()],
                as_of: None,
            })
            .await
            .map_err(|e| e.to_string())
    };
    assert!(plain.await.is_err());

    // The shell, trusting the CA.
    let shell = common::binary().parent().unwrap().join("tagstore-shell");
    std::fs::write(dir.path().join("ca1.pem"), &ca1.pem).unwrap();
    let out = Command::new(&shell)
        .args(["-a", &format!("127.0.0.1:{port}")])
        .args(["--cacert", &p("ca1.pem")])
        .args(["--servername", "localhost", "-c", "count ALL"])
        .env_remove("TAGSTORE_CACERT")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with('0'));

    // A new certificate, from another CA, taken on SIGHUP; a broken one is
    // not (the one before stays).
    write_server_cert(dir.path(), &ca2);
    let hup = |pid: u32| {
        Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap()
    };
    hup(server.pid().unwrap());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while count_over_tls(&port, &ca2.pem, None).await.is_err() {
        assert!(std::time::Instant::now() < deadline, "SIGHUP not acted on");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(count_over_tls(&port, &ca1.pem, None).await.is_err());
    std::fs::write(dir.path().join("server.key"), "not a key").unwrap();
    hup(server.pid().unwrap());
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(count_over_tls(&port, &ca2.pem, None).await, Ok(0));
    assert!(
        server
            .stderr()
            .contains("certificate before stays in force")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_when_the_server_asks_for_them() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, other) = (ca(), ca());
    write_server_cert(dir.path(), &ca);
    std::fs::write(dir.path().join("clients.pem"), &ca.pem).unwrap();
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let server = common::start(
        &dir.path().join("data"),
        &[
            "--tls-cert",
            &p("server.pem"),
            "--tls-key",
            &p("server.key"),
            "--tls-client-ca",
            &p("clients.pem"),
        ],
    );
    let port = server.addr.rsplit(':').next().unwrap().to_string();
    let mine = leaf(&ca, ExtendedKeyUsagePurpose::ClientAuth);
    let stranger = leaf(&other, ExtendedKeyUsagePurpose::ClientAuth);
    assert_eq!(count_over_tls(&port, &ca.pem, Some(&mine)).await, Ok(0));
    assert!(count_over_tls(&port, &ca.pem, None).await.is_err());
    assert!(
        count_over_tls(&port, &ca.pem, Some(&stranger))
            .await
            .is_err()
    );

    // Half a TLS setting is refused at start.
    let err = common::try_start(&dir.path().join("d2"), &["--tls-cert", &p("server.pem")])
        .err()
        .expect("must refuse to start");
    assert!(err.contains("tls_key"), "{err}");
}
