//! The conformance suite on the in-memory transport.

use elevate_testing::memory::MemoryBinding;

elevate_testing::conformance_suite!(MemoryBinding::new());
elevate_testing::delivery_contract!(MemoryBinding::new());
