//! Who may do what: API tokens, their roles, and the rule of every call.
//!
//! A token is `tst1_<id>_<secret>`: a public id (8 random bytes, hex) that
//! names its entry, and a secret (32 random bytes from the operating
//! system, hex). The tokens file keeps, per token, its name, id, role and
//! limits, and the SHA-256 of a random salt followed by the secret — never
//! the secret, which is shown once, when the token is made. 256 random bits
//! need no slow hash: nobody guesses them, and a stolen file does not give
//! them back.
//!
//! Roles nest: `read` (counts, member pages, exports, profiles, analytics,
//! listings), `write` (also updates, values, ingestion), `admin` (also
//! tags, fields and sources, erasing customers, rebuilding facts,
//! checkpoints). A token may also be limited to counts: it reads no
//! individual customer (no member pages, exports, profiles or key look-ups);
//! and a read or write token to tag categories: it names and sees only the
//! tags and fields of those categories (the server checks each call that
//! names them, by the [`Reach`] of its rule), and calls that reach every
//! category (ingestion, merges) are refused to it.
//!
//! This room owns the tokens file (its format, making and revoking tokens)
//! and the table of rules. It knows nothing of gRPC: the server names the
//! call and turns a refusal into a status.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What a token may do; each role may do everything the ones before it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Read,
    Write,
    Admin,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "read" => Some(Role::Read),
            "write" => Some(Role::Write),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Read => "read",
            Role::Write => "write",
            Role::Admin => "admin",
        })
    }
}

/// What one call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub role: Role,
    /// The call returns individual customers (refused to counts-only tokens).
    pub lists_customers: bool,
    /// Which tags and fields it reaches, for tokens limited to categories.
    pub reach: Reach,
}

/// Which tags and fields a call reaches: what a token limited to tag
/// categories may do with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// None: it names and shows no tag or field (store-wide figures, keys
    /// to ids, merges, sources). Allowed.
    Nothing,
    /// The ones it names, which the server checks against the token's
    /// categories (and the ones it lists or shows, which it filters).
    Named,
    /// Every category (ingestion's facts, merging customers, the admin
    /// calls). Refused.
    Every,
}

const fn rule(role: Role, lists_customers: bool, reach: Reach) -> Option<Rule> {
    Some(Rule {
        role,
        lists_customers,
        reach,
    })
}

/// Every method of `tagstore.v1.TagStore`, by name (the metrics count each).
pub const METHODS: &[&str] = &[
    "Aggregate",
    "Backup",
    "Breakdown",
    "Checkpoint",
    "Count",
    "CreateAudience",
    "CreateField",
    "CreateSource",
    "CreateTag",
    "DefineRule",
    "DeleteCustomers",
    "DescribeTag",
    "DropAudience",
    "DropField",
    "DropRule",
    "DropSnapshot",
    "DropSource",
    "DropTag",
    "Export",
    "Ingest",
    "Link",
    "ListAudiences",
    "ListFields",
    "ListMerges",
    "ListRules",
    "ListSnapshots",
    "ListSources",
    "ListTags",
    "Members",
    "Overlap",
    "PauseSource",
    "Profile",
    "ReadAudit",
    "RebuildFacts",
    "ReplaceMembers",
    "ResolveCustomers",
    "ResumeSource",
    "SetValues",
    "Stats",
    "TagHistory",
    "TakeSnapshot",
    "TopTags",
    "TurnRuleDays",
    "Unmerge",
    "Update",
    "Watch",
];

/// The rule of a `tagstore.v1.TagStore` method, by name; `None` for a
/// method this table does not know (refused: a new call must be given a
/// rule here, and the test of every call fails until it is).
pub fn rule_for(method: &str) -> Option<Rule> {
    use Reach::*;
    use Role::*;
    match method {
        "Stats" | "ListSources" => rule(Read, false, Nothing),
        "Count" | "ListTags" | "DescribeTag" | "ListFields" | "ListAudiences" | "ListSnapshots"
        | "TagHistory" | "ListRules" | "Aggregate" | "Breakdown" | "TopTags" | "Overlap" => {
            rule(Read, false, Named)
        }
        "Members" | "Export" | "Profile" | "Watch" => rule(Read, true, Named),
        "ListMerges" => rule(Read, true, Nothing),
        "Update" | "ReplaceMembers" | "SetValues" | "CreateAudience" | "DropAudience"
        | "TakeSnapshot" | "DropSnapshot" => rule(Write, false, Named),
        "Ingest" | "Link" => rule(Write, false, Every),
        // It may create customers, and it answers with who exists.
        "ResolveCustomers" => rule(Write, true, Nothing),
        "CreateTag" | "DropTag" | "CreateField" | "DropField" | "CreateSource" | "DropSource"
        | "PauseSource" | "ResumeSource" | "DeleteCustomers" | "RebuildFacts" | "Unmerge"
        | "Checkpoint" | "DefineRule" | "DropRule" | "TurnRuleDays" | "ReadAudit" | "Backup" => {
            rule(Admin, false, Every)
        }
        _ => None,
    }
}

