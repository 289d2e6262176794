//! Being written (placeholder until its owner lands it).
