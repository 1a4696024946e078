//! Seeded data sets: which customers carry which tag. The same seed gives
//! the same data on every machine, so runs can be compared over time.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// One tag of a data set.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TagSpec {
    pub name: String,
    /// Fraction of the customers in `range` that carry the tag.
    pub density: f64,
    /// The id range the members come from (a sign-up cohort when narrower than all).
    pub range: (u32, u32),
}

impl TagSpec {
    pub fn expected_members(&self) -> u64 {
        ((self.range.1 - self.range.0) as f64 * self.density) as u64
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DataSet {
    pub customers: u32,
    pub seed: u64,
    pub tags: Vec<TagSpec>,
}

const WORDS: &[&str] = &[
    "高价值用户",
    "常购护肤品",
    "尝试新品",
    "潜在流失",
    "社交活跃",
    "母婴人群",
    "夜猫子",
    "价格敏感",
    "品牌忠诚",
    "直播观众",
    "会员日活跃",
    "彩妆爱好者",
    "男士护理",
    "送礼需求",
    "学生党",
    "白领",
    "一线城市",
    "小程序用户",
    "门店常客",
    "优惠券达人",
];

/// The key of customer `id`, as a client would send it.
pub fn customer_key(id: u32) -> String {
    format!("phone:1{id:010}")
}

impl DataSet {
    /// A realistic mix: one tag every customer carries (registered members),
    /// a few dense tags (30–60%), cohort tags clustered in id ranges, and
    /// many sparse tags (0.01–5%, log-uniform). Chinese and ASCII names.
    pub fn realistic(customers: u32, tags: usize, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let all = (0, customers);
        let mut out = Vec::with_capacity(tags);
        for t in 0..tags {
            let name = if t == 0 {
                "注册会员".to_string()
            } else if t % 2 == 1 {
                format!("{}_{t:03}", WORDS[t % WORDS.len()])
            } else {
                format!("tag_{t:03}")
            };
            let (density, range) = match t {
                0 => (1.0, all),
                _ if t % 40 == 1 => (rng.random_range(0.30..0.60), all),
                _ if t % 10 == 3 => {
                    // A sign-up cohort: 2–10% of the id space, half of it tagged.
                    let width = (customers as f64 * rng.random_range(0.02..0.10)) as u32;
                    let start = rng.random_range(0..customers.saturating_sub(width).max(1));
                    (0.5, (start, start + width.max(1)))
                }
                _ => (10f64.powf(rng.random_range(-4.0..-1.3)), all),
            };
            out.push(TagSpec {
                name,
                density,
                range,
            });
        }
        Self {
            customers,
            seed,
            tags: out,
        }
    }

    /// The members of tag `t`, ascending, by gap sampling (cost proportional
    /// to the members, not to the customers).
    pub fn members(&self, t: usize) -> Vec<u32> {
        let spec = &self.tags[t];
        let (lo, hi) = spec.range;
        if spec.density >= 1.0 {
            return (lo..hi).collect();
        }
        let mut rng =
            StdRng::seed_from_u64(self.seed ^ (t as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let ln_q = (1.0 - spec.density).ln();
        let mut out = Vec::with_capacity(spec.expected_members() as usize + 16);
        let mut id = lo as f64 - 1.0;
        loop {
            let u: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
            id += 1.0 + (u.ln() / ln_q).floor();
            if id >= hi as f64 {
                return out;
            }
            out.push(id as u32);
        }
    }

    pub fn total_memberships(&self) -> u64 {
        self.tags.iter().map(TagSpec::expected_members).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn densities_come_out_right_and_are_repeatable() {
        let d = DataSet::realistic(200_000, 50, 1);
        for t in 0..d.tags.len() {
            let m = d.members(t);
            assert!(m.windows(2).all(|w| w[0] < w[1]));
            let expect = d.tags[t].expected_members() as f64;
            let got = m.len() as f64;
            assert!(
                (got - expect).abs() <= 5.0 * expect.sqrt() + 5.0,
                "tag {t}: {got} vs {expect}"
            );
            assert!(
                m.iter()
                    .all(|&id| id >= d.tags[t].range.0 && id < d.tags[t].range.1)
            );
        }
        assert_eq!(d.members(7), DataSet::realistic(200_000, 50, 1).members(7));
        assert_eq!(d.members(0).len(), 200_000);
    }
}
