//! The chat domain: users, conversations, messages, roles, ids and times, serialized as the API
//! contract says.

use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, Datelike, SecondsFormat, Timelike, Utc};
use serde::{Deserialize, Serialize, Serializer};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::error::ChatError;

/// How many characters of the first user message make a conversation's title.
const TITLE_CHARS: usize = 50;
/// The longest conversation id a client may choose.
const MAX_CONVERSATION_ID_LEN: usize = 128;

/// A point in time, serialized as RFC 3339 UTC with milliseconds (`2026-11-26T19:45:22.123Z`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize, ToSchema)]
#[serde(transparent)]
#[schema(value_type = String, format = DateTime, example = "2026-11-26T19:45:22.123Z")]
pub struct Timestamp(pub DateTime<Utc>);

impl Timestamp {
    /// The current time, truncated to milliseconds so that what is stored equals what is sent.
    pub fn now() -> Self {
        let now = Utc::now();
        let millis = now.timestamp_millis();
        Timestamp(DateTime::from_timestamp_millis(millis).unwrap_or(now))
    }

    /// The RFC 3339 text of this time, with milliseconds and a `Z`.
    pub fn to_rfc3339(&self) -> String {
        self.0.to_rfc3339_opts(SecondsFormat::Millis, true)
    }

    /// The UTC day this time falls on, as `2026-11-29`: what daily token budgets count by.
    pub fn utc_day(&self) -> String {
        self.0.format("%Y-%m-%d").to_string()
    }

    /// Milliseconds since the Unix epoch.
    pub fn millis(&self) -> i64 {
        self.0.timestamp_millis()
    }

    /// The time `millis` milliseconds after the Unix epoch.
    pub fn from_millis(millis: i64) -> Self {
        Timestamp(DateTime::from_timestamp_millis(millis).unwrap_or_default())
    }
}

impl Serialize for Timestamp {
    /// Written digit by digit for years 0 to 9999 (every answer carries several), by chrono
    /// beyond them and for leap seconds.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let time = &self.0;
        if !(0..=9999).contains(&time.year()) || time.nanosecond() >= 1_000_000_000 {
            return serializer.serialize_str(&self.to_rfc3339());
        }
        let mut text = *b"0000-00-00T00:00:00.000Z";
        let mut put = |at: usize, width: usize, mut value: u32| {
            for digit in text[at..at + width].iter_mut().rev() {
                *digit = b'0' + (value % 10) as u8;
                value /= 10;
            }
        };
        put(0, 4, time.year() as u32);
        put(5, 2, time.month());
        put(8, 2, time.day());
        put(11, 2, time.hour());
        put(14, 2, time.minute());
        put(17, 2, time.second());
        put(20, 3, time.timestamp_subsec_millis());
        serializer.serialize_str(std::str::from_utf8(&text).map_err(serde::ser::Error::custom)?)
    }
}

/// Who a conversation belongs to: a signed-in user's id, or the anonymous user every request is
/// when sign-in is off. A conversation id is unique per user, so two users may choose the same
/// one without ever meeting.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(Arc<str>);

impl UserId {
    /// The user named `id`.
    pub fn new(id: impl Into<Arc<str>>) -> Self {
        UserId(id.into())
    }

    /// The anonymous user, owner of every conversation made without sign-in. Its id is empty,
    /// which no signed-in user's id may be.
    pub fn anonymous() -> Self {
        UserId(Arc::from(""))
    }

    /// The id as text, as stored.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("(anonymous)")
        } else {
            f.write_str(&self.0)
        }
    }
}

/// Who wrote a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Assistant,
    System,
}

impl Role {
    /// The role's name on the wire and in the store.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::System => "system",
        }
    }

    /// The role named `name`, if any.
    pub fn parse(name: &str) -> Option<Role> {
        match name {
            "user" => Some(Role::User),
            "assistant" => Some(Role::Assistant),
            "system" => Some(Role::System),
            _ => None,
        }
    }
}

/// Where an assistant reply stands (an extension field a client may ignore).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum MessageStatus {
    Streaming,
    Complete,
    Cancelled,
    Error,
}

impl MessageStatus {
    /// The status's name on the wire and in the store.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageStatus::Streaming => "streaming",
            MessageStatus::Complete => "complete",
            MessageStatus::Cancelled => "cancelled",
            MessageStatus::Error => "error",
        }
    }

    /// The status named `name`, if any.
    pub fn parse(name: &str) -> Option<MessageStatus> {
        match name {
            "streaming" => Some(MessageStatus::Streaming),
            "complete" => Some(MessageStatus::Complete),
            "cancelled" => Some(MessageStatus::Cancelled),
            "error" => Some(MessageStatus::Error),
            _ => None,
        }
    }
}

