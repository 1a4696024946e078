//! A short client: creates tags, writes memberships, and asks questions.
//!
//! Start a server (`cargo run --release -- serve`), then:
//! `cargo run --example quickstart [-- http://127.0.0.1:7420]`

use tagstore::proto::tag_store_client::TagStoreClient;
use tagstore::proto::{
    CountRequest, CreateTagRequest, MembersRequest, Mutation, ProfileRequest, UpdateRequest,
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "http://127.0.0.1:7420".into());
    let mut client = TagStoreClient::connect(addr).await?;

    for (name, category) in [
        ("高价值用户", "价值"),
        ("常购护肤品", "偏好"),
        ("尝试新品", "偏好"),
        ("潜在流失", "生命周期"),
    ] {
        client
            .create_tag(CreateTagRequest {
                name: name.into(),
                category: category.into(),
                if_not_exists: true,
                ..Default::default()
            })
            .await?;
    }

    let m = |tag: &str, add: &[&str]| Mutation {
        tag: tag.into(),
        add: add.iter().map(|s| s.to_string()).collect(),
        remove: vec![],
        ..Default::default()
    };
    let r = client
        .update(UpdateRequest {
            mutations: vec![
                m(
                    "高价值用户",
                    &["phone:13800001111", "wechat:oX9a01", "jd:pin_7781"],
                ),
                m("常购护肤品", &["phone:13800001111", "jd:pin_7781"]),
                m("尝试新品", &["wechat:oX9a01"]),
                m("潜在流失", &["jd:pin_7781"]),
            ],
            create_missing_tags: false,
        })
        .await?
        .into_inner();
    println!(
        "update: {} added, {} new customers, lsn {}",
        r.added, r.new_customers, r.lsn
    );

    let query = "高价值用户 AND (常购护肤品 OR 尝试新品) AND NOT 潜在流失";
    let counts = client
        .count(CountRequest {
            queries: vec![query.into(), "ALL".into()],
            as_of: None,
        })
        .await?
        .into_inner()
        .counts;
    println!("count({query}) = {}; ALL = {}", counts[0], counts[1]);

    let page = client
        .members(MembersRequest {
            query: query.into(),
            limit: 10,
            cursor: String::new(),
            ..Default::default()
        })
        .await?
        .into_inner();
    println!("members: {:?}", page.customers);

    let profile = client
        .profile(ProfileRequest {
            customer: "jd:pin_7781".into(),
            recent_days: 0,
        })
        .await?
        .into_inner();
    println!("profile of jd:pin_7781: {:?}", profile.tags);

    // A query error names the position.
    if let Err(status) = client
        .count(CountRequest {
            queries: vec!["高价值用户 AND (".into()],
            as_of: None,
        })
        .await
    {
        println!("error: {:?} {}", status.code(), status.message());
    }
    Ok(())
}
