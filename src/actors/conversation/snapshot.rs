//! A conversation as its actor holds it: shared, not copied, with every reader until it next
//! changes, and written as JSON once, at the first reader that needs it.

use std::ops::Deref;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use crate::domain::Conversation;

/// One version of a conversation. Cloning shares it; changing it through [`Snapshot::edit`]
/// copies it first only while a reader still holds it, and forgets its JSON.
#[derive(Debug, Clone)]
pub struct Snapshot(Arc<Version>);

#[derive(Debug)]
struct Version {
    conversation: Conversation,
    json: OnceLock<Bytes>,
}

impl Clone for Version {
    fn clone(&self) -> Self {
        Version {
            conversation: self.conversation.clone(),
            json: OnceLock::new(),
        }
    }
}

impl Snapshot {
    pub fn new(conversation: Conversation) -> Snapshot {
        Snapshot(Arc::new(Version {
            conversation,
            json: OnceLock::new(),
        }))
    }

    /// The conversation to change, the next version's.
    pub(super) fn edit(&mut self) -> &mut Conversation {
        let version = Arc::make_mut(&mut self.0);
        version.json.take();
        &mut version.conversation
    }

    /// The conversation as JSON (serialized at the first call for this version).
    pub fn json(&self) -> Result<Bytes, serde_json::Error> {
        if let Some(json) = self.0.json.get() {
            return Ok(json.clone());
        }
        let json = Bytes::from(serde_json::to_vec(&self.0.conversation)?);
        Ok(self.0.json.get_or_init(|| json).clone())
    }

    /// The conversation itself, copied only when another reader still holds it.
    pub fn into_conversation(self) -> Conversation {
        Arc::try_unwrap(self.0)
            .map(|version| version.conversation)
            .unwrap_or_else(|shared| shared.conversation.clone())
    }
}

impl Deref for Snapshot {
    type Target = Conversation;

    fn deref(&self) -> &Conversation {
        &self.0.conversation
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Message, Role};

    #[test]
    fn a_change_is_seen_by_later_readers_only() {
        let mut kept = Snapshot::new(Conversation::new("c".into(), "t"));
        let before = kept.clone();
        let json = before.json().unwrap();
        assert_eq!(json, kept.json().unwrap(), "one version, one JSON");

        kept.edit()
            .messages
            .push(Message::new("c", Role::User, "hi".into()));
        assert!(
            before.messages.is_empty(),
            "a reader's version does not change"
        );
        assert_eq!(before.json().unwrap(), json);
        assert_eq!(kept.messages.len(), 1);
        let changed: serde_json::Value = serde_json::from_slice(&kept.json().unwrap()).unwrap();
        assert_eq!(
            changed["messages"][0]["content"], "hi",
            "the JSON is written again"
        );
        assert_eq!(
            changed,
            serde_json::to_value(kept.clone().into_conversation()).unwrap()
        );
    }

    #[test]
    fn an_edit_with_no_other_reader_changes_in_place() {
        let mut kept = Snapshot::new(Conversation::new("c".into(), "t"));
        let _ = kept.json().unwrap();
        let at = &*kept as *const Conversation;
        kept.edit().title = "new".into();
        assert_eq!(at, &*kept as *const Conversation, "not copied");
        let json: serde_json::Value = serde_json::from_slice(&kept.json().unwrap()).unwrap();
        assert_eq!(json["title"], "new", "the old JSON is forgotten");
    }
}
