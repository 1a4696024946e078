//! The unified event model: what every channel's record becomes once it is
//! read and normalised. An order on JD, a like on Douyin and a visit to a
//! store are all an [`Event`]: who (every identity the record names), where
//! (the channel), what (the event type, amount, item, category, brand,
//! store, free attributes) and when.
//!
//! This room owns the model and its rules (identity types and how their
//! values are normalised, event type names). It knows nothing of files or
//! of the store.

use std::collections::BTreeMap;

use super::normalize::{self, Refused};

/// Longest channel, event type, identity type or attribute name, in bytes.
pub const MAX_NAME_BYTES: usize = 64;
/// Most identities one record may carry.
pub const MAX_IDENTITIES: usize = 16;
/// Most free attributes one record may carry.
pub const MAX_ATTRIBUTES: usize = 32;

/// The event types every source may use without declaring them.
pub const EVENT_TYPES: &[&str] = &[
    "order",
    "refund",
    "view",
    "add_to_cart",
    "like",
    "comment",
    "share",
    "follow",
    "store_visit",
];

/// How an identity type's values are normalised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityForm {
    /// A mainland mobile number ([`normalize::phone`]).
    Phone,
    /// An e-mail address, lower-cased ([`normalize::email`]).
    Email,
    /// Any identifier: trimmed; lower-cased when case-insensitive.
    Plain { case_insensitive: bool },
}

/// The identity types known without declaring them, and their forms.
/// Marketplace nicks and platform ids are case-sensitive: two nicks that
/// differ only in case are two people.
pub const IDENTITY_TYPES: &[(&str, IdentityForm)] = &[
    ("phone", IdentityForm::Phone),
    ("email", IdentityForm::Email),
    (
        "taobao_nick",
        IdentityForm::Plain {
            case_insensitive: false,
        },
    ),
    (
        "jd_pin",
        IdentityForm::Plain {
            case_insensitive: false,
        },
    ),
    (
        "pdd_uid",
        IdentityForm::Plain {
            case_insensitive: false,
        },
    ),
    (
        "wechat_openid",
        IdentityForm::Plain {
            case_insensitive: false,
        },
    ),
    (
        "wechat_unionid",
        IdentityForm::Plain {
            case_insensitive: false,
        },
    ),
    (
        "douyin_uid",
        IdentityForm::Plain {
            case_insensitive: false,
        },
    ),
    (
        "weibo_uid",
        IdentityForm::Plain {
            case_insensitive: false,
        },
    ),
    (
        "member_card",
        IdentityForm::Plain {
            case_insensitive: true,
        },
    ),
];

/// The form of a built-in identity type, if `name` is one.
pub fn builtin_identity(name: &str) -> Option<IdentityForm> {
    IDENTITY_TYPES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, f)| *f)
}

/// Checks a name a source declares (an identity type, event type, channel
/// or attribute): 1 to [`MAX_NAME_BYTES`] bytes of lower-case ASCII letters,
/// digits and `_`, starting with a letter. Such names become parts of field
/// names (`bought:skincare`, `order_count:jd`), so they stay plain.
pub fn check_name(what: &str, name: &str) -> Result<(), Refused> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name.as_bytes()[0].is_ascii_lowercase()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Refused(format!(
            "{what} {name:?} must be 1 to {MAX_NAME_BYTES} lower-case letters, digits or _, starting with a letter"
        )))
    }
}

/// One identity of a customer: a type and a value in its normal form.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Identity {
    pub kind: String,
    pub value: String,
}

impl Identity {
    /// Normalises `value` by the form of identity type `kind`.
    pub fn new(kind: &str, form: IdentityForm, value: &str) -> Result<Identity, Refused> {
        let value = match form {
            IdentityForm::Phone => normalize::phone(value)?,
            IdentityForm::Email => normalize::email(value)?,
            IdentityForm::Plain { case_insensitive } => {
                normalize::identifier(value, kind, case_insensitive)?
            }
        };
        Ok(Identity {
            kind: kind.to_string(),
            value,
        })
    }

    /// The customer key this identity names until identities are unified:
    /// `type:value`, such as `phone:13812345678`.
    pub fn key(&self) -> String {
        format!("{}:{}", self.kind, self.value)
    }
}

/// One normalised event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The source's own id of the event (an order number, an interaction
    /// id), for de-duplication; `None` if the source has none.
    pub source_event_id: Option<String>,
    /// Every identity the record names, in the order the source declares
    /// them (the first is the customer's key until identities are unified).
    pub identities: Vec<Identity>,
    pub channel: String,
    /// `order`, `refund`, `view`, … or a type the source declares.
    pub event_type: String,
    /// When it happened, Unix milliseconds.
    pub at_ms: i64,
    /// Fen (1/100 yuan); refunds carry the amount refunded, positive.
    pub amount_fen: Option<i64>,
    pub item: Option<String>,
    pub category: Option<String>,
    pub brand: Option<String>,
    pub store: Option<String>,
    pub attributes: BTreeMap<String, String>,
}
