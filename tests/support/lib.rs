//! Test harness: starts the real services in-process and drives them.
