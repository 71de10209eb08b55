//! The arbiter on a real 3-member etcd cluster (Debian's `etcd`, on 127.0.0.1): the same
//! semantics table as the standalone arbiter, racing claimants, member failures and quorum
//! loss, re-pair, and authentication. Needs `etcd` installed (`scripts/install-deps`); the
//! tests fail, not skip, without it.

mod common;

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use arbiter::etcd::{BlockingEtcdClient, Credentials, EtcdError};
use arbiter::{ErrorCode, Outcome};
use common::etcd_cluster::EtcdCluster;
use common::semantics::run_table;
use etcd_client::{Permission, PermissionType};

/// Both backends, side by side, through the same table; and a VM cleared on etcd stays
/// retired for a claimant that reconnects.
#[test]
fn semantics_table_is_the_same_on_etcd_and_the_standalone_arbiter() {
    let tmp = tempfile::tempdir().unwrap();
    let standalone = common::Arbiter::start(&tmp.path().join("data"));
    let cluster = EtcdCluster::start(3);
    run_table("standalone", &standalone.client(), "table-vm");
    let etcd = cluster.client(None);
    run_table("etcd", &etcd, "table-vm");

    // Re-pair over several generations, the winner alternating, with a fresh client for
    // each side as the VMM would have after a restart.
    let mut generation = 1;
    let vm = "repair-vm";
    for round in 0..6 {
        let (winner, loser) = if round % 2 == 0 {
            ("x", "y")
        } else {
            ("y", "x")
        };
        let side = cluster.client(None);
        assert_eq!(
            side.test_and_set(vm, winner, generation).unwrap().outcome,
            Outcome::Won
        );
        let lost = etcd.test_and_set(vm, loser, generation).unwrap();
        assert_eq!(
            (lost.outcome, lost.holder.as_deref()),
            (Outcome::Lost, Some(winner))
        );
        let next = side.re_pair(vm, winner, generation).unwrap().generation;
        assert_eq!(next, generation + 1);
        let stale = etcd.test_and_set(vm, loser, generation).unwrap();
        assert_eq!((stale.outcome, stale.generation), (Outcome::Stale, next));
        generation = next;
    }
    let entry = etcd.get(vm).unwrap().unwrap();
    assert_eq!((entry.generation, entry.holder), (7, None));
    assert_eq!(entry.opened_by.as_deref(), Some("y"));

    // What is in etcd is what `list` shows, under the prefix.
    let list = etcd.list().unwrap();
    let names: Vec<_> = list.vms.iter().map(|e| e.vm.as_str()).collect();
    assert_eq!(names, ["repair-vm", "table-vm"]);
    assert!(list.cleared.is_empty());
    assert_eq!(etcd.clear(vm).unwrap().unwrap().generation, 7);
    let list = cluster.client(None).list().unwrap();
    assert_eq!(list.cleared.len(), 1);
    assert_eq!(list.cleared[0].retired_generation, 7);
    assert_eq!(
        cluster
            .client(None)
            .test_and_set(vm, "x", 7)
            .unwrap()
            .outcome,
        Outcome::Stale
    );
}

