//! The embedded Cedar PDP (filled in next).