/// A token's grant: who it is and what it may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub name: String,
    pub role: Role,
    pub counts_only: bool,
    /// The tag categories it may use; empty: every one.
    pub categories: BTreeSet<String>,
}

/// Why a call is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No token, or one the server does not know (`UNAUTHENTICATED`).
    Unknown(String),
    /// A known token without the right (`PERMISSION_DENIED`).
    Denied(String),
}

impl Grant {
    /// May this grant make the call `method`?
    pub fn allows(&self, method: &str) -> Result<(), Refusal> {
        let Some(rule) = rule_for(method) else {
            return Err(Refusal::Denied(format!(
                "{method} has no access rule on this server"
            )));
        };
        if self.role < rule.role {
            return Err(Refusal::Denied(format!(
                "{method} needs the {} role; token {:?} has {}",
                rule.role, self.name, self.role
            )));
        }
        if rule.lists_customers && self.counts_only {
            return Err(Refusal::Denied(format!(
                "{method} returns individual customers; token {:?} may only count",
                self.name
            )));
        }
        if rule.reach == Reach::Every && !self.categories.is_empty() {
            return Err(Refusal::Denied(format!(
                "{method} reaches tags and fields of every category; token {:?} is limited to {}",
                self.name,
                self.categories_text()
            )));
        }
        Ok(())
    }

    /// Whether it may use a tag or field of `category` (every one when the
    /// token has no limit).
    pub fn may_use(&self, category: &str) -> bool {
        self.categories.is_empty() || self.categories.contains(category)
    }

    /// Its categories, for messages: `categories "a", "b"`.
    pub fn categories_text(&self) -> String {
        let list: Vec<String> = self.categories.iter().map(|c| format!("{c:?}")).collect();
        format!("categories {}", list.join(", "))
    }
}

/// Problems with the tokens file.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("tokens file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tokens file {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("{0}")]
    Refused(String),
}

/// One token as the file keeps it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub name: String,
    pub id: String,
    pub role: Role,
    #[serde(default)]
    pub counts_only: bool,
    /// The tag categories it may use; empty (or absent): every one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub categories: Vec<String>,
    /// When it was made, Unix ms.
    pub created_ms: i64,
    /// 16 random bytes, hex.
    pub salt: String,
    /// SHA-256 of the salt's bytes followed by the secret's text, hex.
    pub hash: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default, rename = "token")]
    tokens: Vec<Entry>,
}

/// Longest token name.
pub const MAX_NAME_BYTES: usize = 64;
/// Longest category a token names (the longest a tag may have).
pub const MAX_CATEGORY_BYTES: usize = crate::storage::writer::MAX_CATEGORY_BYTES;
const PREFIX: &str = "tst1_";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn digest(salt: &[u8], secret: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(secret.as_bytes());
    h.finalize().into()
}

fn random<const N: usize>() -> Result<[u8; N], AccessError> {
    let mut out = [0u8; N];
    getrandom::fill(&mut out).map_err(|e| {
        AccessError::Refused(format!("the operating system gave no random bytes: {e}"))
    })?;
    Ok(out)
}

/// Compares without stopping at the first difference.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// One accepted token: its grant, salt and hash.
#[derive(Debug)]
struct Known {
    grant: Arc<Grant>,
    salt: Vec<u8>,
    hash: Vec<u8>,
}

/// The tokens a server accepts, read from the tokens file.
#[derive(Debug, Default)]
pub struct Tokens {
    by_id: HashMap<String, Known>,
}

