//! The actors: one per conversation, and the supervisor that routes to them.

pub mod conversation;
pub mod events;
pub mod outbox;
pub mod supervisor;

pub use conversation::{APOLOGY, ChatCompleted, ConversationContext, Resume, StreamStarted};
pub use events::{ChatEvent, EncodedEvent, Subscriber, SubscriberInbox};
pub use supervisor::{Conversations, Registry};
