//! Generated gRPC types for the agent service (`myha.agent.v1`), and the structured refusal
//! a stale fencing token gets ([`stale_term_status`], [`stale_term_refusal`]).

#[allow(clippy::all, clippy::pedantic)]
pub mod agent {
    tonic::include_proto!("myha.agent.v1");
}

use agent::{StaleTermRefusal, StatusDetail, StatusDetails};
use prost::Message;

/// The `type_url` of a [`StaleTermRefusal`] in a status's details.
pub const STALE_TERM_TYPE_URL: &str = "type.googleapis.com/myha.agent.v1.StaleTermRefusal";

/// The FAILED_PRECONDITION status for a refused fencing token: `message` for people, the
/// refusal in the details for programs.
pub fn stale_term_status(message: String, refusal: StaleTermRefusal) -> tonic::Status {
    let details = StatusDetails {
        code: tonic::Code::FailedPrecondition as i32,
        message: message.clone(),
        details: vec![StatusDetail {
            type_url: STALE_TERM_TYPE_URL.to_string(),
            value: refusal.encode_to_vec(),
        }],
    };
    tonic::Status::with_details(
        tonic::Code::FailedPrecondition,
        message,
        details.encode_to_vec().into(),
    )
}

/// The refusal carried by `status`, when it is a stale-term refusal; `None` for any other
/// status (whatever its message says).
pub fn stale_term_refusal(status: &tonic::Status) -> Option<StaleTermRefusal> {
    if status.code() != tonic::Code::FailedPrecondition {
        return None;
    }
    let details = StatusDetails::decode(status.details()).ok()?;
    details
        .details
        .iter()
        .find(|d| d.type_url == STALE_TERM_TYPE_URL)
        .and_then(|d| StaleTermRefusal::decode(d.value.as_slice()).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_term_refusal_round_trips_and_nothing_else_is_one() {
        let r = StaleTermRefusal {
            requested_term: 6,
            requested_epoch: 0,
            known_term: 7,
            known_epoch: 3,
        };
        let s = stale_term_status("stale term 6 < known term 7".into(), r);
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
        assert_eq!(stale_term_refusal(&s), Some(r));
        // A message that merely says so is not a refusal: programs read the details.
        let plain = tonic::Status::failed_precondition("stale term 6 < known term 7");
        assert_eq!(stale_term_refusal(&plain), None);
        let other =
            tonic::Status::with_details(tonic::Code::Aborted, "x", s.details().to_vec().into());
        assert_eq!(stale_term_refusal(&other), None, "only FAILED_PRECONDITION");
    }
}