impl Tokens {
    /// Reads and checks the tokens file.
    pub fn load(path: &Path) -> Result<Tokens, AccessError> {
        let entries = read(path)?;
        let invalid = |reason: String| AccessError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let mut by_id = HashMap::new();
        for e in entries {
            let (Some(salt), Some(hash)) = (unhex(&e.salt), unhex(&e.hash)) else {
                return Err(invalid(format!(
                    "token {:?}: salt or hash is not hex",
                    e.name
                )));
            };
            if hash.len() != 32 {
                return Err(invalid(format!("token {:?}: hash is not 32 bytes", e.name)));
            }
            if !e.categories.is_empty() && e.role == Role::Admin {
                return Err(invalid(format!(
                    "token {:?}: an admin token cannot be limited to categories",
                    e.name
                )));
            }
            let grant = Arc::new(Grant {
                name: e.name.clone(),
                role: e.role,
                counts_only: e.counts_only,
                categories: e.categories.iter().cloned().collect(),
            });
            if by_id
                .insert(e.id.clone(), Known { grant, salt, hash })
                .is_some()
            {
                return Err(invalid(format!("two tokens have the id {:?}", e.id)));
            }
        }
        Ok(Tokens { by_id })
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// The grant of a presented token.
    pub fn check(&self, presented: &str) -> Result<Arc<Grant>, Refusal> {
        let unknown = || Refusal::Unknown("the token is not one this server accepts".into());
        let rest = presented.strip_prefix(PREFIX).ok_or_else(|| {
            Refusal::Unknown(format!("not a tagstore token (they start with {PREFIX})"))
        })?;
        let (id, secret) = rest.split_once('_').ok_or_else(unknown)?;
        let known = self.by_id.get(id).ok_or_else(unknown)?;
        if same(&digest(&known.salt, secret), &known.hash) {
            Ok(known.grant.clone())
        } else {
            Err(unknown())
        }
    }
}

fn read(path: &Path) -> Result<Vec<Entry>, AccessError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(AccessError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let file: File = toml::from_str(&text).map_err(|e| AccessError::Invalid {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(file.tokens)
}

/// Writes the file whole: a temporary file readable by its owner only,
/// synced, renamed over the old one.
fn write(path: &Path, entries: Vec<Entry>) -> Result<(), AccessError> {
    let io = |source| AccessError::Io {
        path: path.to_path_buf(),
        source,
    };
    let text = toml::to_string(&File { tokens: entries })
        .map_err(|e| AccessError::Refused(format!("cannot write the tokens: {e}")))?;
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(&tmp).map_err(io)?;
    f.write_all(
        b"# tagstore API tokens: managed by `tagstore token add|list|revoke`.\n\
          # Only salted hashes are kept; a lost token cannot be recovered, only revoked.\n",
    )
    .and_then(|_| f.write_all(text.as_bytes()))
    .and_then(|_| f.sync_all())
    .map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(())
}

/// Makes a token named `name` and adds it to the file (created if
/// missing). Returns the token: shown once, kept nowhere.
pub fn add(
    path: &Path,
    name: &str,
    role: Role,
    counts_only: bool,
    categories: &[String],
    now_ms: i64,
) -> Result<String, AccessError> {
    if !categories.is_empty() && role == Role::Admin {
        return Err(AccessError::Refused(
            "an admin token manages tags and fields of every category: it cannot be limited to some"
                .into(),
        ));
    }
    if let Some(c) = categories
        .iter()
        .find(|c| c.is_empty() || c.len() > MAX_CATEGORY_BYTES)
    {
        return Err(AccessError::Refused(format!(
            "category {c:?}: 1 to {MAX_CATEGORY_BYTES} bytes"
        )));
    }
    if name.is_empty()
        || name.len() > MAX_NAME_BYTES
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b))
    {
        return Err(AccessError::Refused(format!(
            "token name {name:?}: 1 to {MAX_NAME_BYTES} letters, digits, -, _, . or @"
        )));
    }
    let mut entries = read(path)?;
    if entries.iter().any(|e| e.name == name) {
        return Err(AccessError::Refused(format!(
            "a token named {name:?} exists; revoke it first"
        )));
    }
    let id = hex(&random::<8>()?);
    let secret = hex(&random::<32>()?);
    let salt = random::<16>()?;
    entries.push(Entry {
        name: name.to_string(),
        id: id.clone(),
        role,
        counts_only,
        categories: categories.to_vec(),
        created_ms: now_ms,
        salt: hex(&salt),
        hash: hex(&digest(&salt, &secret)),
    });
    write(path, entries)?;
    Ok(format!("{PREFIX}{id}_{secret}"))
}

/// The tokens in the file (no secrets: there are none to show).
pub fn list(path: &Path) -> Result<Vec<Entry>, AccessError> {
    read(path)
}

/// Removes the token named `name`; false if there is none.
pub fn revoke(path: &Path, name: &str) -> Result<bool, AccessError> {
    let mut entries = read(path)?;
    let before = entries.len();
    entries.retain(|e| e.name != name);
    if entries.len() == before {
        return Ok(false);
    }
    write(path, entries)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_made_checked_and_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        let reader = add(&path, "analyst", Role::Read, true, &[], 1).unwrap();
        let admin = add(&path, "ops@brand", Role::Admin, false, &[], 2).unwrap();
        assert!(add(&path, "analyst", Role::Write, false, &[], 3).is_err());
        assert!(add(&path, "bad name", Role::Write, false, &[], 3).is_err());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            !text.contains(&reader[PREFIX.len() + 17..]),
            "no secret kept"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }

