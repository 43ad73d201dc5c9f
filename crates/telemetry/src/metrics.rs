//! Metrics that belong to no single service: the work queues as their consumers see them.
//! Names follow `nightshift_<subsystem>_<name>_<unit>`; `queue` is a queue kind's stable name
//! (`chunk-tasks`, `chunk-results`, `finalize-jobs`).

/// Label: the queue kind.
pub const LABEL_QUEUE: &str = "queue";

/// Histogram `{queue}`, seconds: from a message's publication (its `published-at` header) to
/// its delivery to a consumer — how far behind the consumers are. A redelivered message
/// counts again, from its first publication.
pub const QUEUE_DELIVERY_LAG_SECONDS: &str = "nightshift_queue_delivery_lag_seconds";

/// Buckets of [`QUEUE_DELIVERY_LAG_SECONDS`]: milliseconds (an idle queue) to an hour (a
/// backlog, or redeliveries after a consumer timeout).
pub const DELIVERY_LAG_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
    1800.0, 3600.0,
];

/// Buckets of request latencies — the gateway's HTTP requests, upstream attempts and their
/// time to first byte: 1 ms (an in-memory answer) to 10 minutes (the longest upstream timeout
/// worth resolving), about ×2.5 apart.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
];

/// Buckets of units of work — a chunk run, a finalization: 10 ms to an hour (a chunk's time
/// budget is 10 minutes by default; a finalization streams every part of a large batch).
pub const WORK_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0,
    1800.0, 3600.0,
];

/// Buckets of every histogram not in [`HISTOGRAM_BUCKETS`]: [`LATENCY_BUCKETS`] up to an
/// hour, so that no histogram ever renders as a per-instance summary (which cannot be summed
/// across replicas).
pub const DEFAULT_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0, 1800.0, 3600.0,
];

/// The buckets of each histogram family the services export, by full name (the names are
/// declared in each service's `metrics.rs`; this crate depends on none of them). Every
/// histogram is exported with buckets, so dashboards aggregate replicas with
/// `histogram_quantile(q, sum by (le) (rate(<family>_bucket[…])))`.
pub const HISTOGRAM_BUCKETS: &[(&str, &[f64])] = &[
    (QUEUE_DELIVERY_LAG_SECONDS, DELIVERY_LAG_BUCKETS),
    (
        "nightshift_gateway_http_request_duration_seconds",
        LATENCY_BUCKETS,
    ),
    (
        "nightshift_executor_upstream_request_duration_seconds",
        LATENCY_BUCKETS,
    ),
    (
        "nightshift_executor_upstream_time_to_first_byte_seconds",
        LATENCY_BUCKETS,
    ),
    ("nightshift_executor_chunk_duration_seconds", WORK_BUCKETS),
    (
        "nightshift_finalizer_finalize_duration_seconds",
        WORK_BUCKETS,
    ),
];

/// The Prometheus exporter's builder with every histogram's buckets set (see
/// [`HISTOGRAM_BUCKETS`], [`DEFAULT_BUCKETS`]).
pub(crate) fn prometheus_builder() -> metrics_exporter_prometheus::PrometheusBuilder {
    // Setting buckets fails only on an empty list; the unit tests prove none is empty.
    with_buckets().unwrap_or_else(|_| metrics_exporter_prometheus::PrometheusBuilder::new())
}

fn with_buckets()
-> Result<metrics_exporter_prometheus::PrometheusBuilder, metrics_exporter_prometheus::BuildError> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    let mut builder = PrometheusBuilder::new().set_buckets(DEFAULT_BUCKETS)?;
    for (family, buckets) in HISTOGRAM_BUCKETS {
        builder = builder.set_buckets_for_metric(Matcher::Full((*family).to_owned()), buckets)?;
    }
    Ok(builder)
}

/// Registers units and help texts with the installed recorder.
pub(crate) fn describe() {
    ::metrics::describe_histogram!(
        QUEUE_DELIVERY_LAG_SECONDS,
        ::metrics::Unit::Seconds,
        "Time from a message's publication to its delivery to a consumer."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_lists_rise_strictly() {
        let lists = [
            DELIVERY_LAG_BUCKETS,
            LATENCY_BUCKETS,
            WORK_BUCKETS,
            DEFAULT_BUCKETS,
        ];
        for buckets in lists
            .into_iter()
            .chain(HISTOGRAM_BUCKETS.iter().map(|(_, b)| *b))
        {
            assert!(!buckets.is_empty());
            assert!(buckets.windows(2).all(|w| w[0] < w[1]), "{buckets:?}");
        }
    }

    #[test]
    fn every_histogram_renders_with_buckets() {
        let recorder = with_buckets().expect("buckets").build_recorder();
        let handle = recorder.handle();
        ::metrics::with_local_recorder(&recorder, || {
            for (family, _) in HISTOGRAM_BUCKETS {
                ::metrics::histogram!(*family).record(0.3);
            }
            ::metrics::histogram!("test_unlisted_seconds").record(0.3);
        });
        let text = handle.render();
        for family in HISTOGRAM_BUCKETS
            .iter()
            .map(|(family, _)| *family)
            .chain(["test_unlisted_seconds"])
        {
            assert!(
                text.contains(&format!("# TYPE {family} histogram")),
                "{family} is not a histogram:\n{text}"
            );
            assert!(
                text.contains(&format!("{family}_bucket{{le=\"0.5\"}} 1")),
                "{text}"
            );
        }
        assert!(!text.contains("quantile="), "no summaries: {text}");
    }
}
