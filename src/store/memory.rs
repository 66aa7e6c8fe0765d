//! The in-memory store: fast, and gone when the process ends.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Mutex, RwLock};

use async_trait::async_trait;

use super::{Account, AccountStore, ConversationStore, Page, StoreError, Writer, username_key};
use crate::domain::{Conversation, Message, MessageStatus, Timestamp, UserId};

/// A conversation's place in the map: its owner and its id.
type Key = (UserId, String);

/// Conversations in a map, for tests and for `DATABASE_URL=memory`.
#[derive(Debug, Default)]
pub struct MemoryStore {
    conversations: RwLock<HashMap<Key, Conversation>>,
    /// Accounts by [`username_key`].
    accounts: RwLock<HashMap<String, Account>>,
    /// Tokens used by owner and day.
    usage: RwLock<HashMap<(UserId, String), u64>>,
    /// The fencing token of each claimed conversation, and the last token given.
    claims: Mutex<(u64, HashMap<Key, u64>)>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        MemoryStore::default()
    }

    /// Changes the conversations as `writer`, once its claim on conversation `id` is checked.
    fn write<T>(
        &self,
        writer: &Writer,
        id: &str,
        f: impl FnOnce(&mut HashMap<Key, Conversation>) -> T,
    ) -> Result<T, StoreError> {
        let mut map = self
            .conversations
            .write()
            .map_err(|_| StoreError::storage("memory store lock poisoned"))?;
        if let Some(fence) = writer.fence {
            let claims = self
                .claims
                .lock()
                .map_err(|_| StoreError::storage("memory store lock poisoned"))?;
            if claims.1.get(&key(&writer.owner, id)) != Some(&fence) {
                return Err(StoreError::Fenced);
            }
        }
        Ok(f(&mut map))
    }

    fn read<T>(&self, f: impl FnOnce(&HashMap<Key, Conversation>) -> T) -> Result<T, StoreError> {
        let map = self
            .conversations
            .read()
            .map_err(|_| StoreError::storage("memory store lock poisoned"))?;
        Ok(f(&map))
    }

    fn update(
        &self,
        writer: &Writer,
        id: &str,
        updated_at: Timestamp,
        change: impl FnOnce(&mut Conversation),
    ) -> Result<(), StoreError> {
        self.write(writer, id, |map| {
            match map.get_mut(&key(&writer.owner, id)) {
                Some(conversation) => {
                    change(conversation);
                    conversation.updated_at = updated_at;
                    Ok(())
                }
                None => Err(StoreError::NotFound),
            }
        })?
    }
}

#[async_trait]
impl ConversationStore for MemoryStore {
    async fn claim(&self, owner: &UserId, id: &str) -> Result<u64, StoreError> {
        let mut claims = self
            .claims
            .lock()
            .map_err(|_| StoreError::storage("memory store lock poisoned"))?;
        let (last, by_key) = &mut *claims;
        *last += 1;
        by_key.insert(key(owner, id), *last);
        Ok(*last)
    }

    async fn create_conversation(
        &self,
        writer: &Writer,
        conversation: &Conversation,
    ) -> Result<(), StoreError> {
        let id = &conversation.id;
        self.write(writer, id, |map| match map.entry(key(&writer.owner, id)) {
            Entry::Occupied(_) => Err(StoreError::AlreadyExists),
            Entry::Vacant(slot) => {
                slot.insert(conversation.clone());
                Ok(())
            }
        })?
    }

    async fn load_conversation(
        &self,
        owner: &UserId,
        id: &str,
    ) -> Result<Option<Conversation>, StoreError> {
        self.read(|map| map.get(&key(owner, id)).cloned())
    }

    async fn list_conversations(
        &self,
        owner: &UserId,
        page: Page,
    ) -> Result<Vec<Conversation>, StoreError> {
        self.read(|map| {
            let mut all: Vec<&Conversation> = map
                .iter()
                .filter(|((o, _), _)| o == owner)
                .map(|(_, c)| c)
                .collect();
            all.sort_by(|a, b| b.updated_at.cmp(&a.updated_at).then(b.id.cmp(&a.id)));
            all.into_iter()
                .skip(page.offset)
                .take(page.limit.unwrap_or(usize::MAX))
                .cloned()
                .collect()
        })
    }

