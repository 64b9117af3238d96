//! Shared helpers for the end-to-end tests (filled in by the snapshotter work).
