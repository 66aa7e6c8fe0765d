//! Reading client payloads (REST bodies and real-time event data) into checked values.

use serde_json::{Map, Value};

use super::error::ApiError;
use crate::actors::Resume;
use crate::domain::validate_conversation_id;

/// A JSON object a client sent.
pub struct Payload<'a>(&'a Map<String, Value>);

impl<'a> Payload<'a> {
    /// The object inside `value`, or `INVALID_REQUEST`.
    pub fn new(value: &'a Value) -> Result<Payload<'a>, ApiError> {
        value
            .as_object()
            .map(Payload)
            .ok_or_else(|| ApiError::InvalidRequest("Payload must be a JSON object".into()))
    }

    /// A string field; absent or `null` is `None`.
    pub fn optional_text(&self, field: &str) -> Result<Option<&'a str>, ApiError> {
        match self.0.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(text)) => Ok(Some(text)),
            Some(_) => Err(ApiError::InvalidRequest(format!(
                "{field} must be a string"
            ))),
        }
    }

    /// The chat message: a non-blank string of at most `max_chars` characters.
    pub fn message(&self, max_chars: usize) -> Result<String, ApiError> {
        let text = self.optional_text("message")?.unwrap_or_default();
        if text.trim().is_empty() {
            return Err(ApiError::InvalidRequest("Message is required".into()));
        }
        if text.chars().count() > max_chars {
            return Err(ApiError::InvalidRequest(format!(
                "Message is too long: at most {max_chars} characters"
            )));
        }
        Ok(text.to_owned())
    }

    /// An optional conversation id, checked.
    pub fn optional_conversation_id(&self) -> Result<Option<String>, ApiError> {
        match self.optional_text("conversationId")? {
            None => Ok(None),
            Some(id) => {
                validate_conversation_id(id)?;
                Ok(Some(id.to_owned()))
            }
        }
    }

    /// A required conversation id, checked.
    pub fn conversation_id(&self) -> Result<String, ApiError> {
        self.optional_conversation_id()?
            .ok_or_else(|| ApiError::InvalidRequest("conversationId is required".into()))
    }

    /// The `username` and `password` of a registration or sign-in, both required strings.
    pub fn credentials(&self) -> Result<(String, String), ApiError> {
        let required = |field: &str| {
            self.optional_text(field)?
                .map(str::to_owned)
                .ok_or_else(|| ApiError::InvalidRequest(format!("{field} is required")))
        };
        Ok((required("username")?, required("password")?))
    }

    /// The title of a rename.
    pub fn title(&self) -> Result<String, ApiError> {
        self.optional_text("title")?
            .map(str::to_owned)
            .ok_or_else(|| ApiError::InvalidRequest("title is required".into()))
    }

    /// The last chunk a reconnecting client saw: `messageId` and `seq`, both or neither.
    pub fn resume(&self) -> Result<Option<Resume>, ApiError> {
        let message_id = self.optional_text("messageId")?;
        let seq = match self.0.get("seq") {
            None | Some(Value::Null) => None,
            Some(value) => Some(value.as_u64().ok_or_else(|| {
                ApiError::InvalidRequest("seq must be a non-negative integer".into())
            })?),
        };
        match (message_id, seq) {
            (Some(message_id), Some(seq)) => Ok(Some(Resume {
                message_id: message_id.to_owned(),
                seq,
            })),
            (None, None) => Ok(None),
            _ => Err(ApiError::InvalidRequest(
                "messageId and seq go together".into(),
            )),
        }
    }
}

/// Parses a JSON document, or `INVALID_REQUEST`.
pub fn parse_json(bytes: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::InvalidRequest(format!("Malformed JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn message_rules() {
        let v = json!({"message": "  "});
        assert_eq!(
            Payload::new(&v).unwrap().message(10).unwrap_err(),
            ApiError::InvalidRequest("Message is required".into())
        );
        let v = json!({"message": 5});
        assert!(Payload::new(&v).unwrap().message(10).is_err());
        let v = json!({"message": "éééé"});
        assert_eq!(Payload::new(&v).unwrap().message(4).unwrap(), "éééé");
        assert!(Payload::new(&v).unwrap().message(3).is_err());
        assert!(Payload::new(&json!([1])).is_err());
    }

    #[test]
    fn resume_needs_both_fields() {
        let v = json!({"messageId": "m", "seq": 3});
        let r = Payload::new(&v).unwrap().resume().unwrap().unwrap();
        assert_eq!(r.seq, 3);
        let v = json!({"messageId": "m"});
        assert!(Payload::new(&v).unwrap().resume().is_err());
        let v = json!({"seq": -1, "messageId": "m"});
        assert!(Payload::new(&v).unwrap().resume().is_err());
    }
}
