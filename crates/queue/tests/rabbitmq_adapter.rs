//! What the RabbitMQ adapter does beyond the port's conformance suite: topology declaration,
//! configuration errors, deleted queues, and connection loss (through a TCP proxy that the test
//! cuts). Uses the dev broker (`NIGHTSHIFT_QUEUE__URL` overrides it); each test has its own
//! queue prefix and deletes its queues at the end.

mod common;

use common::{Proxy, broker_url, through_proxy};
use std::time::{Duration, Instant};

use bytes::Bytes;
use nightshift_core::secret::Secret;
use nightshift_queue::conformance::WAIT;
use nightshift_queue::{
    Consumer, Delivery, Headers, QueueConfig, QueueError, QueueKind, RabbitQueue, WorkQueue,
};
use tokio::net::TcpListener;

fn config(url: &str) -> QueueConfig {
    QueueConfig {
        url: Secret::new(url),
        prefix: format!("test-{}", uuid::Uuid::new_v4()),
        delivery_limit: 3,
        connect_timeout: Duration::from_secs(3),
        operation_timeout: Duration::from_secs(3),
        ..QueueConfig::default()
    }
}

async fn cleanup(queue: RabbitQueue) {
    queue.delete_all().await.expect("cleanup");
    queue.close().await.expect("close");
}

async fn next(consumer: &mut dyn Consumer) -> Delivery {
    match tokio::time::timeout(WAIT, consumer.next()).await {
        Ok(Some(Ok(delivery))) => delivery,
        other => panic!("expected a delivery, got {other:?}"),
    }
}

/// Waits until the consumer ends (`None`, possibly after an error).
async fn ended(consumer: &mut dyn Consumer) {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, consumer.next()).await {
            Ok(None) => return,
            Ok(Some(Err(_))) => continue,
            Ok(Some(Ok(delivery))) => panic!("unexpected {delivery:?}"),
            Err(_) => panic!("the consumer did not end within {WAIT:?}"),
        }
    }
}

fn text(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

#[tokio::test]
async fn declaring_again_is_idempotent_but_a_changed_limit_is_refused() {
    let first_config = config(&broker_url());
    let first = RabbitQueue::connect(&first_config).await.expect("connect");
    first
        .publish(QueueKind::ChunkTasks, text("kept"), Headers::new())
        .await
        .expect("publish");

    // Same arguments: the queues, and what they hold, are kept.
    let second = RabbitQueue::connect(&first_config)
        .await
        .expect("redeclare");
    let mut consumer = second
        .consume(QueueKind::ChunkTasks, 1)
        .await
        .expect("consume");
    next(consumer.as_mut()).await.ack().await.expect("ack");
    drop(consumer);
    second.close().await.expect("close");

    let changed = QueueConfig {
        delivery_limit: first_config.delivery_limit + 1,
        ..first_config
    };
    match RabbitQueue::connect(&changed).await {
        Err(QueueError::Config(message)) => {
            assert!(message.contains("delivery_limit"), "{message}")
        }
        other => panic!("expected a config error, got {other:?}"),
    }
    cleanup(first).await;
}

#[tokio::test]
async fn deleted_queues_end_consumers_and_refuse_messages() {
    let queue = RabbitQueue::connect(&config(&broker_url()))
        .await
        .expect("connect");
    let mut consumer = queue
        .consume(QueueKind::FinalizeJobs, 1)
        .await
        .expect("consume");
    queue.delete_all().await.expect("delete");
    ended(consumer.as_mut()).await;
    // Unroutable, and said so: never a silent drop.
    match queue
        .publish(QueueKind::FinalizeJobs, text("lost?"), Headers::new())
        .await
    {
        Err(QueueError::Rejected(_)) => {}
        other => panic!("expected Rejected, got {other:?}"),
    }
    assert!(matches!(
        queue.depth(QueueKind::FinalizeJobs).await,
        Err(QueueError::Config(_))
    ));
    assert!(queue.consume(QueueKind::FinalizeJobs, 1).await.is_err());
    // None of that broke the connection.
    queue.ping().await.expect("ping");
    assert_eq!(queue.reconnects(), 0);
    cleanup(queue).await;
}

#[tokio::test]
async fn an_unanswering_broker_fails_within_connect_timeout() {
    // Accepts connections and never says a word.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let mut silent_config = config(&format!("amqp://guest:guest@{addr}/%2f"));
    silent_config.connect_timeout = Duration::from_millis(300);
    let started = Instant::now();
    match RabbitQueue::connect(&silent_config).await {
        Err(QueueError::Unavailable(_)) => {}
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(3));
    silent.abort();
}

#[tokio::test]
async fn a_bad_url_is_a_config_error_that_hides_the_password() {
    let bad = config("amqp://guest:hunter2@127.0.0.1:notaport/%2f");
    match RabbitQueue::connect(&bad).await {
        Err(e @ QueueError::Config(_)) => assert!(!e.to_string().contains("hunter2")),
        other => panic!("expected a config error, got {other:?}"),
    }
}

#[tokio::test]
async fn recovers_after_the_connection_is_lost() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let (upstream, url) = through_proxy(listener.local_addr().expect("addr"));
    let proxy = Proxy::start(listener, upstream);
    let kind = QueueKind::ChunkTasks;
    let queue = RabbitQueue::connect(&config(&url)).await.expect("connect");

    queue
        .publish(kind, text("before"), Headers::new())
        .await
        .expect("publish");
    let mut consumer = queue.consume(kind, 10).await.expect("consume");
    let stale = next(consumer.as_mut()).await;

    proxy.cut();
    // The consumer of the lost connection ends; its delivery can no longer be settled.
    ended(consumer.as_mut()).await;
    assert!(matches!(
        stale.ack().await,
        Err(QueueError::DeliveryLost(_))
    ));
    drop(consumer);

    // The next calls reconnect, and the unacked message is still there.
    queue.ping().await.expect("ping reconnects");
    assert_eq!(queue.reconnects(), 1);
    queue
        .publish(kind, text("after"), Headers::new())
        .await
        .expect("publish");
    let mut consumer = queue.consume(kind, 10).await.expect("consume again");
    let mut got = Vec::new();
    for _ in 0..2 {
        let delivery = next(consumer.as_mut()).await;
        let payload = String::from_utf8_lossy(&delivery.payload).into_owned();
        if payload == "before" {
            assert!(
                delivery.redelivered && delivery.delivery_count >= 1,
                "{delivery:?}"
            );
        }
        got.push(payload);
        delivery.ack().await.expect("ack");
    }
    got.sort();
    assert_eq!(got, ["after", "before"]);
    drop(consumer);

    // While the broker cannot be reached, readiness says so (within the timeouts), and comes
    // back with the broker.
    proxy.set_open(false);
    proxy.cut();
    for _ in 0..2 {
        let started = Instant::now();
        match queue.ping().await {
            Err(QueueError::Unavailable(_)) => {}
            other => panic!("expected Unavailable, got {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(8));
    }
    assert!(
        queue
            .publish(kind, text("nowhere"), Headers::new())
            .await
            .is_err()
    );
    proxy.set_open(true);
    queue.ping().await.expect("ping once the broker is back");
    assert_eq!(queue.reconnects(), 2);
    cleanup(queue).await;
}