        let tokens = Tokens::load(&path).unwrap();
        assert_eq!(tokens.len(), 2);
        let g = tokens.check(&reader).unwrap();
        assert_eq!(
            (g.name.as_str(), g.role, g.counts_only),
            ("analyst", Role::Read, true)
        );
        assert_eq!(tokens.check(&admin).unwrap().role, Role::Admin);
        // A changed secret, an unknown id, no prefix.
        let mut wrong = reader.clone();
        let last = wrong.pop().unwrap();
        wrong.push(if last == '0' { '1' } else { '0' });
        assert!(matches!(tokens.check(&wrong), Err(Refusal::Unknown(_))));
        assert!(tokens.check("tst1_00_11").is_err());
        assert!(tokens.check("Bearer x").is_err());

        assert!(revoke(&path, "analyst").unwrap());
        assert!(!revoke(&path, "analyst").unwrap());
        let tokens = Tokens::load(&path).unwrap();
        assert!(tokens.check(&reader).is_err());
        assert!(tokens.check(&admin).is_ok());
        assert_eq!(list(&path).unwrap().len(), 1);
    }

    #[test]
    fn roles_nest_and_counts_only_reads_no_one() {
        let g = |role, counts_only| Grant {
            name: "t".into(),
            role,
            counts_only,
            categories: BTreeSet::new(),
        };
        assert!(g(Role::Read, false).allows("Count").is_ok());
        assert!(g(Role::Read, false).allows("Export").is_ok());
        assert!(g(Role::Read, true).allows("Export").is_err());
        assert!(g(Role::Read, true).allows("Count").is_ok());
        assert!(g(Role::Read, false).allows("Update").is_err());
        assert!(g(Role::Write, false).allows("Update").is_ok());
        assert!(g(Role::Write, false).allows("DropTag").is_err());
        assert!(g(Role::Admin, false).allows("DropTag").is_ok());
        assert!(g(Role::Admin, false).allows("NoSuchCall").is_err());
    }

    #[test]
    fn a_token_limited_to_categories_is_refused_calls_that_reach_every_one() {
        let g = Grant {
            name: "crm".into(),
            role: Role::Write,
            counts_only: false,
            categories: ["消费偏好".to_string()].into(),
        };
        assert!(g.allows("Count").is_ok());
        assert!(g.allows("Update").is_ok());
        assert!(g.allows("Stats").is_ok());
        assert!(g.allows("Ingest").is_err());
        assert!(g.allows("Link").is_err());
        assert!(g.may_use("消费偏好") && !g.may_use("价值") && !g.may_use(""));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        let admin = add(&path, "boss", Role::Admin, false, &["x".into()], 1);
        assert!(admin.is_err());
        let long = "x".repeat(MAX_CATEGORY_BYTES + 1);
        assert!(add(&path, "crm", Role::Read, false, &[long], 1).is_err());
        let t = add(&path, "crm", Role::Read, false, &["消费偏好".into()], 1).unwrap();
        let tokens = Tokens::load(&path).unwrap();
        let grant = tokens.check(&t).unwrap();
        assert_eq!(grant.categories, ["消费偏好".to_string()].into());
        // A hand-edited file giving an admin token categories is refused.
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("\"read\"", "\"admin\"");
        std::fs::write(&path, text).unwrap();
        assert!(Tokens::load(&path).is_err());
    }

    /// Every method of the service has a rule: a new call fails here until
    /// it is given one.
    #[test]
    fn every_call_of_the_proto_has_a_rule() {
        use prost::Message;
        let set =
            prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET).unwrap();
        let methods: Vec<String> = set
            .file
            .iter()
            .flat_map(|f| &f.service)
            .filter(|s| s.name() == "TagStore")
            .flat_map(|s| &s.method)
            .map(|m| m.name().to_string())
            .collect();
        assert!(methods.len() > 20, "{methods:?}");
        for m in &methods {
            assert!(rule_for(m).is_some(), "{m} has no access rule");
            assert!(METHODS.contains(&m.as_str()), "{m} is not in METHODS");
        }
        assert_eq!(
            METHODS.len(),
            methods.len(),
            "METHODS names a call the proto has not"
        );
    }
}