/// The tokens an assistant message cost, as the model reported them or, where it reported
/// none, estimated from the text (an extension field a client may ignore).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MessageUsage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl MessageUsage {
    /// Both together.
    pub fn total(&self) -> u64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }
}

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Message {
    pub id: String,
    pub content: String,
    pub role: Role,
    pub timestamp: Timestamp,
    pub conversation_id: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub status: Option<MessageStatus>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub usage: Option<MessageUsage>,
}

impl Message {
    /// A new message with a fresh id, stamped now.
    pub fn new(conversation_id: &str, role: Role, content: String) -> Self {
        Message {
            id: new_id(),
            content,
            role,
            timestamp: Timestamp::now(),
            conversation_id: conversation_id.to_owned(),
            status: None,
            usage: None,
        }
    }
}

/// A conversation with all its messages, in the order they were added.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Conversation {
    pub id: String,
    pub title: String,
    pub messages: Vec<Message>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

impl Conversation {
    /// An empty conversation titled after its first message.
    pub fn new(id: String, first_message: &str) -> Self {
        let now = Timestamp::now();
        Conversation {
            id,
            title: title_from(first_message),
            messages: Vec::new(),
            created_at: now,
            updated_at: now,
        }
    }
}

/// A fresh UUID v4 as text.
pub fn new_id() -> String {
    Uuid::new_v4().to_string()
}

/// The title rule: the first 50 characters of the message, plus `...` when it was longer.
pub fn title_from(message: &str) -> String {
    let mut chars = message.char_indices();
    match chars.nth(TITLE_CHARS) {
        Some((cut, _)) => format!("{}...", &message[..cut]),
        None => message.to_owned(),
    }
}

/// Checks a conversation id a client chose: 1 to 128 letters, digits, `-` and `_`.
pub fn validate_conversation_id(id: &str) -> Result<(), ChatError> {
    let valid = !id.is_empty()
        && id.len() <= MAX_CONVERSATION_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if valid {
        Ok(())
    } else {
        Err(ChatError::Invalid(
            "conversationId must be 1 to 128 letters, digits, '-' or '_'".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_serialize_as_chrono_writes_them() {
        let leap = chrono::NaiveDate::from_ymd_opt(2016, 12, 31)
            .and_then(|day| day.and_hms_milli_opt(23, 59, 59, 1_500))
            .map(|time| time.and_utc())
            .unwrap();
        let times = [
            0,
            1,
            999,
            1_000,
            1_764_186_322_123,
            253_402_300_799_999,
            -1,
            -62_135_596_800_001,
        ]
        .map(Timestamp::from_millis)
        .into_iter()
        .chain([
            Timestamp::now(),
            Timestamp(leap),
            Timestamp(DateTime::<Utc>::MAX_UTC),
        ]);
        for time in times {
            let written = serde_json::to_string(&time).unwrap();
            assert_eq!(written, format!("\"{}\"", time.to_rfc3339()), "{time:?}");
        }
    }

    #[test]
    fn title_keeps_short_messages_whole() {
        assert_eq!(title_from("Hello"), "Hello");
        let fifty = "a".repeat(50);
        assert_eq!(title_from(&fifty), fifty);
    }

    #[test]
    fn title_cuts_at_fifty_characters_not_bytes() {
        let long = "é".repeat(51);
        let title = title_from(&long);
        assert_eq!(title, format!("{}...", "é".repeat(50)));
        let emoji = "😀".repeat(60);
        assert_eq!(title_from(&emoji).chars().count(), 53);
    }

    #[test]
    fn timestamps_have_milliseconds_and_z() {
        let t = Timestamp::from_millis(1_795_000_000_123);
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, "\"2026-11-18T11:06:40.123Z\"");
        assert_eq!(Timestamp::from_millis(t.millis()), t);
    }

    #[test]
    fn conversation_ids_are_checked() {
        assert!(validate_conversation_id("abc-DEF_123").is_ok());
        assert!(validate_conversation_id(&"a".repeat(128)).is_ok());
        assert!(validate_conversation_id(&"a".repeat(129)).is_err());
        assert!(validate_conversation_id("").is_err());
        assert!(validate_conversation_id("a b").is_err());
        assert!(validate_conversation_id("é").is_err());
    }

    #[test]
    fn messages_serialize_in_camel_case() {
        let mut m = Message::new("c1", Role::Assistant, "hi".into());
        m.status = Some(MessageStatus::Complete);
        let v = serde_json::to_value(&m).unwrap();
        assert_eq!(v["conversationId"], "c1");
        assert_eq!(v["role"], "assistant");
        assert_eq!(v["status"], "complete");
        assert!(Uuid::parse_str(v["id"].as_str().unwrap()).is_ok());
    }
}
