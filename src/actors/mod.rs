//! The actors: one per conversation, the registry that finds a running one, and the supervisor
//! that activates them and cleans up after failures.

pub mod alarms;
pub mod conversation;
pub mod events;
pub mod mailbox;
pub mod members;
pub mod outbox;
pub mod progress;
pub mod registry;
mod remote;
pub mod supervisor;

pub use conversation::{
    APOLOGY, ChatCompleted, ConversationContext, Resume, Snapshot, StreamStarted, idle_timers,
};
pub use events::{ChatEvent, EncodedEvent, MembershipChange, Subscriber, SubscriberInbox};
pub use registry::{ConversationKey, Registry};
pub use supervisor::{Activation, Conversations};

#[cfg(test)]
mod tests;