    async fn save_messages(
        &self,
        writer: &Writer,
        messages: &[Message],
        updated_at: Timestamp,
    ) -> Result<(), StoreError> {
        let Some(first) = messages.first() else {
            return Ok(());
        };
        self.update(writer, &first.conversation_id, updated_at, |c| {
            for message in messages {
                match c.messages.iter_mut().find(|m| m.id == message.id) {
                    Some(stored) => {
                        stored.content.clone_from(&message.content);
                        stored.status = message.status;
                        stored.usage = message.usage;
                    }
                    None => c.messages.push(message.clone()),
                }
            }
        })
    }

    async fn delete_message(
        &self,
        writer: &Writer,
        conversation_id: &str,
        message_id: &str,
        updated_at: Timestamp,
    ) -> Result<(), StoreError> {
        self.update(writer, conversation_id, updated_at, |c| {
            c.messages.retain(|m| m.id != message_id)
        })
    }

    async fn rename_conversation(
        &self,
        writer: &Writer,
        id: &str,
        title: &str,
        updated_at: Timestamp,
    ) -> Result<(), StoreError> {
        self.update(writer, id, updated_at, |c| c.title = title.to_owned())
    }

    async fn delete_conversation(&self, writer: &Writer, id: &str) -> Result<bool, StoreError> {
        self.write(writer, id, |map| {
            map.remove(&key(&writer.owner, id)).is_some()
        })
    }

    async fn add_usage(&self, owner: &UserId, day: &str, tokens: u64) -> Result<(), StoreError> {
        let mut usage = self
            .usage
            .write()
            .map_err(|_| StoreError::storage("memory store lock poisoned"))?;
        let used = usage.entry((owner.clone(), day.to_owned())).or_default();
        *used = used.saturating_add(tokens);
        Ok(())
    }

    async fn usage_on(&self, owner: &UserId, day: &str) -> Result<u64, StoreError> {
        let usage = self
            .usage
            .read()
            .map_err(|_| StoreError::storage("memory store lock poisoned"))?;
        Ok(usage
            .get(&(owner.clone(), day.to_owned()))
            .copied()
            .unwrap_or(0))
    }

    async fn mark_interrupted(&self) -> Result<u64, StoreError> {
        let mut map = self
            .conversations
            .write()
            .map_err(|_| StoreError::storage("memory store lock poisoned"))?;
        Ok(mark_streaming_as_error(map.values_mut()))
    }

    async fn mark_interrupted_in(
        &self,
        writer: &Writer,
        conversation_id: &str,
    ) -> Result<u64, StoreError> {
        self.write(writer, conversation_id, |map| {
            mark_streaming_as_error(map.get_mut(&key(&writer.owner, conversation_id)))
        })
    }
}

/// The map key of `owner`'s conversation `id`.
fn key(owner: &UserId, id: &str) -> Key {
    (owner.clone(), id.to_owned())
}

#[async_trait]
impl AccountStore for MemoryStore {
    async fn create_account(&self, account: &Account) -> Result<(), StoreError> {
        let mut accounts = self
            .accounts
            .write()
            .map_err(|_| StoreError::storage("memory store lock poisoned"))?;
        if accounts.values().any(|a| a.id == account.id) {
            return Err(StoreError::AlreadyExists);
        }
        match accounts.entry(username_key(&account.username)) {
            Entry::Occupied(_) => Err(StoreError::AlreadyExists),
            Entry::Vacant(slot) => {
                slot.insert(account.clone());
                Ok(())
            }
        }
    }

    async fn find_account(&self, username: &str) -> Result<Option<Account>, StoreError> {
        let accounts = self
            .accounts
            .read()
            .map_err(|_| StoreError::storage("memory store lock poisoned"))?;
        Ok(accounts.get(&username_key(username)).cloned())
    }
}

/// Marks the `streaming` replies of `conversations` as `error`; how many there were.
fn mark_streaming_as_error<'a>(
    conversations: impl IntoIterator<Item = &'a mut Conversation>,
) -> u64 {
    let mut count = 0;
    for message in conversations
        .into_iter()
        .flat_map(|c| c.messages.iter_mut())
    {
        if message.status == Some(MessageStatus::Streaming) {
            message.status = Some(MessageStatus::Error);
            count += 1;
        }
    }
    count
}
