//! Access control at the door: every `tagstore.v1.TagStore` call must carry
//! `authorization: Bearer <token>` naming a token of the server's tokens
//! file whose grant allows the call ([`crate::access`] has the rules);
//! otherwise it is answered `UNAUTHENTICATED` (no token, or an unknown one)
//! or `PERMISSION_DENIED` (a known token without the right), before its
//! request is read. The tokens are read again on SIGHUP; a file that does
//! not read leaves the ones before in force. The caller's grant travels on
//! with the request (for the audit trail). Health checks and reflection
//! (the schema, no data) need no token.

use std::convert::Infallible;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use parking_lot::RwLock;
use tonic::Status;
use tonic::body::Body;
use tonic::server::NamedService;

use crate::access::{Refusal, Tokens};

/// The path prefix of the calls guarded.
const SERVICE: &str = "/tagstore.v1.TagStore/";

/// The tokens in force, and where they are read from.
pub struct Keys {
    path: PathBuf,
    tokens: RwLock<Arc<Tokens>>,
}

impl Keys {
    /// Reads the tokens file; a missing file is an error (a server told to
    /// use tokens with none would refuse every call).
    pub fn load(path: PathBuf) -> crate::error::Result<Arc<Keys>> {
        if !path.exists() {
            return Err(crate::error::Error::Config(format!(
                "tokens file {} does not exist; make a token with `tagstore token add <name> --role admin --file {}`",
                path.display(),
                path.display()
            )));
        }
        let tokens = Tokens::load(&path).map_err(|e| crate::error::Error::Config(e.to_string()))?;
        Ok(Arc::new(Keys {
            path,
            tokens: RwLock::new(Arc::new(tokens)),
        }))
    }

    /// Reads the file again; on failure the tokens before stay in force.
    pub fn reload(&self) {
        match Tokens::load(&self.path) {
            Ok(t) => {
                tracing::info!(path = %self.path.display(), tokens = t.len(), "tokens read again");
                *self.tokens.write() = Arc::new(t);
            }
            Err(e) => {
                tracing::error!(error = %e, "tokens file not read again; the tokens before stay in force")
            }
        }
    }

    pub fn count(&self) -> usize {
        self.tokens.read().len()
    }
}

/// Wraps the service so that every call is checked first.
#[derive(Clone)]
pub struct Guarded<S> {
    inner: S,
    keys: Option<Arc<Keys>>,
}

impl<S> Guarded<S> {
    /// `keys` `None`: no access control (a server on loopback, or one told
    /// it is meant to be open).
    pub fn new(inner: S, keys: Option<Arc<Keys>>) -> Self {
        Self { inner, keys }
    }
}

impl<S: NamedService> NamedService for Guarded<S> {
    const NAME: &'static str = S::NAME;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Checks one call's token; the grant to go on with.
fn check(keys: &Keys, req: &http::Request<Body>) -> Result<Arc<crate::access::Grant>, Status> {
    let path = req.uri().path();
    let method = path.strip_prefix(SERVICE).unwrap_or(path);
    let header = req.headers().get("authorization").ok_or_else(|| {
        Status::unauthenticated(
            "this server needs a token: send `authorization: Bearer <token>` \
             (tagstore-shell --token, or TAGSTORE_TOKEN)",
        )
    })?;
    let token = header
        .to_str()
        .ok()
        .and_then(|h| h.strip_prefix("Bearer "))
        .ok_or_else(|| {
            Status::unauthenticated("the authorization metadata must be `Bearer <token>`")
        })?;
    let tokens = keys.tokens.read().clone();
    let refused = |r: Refusal| match r {
        Refusal::Unknown(m) => Status::unauthenticated(m),
        Refusal::Denied(m) => Status::permission_denied(m),
    };
    let grant = tokens.check(token).map_err(refused)?;
    grant.allows(method).map_err(refused)?;
    Ok(grant)
}

impl<S> tower_service::Service<http::Request<Body>> for Guarded<S>
where
    S: tower_service::Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error = Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = Infallible;
    type Future = BoxFuture<Result<S::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        if let Some(keys) = &self.keys {
            match check(keys, &req) {
                Ok(grant) => {
                    req.extensions_mut().insert(grant);
                }
                Err(status) => return Box::pin(async move { Ok(status.into_http()) }),
            }
        }
        Box::pin(self.inner.call(req))
    }
}
