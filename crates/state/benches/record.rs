//! Throughput of `RedisState::record` against a local Redis, by chunk size.
//!
//! ```text
//! cargo bench -p nightshift-state --bench record
//! ```
//! Redis at `redis://127.0.0.1:6379` unless `NIGHTSHIFT_STATE__URL` says otherwise. Every
//! figure is lines per second over `LINES` lines of a fresh batch:
//! - `sequential`: one caller, one call after the other (one executor, one chunk at a time);
//! - `8 concurrent`: eight callers sharing the connection, disjoint lines (eight chunks in
//!   flight);
//! - `redelivered`: the sequential run again over lines already counted (every bit already set).
//!
//! Not a test: nothing is asserted beyond the counts coming out right.

use std::error::Error;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nightshift_core::secret::Secret;
use nightshift_state::conformance::{expected, outcomes};
use nightshift_state::{LineOutcome, LiveState, RedisState, StateConfig};

/// Lines recorded per scenario and chunk size.
const LINES: u64 = 200_000;
/// Chunk sizes compared side by side.
const CHUNKS: [usize; 2] = [100, 1000];
/// Callers in the concurrent scenario.
const CALLERS: usize = 8;

type BoxError = Box<dyn Error + Send + Sync>;

fn main() -> Result<(), BoxError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run())
}

struct Figures {
    sequential: f64,
    concurrent: f64,
    redelivered: f64,
    /// Mean latency of one sequential call.
    call: Duration,
}

async fn run() -> Result<(), BoxError> {
    let url =
        std::env::var("NIGHTSHIFT_STATE__URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let state = Arc::new(
        RedisState::connect(&StateConfig {
            url: Secret::new(url),
            key_prefix: format!("bench:state-{}:", uuid::Uuid::new_v4()),
            ..StateConfig::default()
        })
        .await?,
    );
    let chunks: Vec<Vec<Vec<LineOutcome>>> = CHUNKS
        .iter()
        .map(|&size| {
            outcomes(1..=LINES)
                .chunks(size)
                .map(<[LineOutcome]>::to_vec)
                .collect()
        })
        .collect();

    // warm-up: connection, script cache, allocator
    for _ in 0..50 {
        state.record("batch_warmup", &chunks[1][0]).await?;
    }
    state.clear("batch_warmup").await?;

    let mut figures = Vec::new();
    for (size, chunks) in CHUNKS.iter().zip(&chunks) {
        figures.push(measure(&state, *size, chunks).await?);
    }

    println!("record: {LINES} lines per run, lines/second (higher is better)");
    println!(
        "{:<24}{:>16}{:>16}",
        "",
        format!("chunk={}", CHUNKS[0]),
        format!("chunk={}", CHUNKS[1])
    );
    let row = |name: &str, value: &dyn Fn(&Figures) -> String| {
        println!(
            "{name:<24}{:>16}{:>16}",
            value(&figures[0]),
            value(&figures[1])
        );
    };
    row("sequential", &|f| format!("{:.0}", f.sequential));
    row(&format!("{CALLERS} concurrent"), &|f| {
        format!("{:.0}", f.concurrent)
    });
    row("redelivered", &|f| format!("{:.0}", f.redelivered));
    row("mean call (sequential)", &|f| format!("{:.2?}", f.call));
    Ok(())
}

async fn measure(
    state: &Arc<RedisState>,
    size: usize,
    chunks: &[Vec<LineOutcome>],
) -> Result<Figures, BoxError> {
    let rate = |elapsed: Duration| LINES as f64 / elapsed.as_secs_f64();

    let batch = format!("batch_seq_{size}");
    let started = Instant::now();
    for chunk in chunks {
        state.record(&batch, chunk).await?;
    }
    let sequential = started.elapsed();

    let started = Instant::now();
    for chunk in chunks {
        state.record(&batch, chunk).await?;
    }
    let redelivered = started.elapsed();
    check(state, &batch).await?;

    let batch = format!("batch_conc_{size}");
    let shared: Arc<Vec<Vec<LineOutcome>>> = Arc::new(chunks.to_vec());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for caller in 0..CALLERS {
        let (state, batch, shared) = (Arc::clone(state), batch.clone(), Arc::clone(&shared));
        tasks.push(tokio::spawn(async move {
            for chunk in shared.iter().skip(caller).step_by(CALLERS) {
                state.record(&batch, chunk).await?;
            }
            Ok::<_, BoxError>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let concurrent = started.elapsed();
    check(state, &batch).await?;

    Ok(Figures {
        sequential: rate(sequential),
        concurrent: rate(concurrent),
        redelivered: rate(redelivered),
        call: sequential / u32::try_from(chunks.len())?,
    })
}

/// Asserts the batch counted every line once, then deletes its keys.
async fn check(state: &RedisState, batch: &str) -> Result<(), BoxError> {
    let counts = state.counts(batch).await?;
    if counts != expected(1..=LINES) {
        return Err(format!("{batch}: wrong counts {counts:?}").into());
    }
    state.clear(batch).await?;
    Ok(())
}
