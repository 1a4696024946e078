//! A client's token on every call: the `authorization: Bearer <token>`
//! metadata a server with access control asks for. Shared by the shell, the
//! harness and the tests, so each says it the same way.

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::tag_store_client::TagStoreClient;

/// The environment variable tools read a token from when given none.
pub const TOKEN_ENV: &str = "TAGSTORE_TOKEN";

/// Adds the token, if there is one, to every request.
#[derive(Clone, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    /// `None`: calls go without a token (a server without access control).
    /// A token that cannot be metadata (not visible ASCII) is refused here.
    pub fn new(token: Option<&str>) -> Result<Self, String> {
        match token.map(str::trim).filter(|t| !t.is_empty()) {
            None => Ok(Bearer(None)),
            Some(t) => format!("Bearer {t}")
                .parse()
                .map(|v| Bearer(Some(v)))
                .map_err(|_| "the token has characters a request header cannot carry".into()),
        }
    }

    /// The token given, else the one in [`TOKEN_ENV`], else none.
    pub fn from_flag_or_env(flag: Option<&str>) -> Result<Self, String> {
        match flag {
            Some(t) => Bearer::new(Some(t)),
            None => Bearer::new(std::env::var(TOKEN_ENV).ok().as_deref()),
        }
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A client that sends its token on every call.
pub type Client = TagStoreClient<InterceptedService<Channel, Bearer>>;

/// A client over `channel` with `bearer`.
pub fn client(channel: Channel, bearer: Bearer) -> Client {
    TagStoreClient::with_interceptor(channel, bearer)
}
