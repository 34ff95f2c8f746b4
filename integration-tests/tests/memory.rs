//! The conformance suite on the in-memory transport.

use elevate_integration_tests::memory::MemoryBinding;

elevate_integration_tests::conformance_suite!(MemoryBinding::new());
