use super::*;

#[test]
fn items_round_trip_with_and_without_counts() {
    let full = Receipt { code: ErrorCode::OK, read: Some(3), unread: Some(4) };
    let none = Receipt { code: ErrorCode::NO_RECEIPT, read: None, unread: None };
    let lifetimes = Agreed {
        ttl: Duration::from_secs(1),
        negative_ttl: Duration::from_secs(1),
        stale: Duration::from_secs(60),
        claim: Duration::from_secs(3),
        cohort_memory: Duration::from_secs(4),
        neighbourhood: 50,
        callback_ttl: Duration::from_secs(10),
        fetched: KeptBy::Polling,
    };
    for r in [full, none] {
        for kept_by in [KeptBy::Polling, KeptBy::Callbacks] {
            let value = format!("1700,{}", encode(&r, kept_by, lifetimes));
            assert_eq!(decode(&value), Some((1700, r, kept_by)), "{value}");
        }
    }
    assert_eq!(encode(&full, KeptBy::Callbacks, lifetimes), "0,3,4,c10000");
    assert_eq!(decode("x,0,1,2"), None);
    assert_eq!(decode("1,0,1"), None);
    assert_eq!(decode("1,0,1,2,9"), None);
}

#[test]
fn every_key_of_a_group_shares_one_hash_tag() {
    let g = GroupId::parse("@TGS#2T{T}").unwrap();
    let key = group_key("rg", AppId(7), &g);
    assert_eq!(key, "rg:{7:@TGS#2T{T}}");
    // Redis hashes what lies between the first { and the next }: the same for every key.
    let tag = |k: &str| k[k.find('{').unwrap() + 1..].split('}').next().unwrap().to_owned();
    assert_eq!(tag(&format!("{key}:items")), tag(&format!("{key}:lease")));
}

#[test]
fn a_claim_reply_is_read_into_items_roles_and_times() {
    use redis::Value;
    let now = Instant::now();
    let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
    let reply = [
        Value::Int(10_000),
        bulk(""),
        bulk("9000,0,1,2"),
        bulk(""),
        bulk("2000,0,5,5"),
        bulk("fmw"),
        Value::Int(10_300),
    ];
    let seqs = [MsgSeq(1), MsgSeq(2), MsgSeq(3)];

    let claim = decode_claim(&reply, &seqs, now).unwrap();

    assert_eq!((claim.mine, claim.wait), (vec![MsgSeq(2)], vec![MsgSeq(3)]));
    assert_eq!(claim.items.len(), 2);
    assert_eq!(claim.items[0].1.fetched_at, now - Duration::from_millis(1000));
    assert!(claim.items[0].1.fresh && !claim.items[1].1.fresh);
    assert_eq!(claim.retry_at, Some(now + Duration::from_millis(300)));
    let group = decode_claim(&[Value::Int(10_000), bulk("9500,10010,gone, really")], &seqs, now).unwrap();
    assert_eq!(
        group.group,
        Some((ErrorCode::GROUP_NOT_FOUND, "gone, really".into(), now - Duration::from_millis(500)))
    );
}