/// Many claimants, each with its own connection, race for each of several VMs: exactly one
/// wins each, and everyone is told the same holder.
#[test]
fn racing_claimants_have_exactly_one_winner() {
    const CLAIMANTS: usize = 8;
    const ROUNDS: usize = 12;
    let cluster = EtcdCluster::start(3);
    let barrier = Arc::new(Barrier::new(CLAIMANTS));
    let started = Instant::now();
    let threads: Vec<_> = (0..CLAIMANTS)
        .map(|t| {
            let client = cluster.client(None);
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                (0..ROUNDS)
                    .map(|round| {
                        barrier.wait();
                        let vm = format!("race-{round}");
                        let answer = client
                            .test_and_set(&vm, &format!("c{t}"), 1 + round as u64)
                            .unwrap_or_else(|e| panic!("claimant {t}, round {round}: {e}"));
                        (answer.outcome, answer.holder.unwrap())
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let answers: Vec<Vec<_>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    for round in 0..ROUNDS {
        let winners: Vec<usize> = (0..CLAIMANTS)
            .filter(|&t| answers[t][round].0 == Outcome::Won)
            .collect();
        assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
        let holder = format!("c{}", winners[0]);
        for (t, a) in answers.iter().enumerate() {
            assert_eq!(a[round].1, holder, "claimant {t}, round {round}");
            if t != winners[0] {
                assert_eq!(a[round].0, Outcome::Lost);
            }
        }
    }
    eprintln!(
        "{CLAIMANTS} claimants x {ROUNDS} rounds in {:?}",
        started.elapsed()
    );
}

/// One member down: claims still settle. Two down: nobody wins, every call fails within its
/// bound; the claimant that keeps asking wins once the quorum is back.
#[test]
fn claims_need_a_quorum_and_settle_when_it_returns() {
    let mut cluster = EtcdCluster::start(3);
    let a = cluster.client(None);
    assert_eq!(a.test_and_set("q0", "a", 1).unwrap().outcome, Outcome::Won);

    cluster.kill(0);
    let t = Instant::now();
    assert_eq!(a.test_and_set("q1", "a", 1).unwrap().outcome, Outcome::Won);
    let b = cluster.client(None);
    let lost = b.test_and_set("q1", "b", 1).unwrap();
    assert_eq!(
        (lost.outcome, lost.holder.as_deref()),
        (Outcome::Lost, Some("a"))
    );
    eprintln!(
        "with one member down, two claims settled in {:?}",
        t.elapsed()
    );
    // Every claim settles, not just the first: `a` first talked to the member now dead,
    // and a client that kept sending to it (a balanced channel does) lost claims here.
    let t = Instant::now();
    for i in 0..20 {
        let vm = format!("down-{i}");
        let won = a
            .test_and_set(&vm, "a", 1)
            .unwrap_or_else(|e| panic!("claim {i} with one member down: {e}"));
        assert_eq!(won.outcome, Outcome::Won, "claim {i}");
    }
    eprintln!(
        "with one member down, 20 more claims settled in {:?}",
        t.elapsed()
    );

    cluster.kill(1);
    // Every attempt: at most 3 x 1.5 s plus backoff; allow slack for a loaded machine.
    let bound = Duration::from_secs(12);
    for claimant in ["b", "c"] {
        let t = Instant::now();
        let err = b
            .test_and_set("q2", claimant, 1)
            .expect_err("no quorum, no decision");
        assert!(matches!(err, EtcdError::Unavailable { .. }), "{err}");
        assert!(t.elapsed() < bound, "took {:?}", t.elapsed());
        eprintln!(
            "without quorum, {claimant} was refused in {:?}: {err}",
            t.elapsed()
        );
    }

    // The surviving member itself answers, but decides nothing without a quorum.
    let mut config = cluster.config(None);
    config.endpoints = vec![format!("http://{}", cluster.endpoints()[2])];
    let survivor = BlockingEtcdClient::connect(config).unwrap();
    let t = Instant::now();
    let err = survivor.test_and_set("q2", "d", 1).expect_err("no quorum");
    assert!(matches!(err, EtcdError::Unavailable { .. }), "{err}");
    assert!(!err.to_string().contains("connect"), "{err}");
    assert!(t.elapsed() < bound, "took {:?}", t.elapsed());
    eprintln!("the survivor refused in {:?}: {err}", t.elapsed());

    // b keeps asking (bounded), the members come back meanwhile.
    let keeps_asking = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(40);
        let mut failures = 0;
        for _ in 0..200 {
            match b.test_and_set("q2", "b", 1) {
                Ok(answer) => return (answer, failures),
                Err(e) => {
                    assert!(matches!(e, EtcdError::Unavailable { .. }), "{e}");
                    failures += 1;
                }
            }
            assert!(Instant::now() < deadline, "no quorum after 40 s");
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("200 attempts without an answer");
    });
    std::thread::sleep(Duration::from_secs(1));
    cluster.restart(0);
    cluster.restart(1);
    let (answer, failures) = keeps_asking.join().unwrap();
    assert_eq!(answer.outcome, Outcome::Won, "{answer:?}");
    assert!(failures >= 1, "the claim settled while the quorum was lost");
    eprintln!("b won after {failures} failed calls");
    let c = cluster.client(None);
    let lost = c.test_and_set("q2", "c", 1).unwrap();
    assert_eq!(
        (lost.outcome, lost.holder.as_deref()),
        (Outcome::Lost, Some("b"))
    );
    // The earlier decisions survived the failures.
    assert_eq!(c.get("q0").unwrap().unwrap().holder.as_deref(), Some("a"));
    assert_eq!(c.get("q1").unwrap().unwrap().holder.as_deref(), Some("a"));
}

/// Authentication on: a root user with the root role administers, the arbiter's user has a
/// role limited to the prefix. A wrong password, no credentials, or a role without write
/// access are clear errors at start-up (connect / check), never a claim.
#[test]
fn authentication_with_root_and_a_prefix_role() {
    // Auth tokens expire after 1 s idle: the client must renew them on its own.
    let cluster = EtcdCluster::start_with(3, &std::env::temp_dir(), &["--auth-token-ttl", "1"]);
    let root_password = "root-pw-5d1e";
    let twinvm_password = "twinvm:pw-9c2a";
    let prefix = arbiter::etcd::DEFAULT_PREFIX;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let endpoints: Vec<String> = cluster
            .endpoints()
            .iter()
            .map(|e| format!("http://{e}"))
            .collect();
        let mut admin = etcd_client::Client::connect(&endpoints, None)
            .await
            .unwrap();
        admin.user_add("root", root_password, None).await.unwrap();
        admin.role_add("root").await.unwrap();
        admin.user_grant_role("root", "root").await.unwrap();
        admin.role_add("twinvm-arbiter").await.unwrap();
        admin
            .role_grant_permission(
                "twinvm-arbiter",
                Permission::new(PermissionType::Readwrite, prefix).with_prefix(),
            )
            .await
            .unwrap();
        admin
            .user_add("twinvm", twinvm_password, None)
            .await
            .unwrap();
        admin
            .user_grant_role("twinvm", "twinvm-arbiter")
            .await
            .unwrap();
        admin.role_add("reader").await.unwrap();
        admin
            .role_grant_permission(
                "reader",
                Permission::new(PermissionType::Read, prefix).with_prefix(),
            )
            .await
            .unwrap();
        admin.user_add("reader", "reader-pw", None).await.unwrap();
        admin.user_grant_role("reader", "reader").await.unwrap();
        admin.auth_enable().await.unwrap();
    });

    // The arbiter's user, from a credentials file as the VMM reads it.
    let creds_file = cluster.dir().join("arbiter.credentials");
    std::fs::write(&creds_file, format!("twinvm:{twinvm_password}\n")).unwrap();
    let creds = Credentials::from_file(&creds_file).unwrap();
    let twinvm = cluster.client(Some(creds.clone()));
    assert_eq!(twinvm.check("auth-vm").unwrap(), None);
    assert_eq!(
        twinvm.test_and_set("auth-vm", "a", 1).unwrap().outcome,
        Outcome::Won
    );
    assert!(twinvm.check("auth-vm").unwrap().is_some());

    // A wrong password fails at connect, at once, saying so.
    let t = Instant::now();
    let err = BlockingEtcdClient::connect(
        cluster.config(Some(Credentials::new("twinvm", "wrong-password"))),
    )
    .expect_err("wrong password");
    let message = err.to_string();
    assert!(matches!(err, EtcdError::AuthFailed { .. }), "{message}");
    assert!(
        message.contains("authentication failed") && message.contains("\"twinvm\""),
        "{message}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    eprintln!("wrong password: {message}");

    // No credentials on a cluster that wants them.
    let anonymous = cluster.client(None);
    let err = anonymous.check("auth-vm").expect_err("no credentials");
    assert!(matches!(err, EtcdError::AuthFailed { .. }), "{err}");
    eprintln!("no credentials: {err}");
    assert!(anonymous.test_and_set("auth-vm", "b", 1).is_err());

    // A user that may read but not write the prefix is caught by the start-up check.
    let reader = cluster.client(Some(Credentials::new("reader", "reader-pw")));
    let err = reader.check("auth-vm").expect_err("read-only role");
    assert!(matches!(err, EtcdError::PermissionDenied { .. }), "{err}");
    eprintln!("read-only role: {err}");

    // A key outside the role's prefix is denied to the arbiter's user.
    let mut config = cluster.config(Some(creds));
    config.prefix = "/elsewhere/".into();
    let outside = BlockingEtcdClient::connect(config).unwrap();
    assert!(matches!(
        outside.check("auth-vm"),
        Err(EtcdError::PermissionDenied { .. })
    ));

    // Idle past the token's lifetime (as a VMM is between failovers): still answered.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        twinvm.test_and_set("auth-vm", "a", 1).unwrap().outcome,
        Outcome::Won
    );

    // Root sees the decision, and a second claimant loses it.
    let root = cluster.client(Some(Credentials::new("root", root_password)));
    let entry = root.get("auth-vm").unwrap().unwrap();
    assert_eq!(entry.holder.as_deref(), Some("a"));
    let lost = root.test_and_set("auth-vm", "b", 1).unwrap();
    assert_eq!(lost.outcome, Outcome::Lost);
    assert_eq!(
        root.test_and_set("auth-vm", "b", 2).unwrap_err().code(),
        Some(ErrorCode::FutureGeneration)
    );
}
