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
use crate::storage::codec::{Dec, DecodeError, Enc};

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

/// An identity written as `type:value` by a person (a config file, a `Link`
/// call), in its normal form: built-in types' values normalised as
/// ingestion does (`phone:+86 138-1234-5678` is `phone:13812345678`), other
/// types' values trimmed.
pub fn identity_from_text(text: &str) -> Result<String, Refused> {
    let Some((kind, value)) = text.split_once(':') else {
        return Err(Refused(format!(
            "identity {:?} is not type:value",
            text.chars().take(64).collect::<String>()
        )));
    };
    check_name("identity type", kind)?;
    let key = match builtin_identity(kind) {
        Some(form) => Identity::new(kind, form, value)?.key(),
        None => format!("{kind}:{}", value.trim()),
    };
    crate::names::check_key(&key).map_err(|e| Refused(e.to_string()))?;
    Ok(key)
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

/// Version byte of [`Event::encode`].
const ENCODING_VERSION: u8 = 1;

impl Event {
    /// The event as the event archive keeps it, with the name of the
    /// source it came from (`storage-format.md`, "Archived event").
    pub fn encode(&self, source: &str) -> Vec<u8> {
        let mut e = Enc::new();
        e.u8(ENCODING_VERSION).str(source);
        match &self.source_event_id {
            Some(id) => e.u8(1).str(id),
            None => e.u8(0),
        };
        e.u8(self.identities.len() as u8);
        for i in &self.identities {
            e.str(&i.kind).str(&i.value);
        }
        e.str(&self.channel).str(&self.event_type).i64(self.at_ms);
        let parts = [&self.item, &self.category, &self.brand, &self.store];
        let mut present = u8::from(self.amount_fen.is_some());
        for (k, p) in parts.iter().enumerate() {
            present |= u8::from(p.is_some()) << (k + 1);
        }
        e.u8(present);
        if let Some(a) = self.amount_fen {
            e.i64(a);
        }
        for p in parts.into_iter().flatten() {
            e.str(p);
        }
        e.u32(self.attributes.len() as u32);
        for (k, v) in &self.attributes {
            e.str(k).str(v);
        }
        e.buf
    }

    /// Reads what [`Event::encode`] wrote: the source's name and the event.
    pub fn decode(bytes: &[u8]) -> Result<(String, Event), Refused> {
        let bad =
            |e: DecodeError| Refused(format!("archived event: {} at byte {}", e.reason, e.offset));
        let mut d = Dec::new(bytes);
        let version = d.u8().map_err(bad)?;
        if version != ENCODING_VERSION {
            return Err(Refused(format!(
                "archived event: unknown encoding version {version}"
            )));
        }
        let s = |d: &mut Dec| d.str().map(str::to_string).map_err(bad);
        let source = s(&mut d)?;
        let source_event_id = match d.u8().map_err(bad)? {
            0 => None,
            _ => Some(s(&mut d)?),
        };
        let mut identities = Vec::new();
        for _ in 0..d.u8().map_err(bad)? {
            identities.push(Identity {
                kind: s(&mut d)?,
                value: s(&mut d)?,
            });
        }
        let channel = s(&mut d)?;
        let event_type = s(&mut d)?;
        let at_ms = d.i64().map_err(bad)?;
        let present = d.u8().map_err(bad)?;
        let amount_fen = if present & 1 != 0 {
            Some(d.i64().map_err(bad)?)
        } else {
            None
        };
        let mut parts = [None, None, None, None];
        for (k, p) in parts.iter_mut().enumerate() {
            if present >> (k + 1) & 1 != 0 {
                *p = Some(s(&mut d)?);
            }
        }
        let [item, category, brand, store] = parts;
        let mut attributes = BTreeMap::new();
        for _ in 0..d.u32().map_err(bad)? {
            let k = s(&mut d)?;
            attributes.insert(k, s(&mut d)?);
        }
        d.finish().map_err(bad)?;
        Ok((
            source,
            Event {
                source_event_id,
                identities,
                channel,
                event_type,
                at_ms,
                amount_fen,
                item,
                category,
                brand,
                store,
                attributes,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_encode_and_decode() {
        let full = Event {
            source_event_id: Some("订单 1".into()),
            identities: vec![
                Identity {
                    kind: "jd_pin".into(),
                    value: "小王".into(),
                },
                Identity {
                    kind: "phone".into(),
                    value: "13812345678".into(),
                },
            ],
            channel: "jd".into(),
            event_type: "order".into(),
            at_ms: -5,
            amount_fen: Some(-129_900),
            item: Some("精华".into()),
            category: None,
            brand: Some("b".into()),
            store: None,
            attributes: [("k".to_string(), "v".to_string())].into_iter().collect(),
        };
        let bytes = full.encode("jd_orders");
        assert_eq!(
            Event::decode(&bytes).unwrap(),
            ("jd_orders".to_string(), full.clone())
        );
        let bare = Event {
            source_event_id: None,
            amount_fen: None,
            item: None,
            brand: None,
            attributes: BTreeMap::new(),
            ..full
        };
        assert_eq!(Event::decode(&bare.encode("s")).unwrap().1, bare);
        // Cut short, or with bytes after it: refused, not misread.
        assert!(Event::decode(&bytes[..bytes.len() - 1]).is_err());
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(Event::decode(&longer).is_err());
    }
}
