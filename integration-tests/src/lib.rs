//! The real-broker tests live in `tests/`; this library holds no code. It
//! compiles the repository README's code blocks as doc tests, so the
//! wrapping lines the README shows are the ones that build.
#![doc = include_str!("../../README.md")]
