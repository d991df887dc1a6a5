//! Property tests of the wire parser: whatever a client writes into a
//! control stream's `data` field, `parse_control` answers with a command or
//! a reason and never panics; and every command our own writers produce
//! parses back to what was written. Bounded (a few hundred cases each), so
//! they run with the rest of the suite; `PROPTEST_CASES` raises the count
//! for a longer hunt.

use byclaw_protocol::{Header, control_json, is_safe_id, parse_control, salvage_session_id};
use proptest::prelude::*;
use serde_json::{Value, json};

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,40}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{0,12}", inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// An id as clients write them, sometimes with characters the reference
/// refuses.
fn id() -> impl Strategy<Value = String> {
    prop_oneof!["[A-Za-z0-9._:@-]{1,40}", ".{0,300}",]
}

/// Something shaped like a control entry, with any field possibly wrong.
fn entry_like() -> impl Strategy<Value = Value> {
    (
        prop_oneof![
            Just(json!("ASK_AGENT")),
            Just(json!("RESUME")),
            Just(json!("CANCEL_TASK")),
            json_value(),
        ],
        id(),
        id(),
        id(),
        json_value(),
        json_value(),
        json_value(),
    )
        .prop_map(|(action, message, session, trace, metadata, body, extra)| {
            json!({
                "action_type": action,
                "header": {
                    "message_id": message, "session_id": session, "trace_id": trace,
                    "metadata": metadata,
                },
                "body": body,
                "extra": extra,
            })
        })
}

proptest! {
    // Failures are reported, not saved into the source tree.
    #![proptest_config(ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_bytes_get_a_command_or_a_reason(data in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_control(&data);
        let _ = salvage_session_id(&data);
    }

    #[test]
    fn entries_with_any_field_wrong_get_a_command_or_a_reason(entry in entry_like()) {
        let data = entry.to_string();
        match parse_control(data.as_bytes()) {
            Ok(command) => {
                // What it accepted is safe to use as key and path parts.
                prop_assert!(is_safe_id(&command.header.session_id));
                prop_assert!(is_safe_id(&command.header.message_id));
                prop_assert!(command.header.metadata.is_object());
            }
            Err(reason) => prop_assert!(!reason.0.is_empty()),
        }
        if let Some(session) = salvage_session_id(data.as_bytes()) {
            prop_assert!(is_safe_id(&session));
        }
    }

    #[test]
    fn what_we_write_parses_back(
        message in "[A-Za-z0-9][A-Za-z0-9._:@-]{0,39}",
        session in "[A-Za-z0-9][A-Za-z0-9._:@-]{0,39}",
        trace in "[0-9a-f]{32}",
        content in "[a-z][a-z ]{0,100}",
        metadata in prop::collection::btree_map("[a-z_]{1,12}", json_value(), 0..4),
    ) {
        let header = Header {
            message_id: message.clone(),
            session_id: session.clone(),
            trace_id: trace.clone(),
            target_agent_type: "echo".into(),
            metadata: Value::Object(metadata.into_iter().collect()),
            ..Header::default()
        };
        let data = control_json("ASK_AGENT", &header, &json!({ "content": content }));
        let command = parse_control(data.as_bytes()).expect("our own entry parses");
        prop_assert_eq!(command.header.message_id, message);
        prop_assert_eq!(command.header.session_id, session);
        prop_assert_eq!(command.header.trace_id, trace);
        prop_assert_eq!(command.header.metadata, header.metadata);
    }
}
