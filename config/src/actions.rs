//! The action a message asks for, by its destination: the `[[actions]]`
//! table. The first entry whose destination matches (exactly, or as a
//! prefix when it ends in `*`) wins; a destination no entry names maps to
//! no action, which the guard denies (`policy-error`).

use elevate_core::ctxref::ContextRefClaims;
use elevate_core::guard::ActionMapper;
use elevate_core::message::InboundMessage;
use elevate_core::pdp::EntityRef;

use crate::file::ActionConfig;

/// Actions per destination, as configured.
#[derive(Debug, Clone, Default)]
pub struct DestinationActions {
    rules: Vec<(String, bool, String, String)>,
}

impl DestinationActions {
    /// From the `[[actions]]` entries, in order.
    pub fn from_config(actions: &[ActionConfig]) -> Self {
        DestinationActions {
            rules: actions
                .iter()
                .map(|a| {
                    let (pattern, prefix) = match a.destination.strip_suffix('*') {
                        Some(p) => (p.to_string(), true),
                        None => (a.destination.clone(), false),
                    };
                    let ty = a
                        .resource_type
                        .clone()
                        .unwrap_or_else(|| "Destination".into());
                    (pattern, prefix, a.action.clone(), ty)
                })
                .collect(),
        }
    }

    /// The (action, resource type) for `destination`, if an entry names it.
    pub fn lookup(&self, destination: &str) -> Option<(&str, &str)> {
        self.rules
            .iter()
            .find(|(p, prefix, _, _)| {
                if *prefix {
                    destination.starts_with(p.as_str())
                } else {
                    destination == p
                }
            })
            .map(|(_, _, a, t)| (a.as_str(), t.as_str()))
    }
}

impl ActionMapper for DestinationActions {
    fn map(
        &self,
        msg: &InboundMessage,
        _: &ContextRefClaims,
    ) -> Result<(String, EntityRef), String> {
        match self.lookup(&msg.destination) {
            Some((action, ty)) => Ok((action.to_string(), EntityRef::new(ty, &msg.destination))),
            None => Err(format!(
                "no [[actions]] entry for destination {:?}",
                msg.destination
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(d: &str, act: &str) -> ActionConfig {
        ActionConfig {
            destination: d.into(),
            action: act.into(),
            resource_type: None,
        }
    }

    #[test]
    fn first_match_wins_and_unknown_destinations_have_no_action() {
        let m = DestinationActions::from_config(&[
            a("orders", "orders.process"),
            a("orders.*", "orders.audit"),
            a("*", "fallback"),
        ]);
        assert_eq!(m.lookup("orders"), Some(("orders.process", "Destination")));
        assert_eq!(m.lookup("orders.eu"), Some(("orders.audit", "Destination")));
        assert_eq!(m.lookup("x"), Some(("fallback", "Destination")));
        let none = DestinationActions::from_config(&[a("orders", "orders.process")]);
        assert_eq!(none.lookup("invoices"), None);
    }
}
