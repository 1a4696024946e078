//! The built-in sources: mappings for the exports of the channels a brand
//! in China sells through (Taobao/Tmall, JD and Pinduoduo orders; WeChat,
//! Douyin and Weibo interactions; store POS receipts and visits). Each is a
//! definition in the same TOML a user writes (`presets/*.toml`), so a
//! preset can be described, copied and changed like any source.
//!
//! This room owns the preset texts and nothing else.

/// Every preset: its name and its definition.
pub const PRESETS: &[(&str, &str)] = &[
    ("taobao_orders", include_str!("presets/taobao_orders.toml")),
    ("jd_orders", include_str!("presets/jd_orders.toml")),
    ("pdd_orders", include_str!("presets/pdd_orders.toml")),
    (
        "wechat_interactions",
        include_str!("presets/wechat_interactions.toml"),
    ),
    (
        "douyin_interactions",
        include_str!("presets/douyin_interactions.toml"),
    ),
    (
        "weibo_interactions",
        include_str!("presets/weibo_interactions.toml"),
    ),
    ("pos_orders", include_str!("presets/pos_orders.toml")),
    ("store_visits", include_str!("presets/store_visits.toml")),
];

/// The definition of the preset called `name`.
pub fn preset(name: &str) -> Option<&'static str> {
    PRESETS.iter().find(|(n, _)| *n == name).map(|(_, d)| *d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::source::Source;

    #[test]
    fn every_preset_is_a_valid_source() {
        for (name, def) in PRESETS {
            let s = Source::parse(name, def).unwrap_or_else(|e| panic!("{e}"));
            assert!(!s.description.is_empty(), "{name}");
        }
    }
}
