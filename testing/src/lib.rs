//! Elevate's test kit (`elevate-testing`): the broker-neutral conformance suite
//! ([`conformance`], written against [`binding::BrokerBinding`]), the shared
//! test environment ([`env`]), waiting helpers ([`wait`]) and one binding per broker.

pub mod amqp;
pub mod binding;
pub mod conformance;
pub mod delivery;
pub mod domain;
pub mod env;
pub mod fixture;
pub mod kafka;
pub mod memory;
pub mod nats;
pub mod tts;
pub mod tts_env;
pub mod wait;
