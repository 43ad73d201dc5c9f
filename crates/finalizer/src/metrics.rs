//! Every metric the finalizer exports, by name, and their descriptions.
//!
//! Names follow `nightshift_<subsystem>_<name>_<unit>`, counters end in `_total`. Label values
//! are bounded: `ending` is `completed`, `expired`, `cancelled` or `unknown` (the plan was not
//! read), `outcome` one of the `OUTCOME_*` constants, `file` `output` or `error`, `read` one of
//! the `READ_*` constants. Never a batch
//! or tenant id.

/// Label: how the batch ends (`completed` | `expired` | `cancelled` | `unknown`).
pub const LABEL_ENDING: &str = "ending";
/// Label: what became of a finalize job (one of the `OUTCOME_*` values).
pub const LABEL_OUTCOME: &str = "outcome";
/// Label: which result file (`output` | `error`).
pub const LABEL_FILE: &str = "file";
/// Label: how a done chunk's part was read (`copied` | `parsed` | `rewritten`).
pub const LABEL_READ: &str = "read";

/// A part whose tally has no failed line, copied into the output file without parsing.
pub const READ_COPIED: &str = "copied";
/// A part read line by line (it has failed lines, or no tally).
pub const READ_PARSED: &str = "parsed";
/// A part that is not the one its tally describes (another run of its chunk rewrote it): the
/// assembly started again, reading every part line by line.
pub const READ_REWRITTEN: &str = "rewritten";

/// The batch's files were assembled and its terminal state committed.
pub const OUTCOME_COMMITTED: &str = "committed";
/// The batch was already terminal (a redelivered job): only cleaned up.
pub const OUTCOME_ALREADY_TERMINAL: &str = "already_terminal";
/// Another finalizer holds (or took over) the batch's finalization lease: the job was a
/// duplicate, dropped.
pub const OUTCOME_DUPLICATE: &str = "duplicate";
/// Something failed before the commit: the job was requeued to run again.
pub const OUTCOME_RETRIED: &str = "retried";
/// A dependency (the scheduler, object storage) was unreachable: the job is held and runs
/// again (one count per run that met the outage).
pub const OUTCOME_OUTAGE: &str = "outage";
/// The job can never be processed (undecodable, unknown batch): dead-lettered.
pub const OUTCOME_DEAD_LETTERED: &str = "dead_lettered";
/// Shutdown interrupted the job after its grace period: published again.
pub const OUTCOME_ABANDONED: &str = "abandoned";

/// Counter `{ending, outcome}`: finalize job runs, by how they ended (a job held in an outage
/// runs several times).
pub const FINALIZATIONS_TOTAL: &str = "nightshift_finalizer_finalizations_total";
/// Histogram `{ending}`, seconds: one committed finalization, from the job's delivery to the
/// end of its clean-up.
pub const FINALIZE_DURATION_SECONDS: &str = "nightshift_finalizer_finalize_duration_seconds";
/// Counter `{file}`: lines written to result files (again, when an assembly is retried).
pub const LINES_WRITTEN: &str = "nightshift_finalizer_lines_written_total";
/// Counter `{read}`: done chunks' result parts read, by how.
pub const PARTS_READ: &str = "nightshift_finalizer_parts_read_total";

/// Every value of [`LABEL_OUTCOME`].
pub const OUTCOMES: [&str; 7] = [
    OUTCOME_COMMITTED,
    OUTCOME_ALREADY_TERMINAL,
    OUTCOME_DUPLICATE,
    OUTCOME_RETRIED,
    OUTCOME_OUTAGE,
    OUTCOME_DEAD_LETTERED,
    OUTCOME_ABANDONED,
];

/// Makes every counter appear at zero with its label values (each ending × each outcome,
/// each file), so "no failure yet" reads as 0 rather than as no series.
pub fn register() {
    let endings = crate::plan::Ending::ALL
        .map(crate::plan::Ending::as_str)
        .into_iter()
        .chain(["unknown"]);
    for ending in endings {
        for outcome in OUTCOMES {
            metrics::counter!(FINALIZATIONS_TOTAL, LABEL_ENDING => ending, LABEL_OUTCOME => outcome)
                .increment(0);
        }
    }
    for file in ["output", "error"] {
        metrics::counter!(LINES_WRITTEN, LABEL_FILE => file).increment(0);
    }
    for read in [READ_COPIED, READ_PARSED, READ_REWRITTEN] {
        metrics::counter!(PARTS_READ, LABEL_READ => read).increment(0);
    }
}

/// Registers units and help texts with the installed recorder. Call once at start-up, after
/// installing the recorder; recording works without it.
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_histogram};
    describe_counter!(
        FINALIZATIONS_TOTAL,
        Unit::Count,
        "Finalize jobs handled, by batch ending and outcome."
    );
    describe_histogram!(
        FINALIZE_DURATION_SECONDS,
        Unit::Seconds,
        "Duration of a committed finalization, from delivery to clean-up."
    );
    describe_counter!(
        LINES_WRITTEN,
        Unit::Count,
        "Lines written to batch output and error files."
    );
    describe_counter!(
        PARTS_READ,
        Unit::Count,
        "Result parts of done chunks read: copied unparsed, parsed line by line, or found \
         rewritten since their tally (the assembly then runs again, parsing)."
    );
}
