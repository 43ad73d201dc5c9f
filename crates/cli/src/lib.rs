//! The nightshift binary: every service, or all of them in one process, plus admin commands.
