//! The work-queue conformance suite against a real RabbitMQ (the dev broker by default:
//! `NIGHTSHIFT_QUEUE__URL` overrides it). Each check runs under its own queue prefix and
//! deletes its queues at the end.

use std::time::Duration;

use nightshift_core::secret::Secret;
use nightshift_queue::{QueueConfig, RabbitQueue};

fn config() -> QueueConfig {
    QueueConfig {
        url: Secret::new(
            std::env::var("NIGHTSHIFT_QUEUE__URL")
                .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned()),
        ),
        prefix: format!("test-{}", uuid::Uuid::new_v4()),
        // Not the default, to show the configured limit is the one applied.
        delivery_limit: 3,
        connect_timeout: Duration::from_secs(10),
        operation_timeout: Duration::from_secs(10),
        ..QueueConfig::default()
    }
}

async fn run(name: &str) {
    let queue = RabbitQueue::connect(&config()).await.expect("connect");
    nightshift_queue::conformance::run(name, &queue).await;
    // The adapter reconnects silently: make sure no check broke the connection on the way.
    assert_eq!(
        queue.reconnects(),
        0,
        "the connection was lost during {name}"
    );
    // leave the broker as we found it
    queue.delete_all().await.expect("cleanup");
    queue.close().await.expect("close");
}

nightshift_queue::conformance_tests!(run);
