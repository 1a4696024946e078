//! Connecting to a server as the tools do: plain text, or TLS when the
//! address says `https://` or a CA or client certificate is given.

use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// TLS settings of the connection (all `None`: plain text, unless the
/// address says https://).
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    pub cacert: Option<std::path::PathBuf>,
    pub cert: Option<std::path::PathBuf>,
    pub key: Option<std::path::PathBuf>,
    pub servername: Option<String>,
}

impl TlsOptions {
    fn wanted(&self, addr: &str) -> bool {
        addr.starts_with("https://") || self.cacert.is_some() || self.cert.is_some()
    }

    fn config(&self, host: &str) -> Result<ClientTlsConfig, String> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
        };
        let mut cfg = ClientTlsConfig::new()
            .domain_name(self.servername.clone().unwrap_or_else(|| host.to_string()));
        if let Some(ca) = &self.cacert {
            cfg = cfg.ca_certificate(Certificate::from_pem(read(ca)?));
        }
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            cfg = cfg.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        Ok(cfg)
    }
}

pub fn endpoint(addr: &str, tls: &TlsOptions) -> Result<Endpoint, String> {
    let bare = addr
        .trim_start_matches("http://")
        .trim_start_matches("https://");
    let secure = tls.wanted(addr);
    let uri = format!("{}://{bare}", if secure { "https" } else { "http" });
    let mut e = Endpoint::from_shared(uri)
        .map(|e| e.connect_timeout(Duration::from_secs(5)).tcp_nodelay(true))
        .map_err(|e| format!("bad server address {addr:?}: {e}"))?;
    if secure {
        let host = bare.rsplit_once(':').map_or(bare, |(h, _)| h);
        e = e
            .tls_config(tls.config(host.trim_matches(['[', ']']))?)
            .map_err(|e| format!("TLS settings: {e}"))?;
    }
    Ok(e)
}
