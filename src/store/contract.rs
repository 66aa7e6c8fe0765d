//! The store contract: what every [`ConversationStore`] answers, checked against each store.
//!
//! Each check is a function of a fresh, empty store; `contract!` runs all of them as tests of one
//! store, so a store joins the suite with one line at the end of this file.

use super::postgres::test_database::TestDatabase;
use super::{
    Account, AccountStore, ConversationStore, Durability, MemoryStore, Page, PostgresStore,
    SqliteStore, Store, StoreError, Writer,
};
use crate::domain::{Conversation, Message, MessageStatus, MessageUsage, Role, Timestamp, UserId};

/// A fresh, empty store, and what it needs kept while it is used (such as its database folder).
struct Fresh {
    store: Box<dyn Store>,
    _kept: Box<dyn Send>,
}

/// Runs every check of the contract as a test of the store that `$fresh().await` gives, in a
/// module named `$store`.
macro_rules! contract {
    ($store:ident => $fresh:ident) => {
        mod $store {
            contract!(@checks $fresh;
                a_created_conversation_loads_as_it_was,
                an_unknown_conversation_loads_as_none,
                a_conversation_id_already_stored_is_refused,
                conversations_are_listed_most_recently_updated_first,
                a_page_is_a_slice_of_the_listing,
                saved_messages_are_added_in_order_and_move_updated_at,
                a_saved_message_already_stored_gets_its_new_content_and_status,
                nothing_to_save_changes_nothing,
                messages_for_an_unknown_conversation_are_refused_and_not_stored,
                a_deleted_message_is_gone_and_moves_updated_at,
                deleting_a_message_of_an_unknown_conversation_is_not_found,
                a_renamed_conversation_keeps_its_messages,
                renaming_an_unknown_conversation_is_not_found,
                a_deleted_conversation_is_gone_with_its_messages,
                streaming_replies_are_marked_interrupted,
                marking_one_conversation_interrupted_changes_only_its_streaming_replies,
                two_owners_may_use_the_same_id_without_meeting,
                an_owner_lists_only_its_own_conversations,
                an_owner_cannot_change_another_owners_conversation,
                the_anonymous_user_is_an_owner_like_any_other,
                an_account_is_found_by_its_username_in_any_case,
                a_username_taken_in_another_case_is_refused,
                usage_adds_up_per_owner_and_day,
                a_reply_keeps_what_it_cost,
                claims_give_ever_greater_tokens,
                a_writer_whose_claim_was_superseded_is_refused,
                a_claim_outlives_its_conversation,
                any_text_round_trips,
                a_key_holding_nul_names_nothing,
                writes_sent_together_each_get_their_own_outcome,
            );
        }
    };
    (@checks $fresh:ident; $($check:ident,)*) => {
        $(
            #[tokio::test]
            async fn $check() {
                let fresh = super::$fresh().await;
                super::$check(fresh.store.as_ref()).await;
            }
        )*
    };
}

async fn fresh_memory() -> Fresh {
    Fresh {
        store: Box::new(MemoryStore::new()),
        _kept: Box::new(()),
    }
}

async fn fresh_sqlite() -> Fresh {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/chat.db", dir.path().display());
    Fresh {
        store: Box::new(SqliteStore::open(&url, Durability::Normal).await.unwrap()),
        _kept: Box::new(dir),
    }
}

/// A fresh store in a schema of its own on the test PostgreSQL server (`TEST_DATABASE_URL`).
async fn fresh_postgres() -> Fresh {
    let database = TestDatabase::create().await;
    Fresh {
        store: Box::new(PostgresStore::open(&database.url).await.unwrap()),
        _kept: Box::new(database),
    }
}

/// The owner of the conversations most checks store.
fn ann() -> UserId {
    UserId::new("ann")
}

/// Another owner.
fn bob() -> UserId {
    UserId::new("bob")
}

/// Ann, writing without a claim.
fn ann_writes() -> Writer {
    Writer::unfenced(&ann())
}

/// Bob, writing without a claim.
fn bob_writes() -> Writer {
    Writer::unfenced(&bob())
}

fn at(millis: i64) -> Timestamp {
    Timestamp::from_millis(millis)
}

/// A conversation `id` last updated at `updated_at`, with no messages.
fn conversation(id: &str, title: &str, updated_at: i64) -> Conversation {
    Conversation {
        id: id.into(),
        title: title.into(),
        messages: Vec::new(),
        created_at: at(500),
        updated_at: at(updated_at),
    }
}

/// A message of `conversation_id` written at `timestamp`.
fn message(conversation_id: &str, role: Role, content: &str, timestamp: i64) -> Message {
    Message {
        timestamp: at(timestamp),
        ..Message::new(conversation_id, role, content.into())
    }
}

/// A reply still being written.
fn streaming(conversation_id: &str, content: &str, timestamp: i64) -> Message {
    Message {
        status: Some(MessageStatus::Streaming),
        ..message(conversation_id, Role::Assistant, content, timestamp)
    }
}

async fn stored(store: &dyn ConversationStore, id: &str) -> Conversation {
    store.load_conversation(&ann(), id).await.unwrap().unwrap()
}

async fn listed_ids(store: &dyn ConversationStore, page: Page) -> Vec<String> {
    let listed = store.list_conversations(&ann(), page).await.unwrap();
    listed.into_iter().map(|c| c.id).collect()
}

async fn a_created_conversation_loads_as_it_was(store: &dyn ConversationStore) {
    let mut a = conversation("a", "first", 1_000);
    a.messages = vec![
        message("a", Role::User, "question", 900),
        Message {
            status: Some(MessageStatus::Complete),
            ..message("a", Role::Assistant, "answer", 950)
        },
        streaming("a", "", 1_000),
    ];
    store.create_conversation(&ann_writes(), &a).await.unwrap();
    assert_eq!(stored(store, "a").await, a);
}

async fn an_unknown_conversation_loads_as_none(store: &dyn ConversationStore) {
    store
        .create_conversation(&ann_writes(), &conversation("a", "first", 1_000))
        .await
        .unwrap();
    assert_eq!(store.load_conversation(&ann(), "b").await, Ok(None));
}

async fn a_conversation_id_already_stored_is_refused(store: &dyn ConversationStore) {
    let mut a = conversation("a", "first", 1_000);
    a.messages.push(message("a", Role::User, "question", 1_000));
    store.create_conversation(&ann_writes(), &a).await.unwrap();

    let mut again = conversation("a", "second", 2_000);
    again
        .messages
        .push(message("a", Role::User, "another", 2_000));
    assert_eq!(
        store.create_conversation(&ann_writes(), &again).await,
        Err(StoreError::AlreadyExists)
    );
    assert_eq!(stored(store, "a").await, a);
    let listed = store
        .list_conversations(&ann(), Page::default())
        .await
        .unwrap();
    assert_eq!(listed, [a]);
}

async fn conversations_are_listed_most_recently_updated_first(store: &dyn ConversationStore) {
    for (id, updated_at) in [("a", 1_000), ("b", 3_000), ("c", 2_000), ("d", 2_000)] {
        store
            .create_conversation(&ann_writes(), &conversation(id, id, updated_at))
            .await
            .unwrap();
    }
    let question = message("a", Role::User, "question", 4_000);
    store
        .save_message(&ann_writes(), &question, at(4_000))
        .await
        .unwrap();
    // Ties go to the greater id first.
    assert_eq!(
        listed_ids(store, Page::default()).await,
        ["a", "b", "d", "c"]
    );
    let listed = store
        .list_conversations(&ann(), Page::default())
        .await
        .unwrap();
    assert_eq!(listed[0], stored(store, "a").await);
    assert_eq!(listed[0].messages, [question]);
}

async fn a_page_is_a_slice_of_the_listing(store: &dyn ConversationStore) {
    assert!(listed_ids(store, Page::default()).await.is_empty());
    for (id, updated_at) in [("a", 1_000), ("b", 2_000), ("c", 3_000)] {
        let mut c = conversation(id, id, updated_at);
        c.messages.push(message(id, Role::User, id, updated_at));
        store.create_conversation(&ann_writes(), &c).await.unwrap();
    }
    let page = |limit, offset| Page { limit, offset };
    assert_eq!(listed_ids(store, page(Some(2), 0)).await, ["c", "b"]);
    assert_eq!(listed_ids(store, page(Some(2), 2)).await, ["a"]);
    assert_eq!(listed_ids(store, page(None, 1)).await, ["b", "a"]);
    assert_eq!(listed_ids(store, page(Some(usize::MAX), 0)).await.len(), 3);
    assert!(listed_ids(store, page(Some(0), 0)).await.is_empty());
    assert!(listed_ids(store, page(None, 3)).await.is_empty());
    assert!(
        listed_ids(store, page(Some(1), usize::MAX))
            .await
            .is_empty()
    );
    let listed = store
        .list_conversations(&ann(), page(Some(1), 1))
        .await
        .unwrap();
    assert_eq!(listed, [stored(store, "b").await]);
}

async fn saved_messages_are_added_in_order_and_move_updated_at(store: &dyn ConversationStore) {
    store
        .create_conversation(&ann_writes(), &conversation("a", "first", 1_000))
        .await
        .unwrap();
    let question = message("a", Role::User, "question", 2_000);
    store
        .save_message(&ann_writes(), &question, at(2_000))
        .await
        .unwrap();
    let pair = [
        message("a", Role::User, "again", 3_000),
        streaming("a", "", 3_000),
    ];
    store
        .save_messages(&ann_writes(), &pair, at(3_001))
        .await
        .unwrap();

    let a = stored(store, "a").await;
    assert_eq!(a.messages, [question, pair[0].clone(), pair[1].clone()]);
    assert_eq!(a.updated_at, at(3_001));
    assert_eq!(a.created_at, at(500));
}

async fn a_saved_message_already_stored_gets_its_new_content_and_status(
    store: &dyn ConversationStore,
) {
    store
        .create_conversation(&ann_writes(), &conversation("a", "first", 1_000))
        .await
        .unwrap();
    let question = message("a", Role::User, "question", 2_000);
    let mut reply = streaming("a", "par", 2_000);
    store
        .save_messages(&ann_writes(), &[question.clone(), reply.clone()], at(2_000))
        .await
        .unwrap();
    let later = message("a", Role::User, "later", 2_500);
    store
        .save_message(&ann_writes(), &later, at(2_500))
        .await
        .unwrap();

    // Only the content and status change: the message keeps its place, role and time.
    let saved = Message {
        content: "partial".into(),
        status: Some(MessageStatus::Complete),
        timestamp: at(9_999),
        role: Role::User,
        ..reply.clone()
    };
    store
        .save_message(&ann_writes(), &saved, at(3_000))
        .await
        .unwrap();
    reply.content = saved.content;
    reply.status = saved.status;

    let a = stored(store, "a").await;
    assert_eq!(a.messages, [question, reply, later]);
    assert_eq!(a.updated_at, at(3_000));
}

async fn nothing_to_save_changes_nothing(store: &dyn ConversationStore) {
    let a = conversation("a", "first", 1_000);
    store.create_conversation(&ann_writes(), &a).await.unwrap();
    store
        .save_messages(&ann_writes(), &[], at(2_000))
        .await
        .unwrap();
    assert_eq!(stored(store, "a").await, a);
}

async fn messages_for_an_unknown_conversation_are_refused_and_not_stored(
    store: &dyn ConversationStore,
) {
    let a = conversation("a", "first", 1_000);
    store.create_conversation(&ann_writes(), &a).await.unwrap();
    let orphan = message("b", Role::User, "lost", 2_000);
    assert_eq!(
        store.save_message(&ann_writes(), &orphan, at(2_000)).await,
        Err(StoreError::NotFound)
    );
    let orphans = [
        message("b", Role::User, "lost", 2_000),
        streaming("b", "", 2_000),
    ];
    assert_eq!(
        store
            .save_messages(&ann_writes(), &orphans, at(2_000))
            .await,
        Err(StoreError::NotFound)
    );
    assert_eq!(store.load_conversation(&ann(), "b").await, Ok(None));
    let listed = store
        .list_conversations(&ann(), Page::default())
        .await
        .unwrap();
    assert_eq!(listed, [a]);
}

async fn a_deleted_message_is_gone_and_moves_updated_at(store: &dyn ConversationStore) {
    let mut a = conversation("a", "first", 1_000);
    a.messages = vec![
        message("a", Role::User, "question", 1_000),
        streaming("a", "", 1_000),
    ];
    store.create_conversation(&ann_writes(), &a).await.unwrap();
    let reply = &a.messages[1].id;

    store
        .delete_message(&ann_writes(), "a", reply, at(2_000))
        .await
        .unwrap();
    let loaded = stored(store, "a").await;
    assert_eq!(loaded.messages, a.messages[..1]);
    assert_eq!(loaded.updated_at, at(2_000));

    // A message that is not there: nothing to remove, and the time still moves.
    store
        .delete_message(&ann_writes(), "a", reply, at(3_000))
        .await
        .unwrap();
    let loaded = stored(store, "a").await;
    assert_eq!(loaded.messages, a.messages[..1]);
    assert_eq!(loaded.updated_at, at(3_000));
}

async fn deleting_a_message_of_an_unknown_conversation_is_not_found(store: &dyn ConversationStore) {
    let mut a = conversation("a", "first", 1_000);
    let question = message("a", Role::User, "question", 1_000);
    a.messages.push(question.clone());
    store.create_conversation(&ann_writes(), &a).await.unwrap();
    assert_eq!(
        store
            .delete_message(&ann_writes(), "b", &question.id, at(2_000))
            .await,
        Err(StoreError::NotFound)
    );
    assert_eq!(stored(store, "a").await, a);
}

async fn a_renamed_conversation_keeps_its_messages(store: &dyn ConversationStore) {
    let mut a = conversation("a", "first", 1_000);
    a.messages.push(message("a", Role::User, "question", 1_000));
    store.create_conversation(&ann_writes(), &a).await.unwrap();
    store
        .rename_conversation(&ann_writes(), "a", "renamed", at(2_000))
        .await
        .unwrap();
    a.title = "renamed".into();
    a.updated_at = at(2_000);
    assert_eq!(stored(store, "a").await, a);
}

async fn renaming_an_unknown_conversation_is_not_found(store: &dyn ConversationStore) {
    assert_eq!(
        store
            .rename_conversation(&ann_writes(), "a", "renamed", at(2_000))
            .await,
        Err(StoreError::NotFound)
    );
    assert_eq!(store.load_conversation(&ann(), "a").await, Ok(None));
}

async fn a_deleted_conversation_is_gone_with_its_messages(store: &dyn ConversationStore) {
    let mut a = conversation("a", "first", 1_000);
    let question = message("a", Role::User, "question", 1_000);
    a.messages.push(question.clone());
    store.create_conversation(&ann_writes(), &a).await.unwrap();
    let b = conversation("b", "second", 1_000);
    store.create_conversation(&ann_writes(), &b).await.unwrap();

    assert_eq!(
        store.delete_conversation(&ann_writes(), "a").await,
        Ok(true)
    );
    assert_eq!(
        store.delete_conversation(&ann_writes(), "a").await,
        Ok(false)
    );
    assert_eq!(store.load_conversation(&ann(), "a").await, Ok(None));
    assert_eq!(listed_ids(store, Page::default()).await, ["b"]);
    assert_eq!(
        store
            .save_message(&ann_writes(), &question, at(2_000))
            .await,
        Err(StoreError::NotFound)
    );

    // The id is free again, and its messages went with it.
    let again = conversation("a", "again", 3_000);
    store
        .create_conversation(&ann_writes(), &again)
        .await
        .unwrap();
    assert_eq!(stored(store, "a").await, again);
}

async fn streaming_replies_are_marked_interrupted(store: &dyn ConversationStore) {
    assert_eq!(store.mark_interrupted().await, Ok(0));
    let mut a = conversation("a", "first", 1_000);
    a.messages = vec![
        message("a", Role::User, "question", 1_000),
        streaming("a", "partial", 1_000),
    ];
    store.create_conversation(&ann_writes(), &a).await.unwrap();
    let mut b = conversation("b", "second", 2_000);
    b.messages = vec![
        Message {
            status: Some(MessageStatus::Complete),
            ..message("b", Role::Assistant, "done", 2_000)
        },
        streaming("b", "", 2_000),
    ];
    store.create_conversation(&ann_writes(), &b).await.unwrap();

    assert_eq!(store.mark_interrupted().await, Ok(2));
    for mut expected in [a, b] {
        let last = expected.messages.last_mut().unwrap();
        last.status = Some(MessageStatus::Error);
        // The text so far and the conversation's time are kept.
        assert_eq!(stored(store, &expected.id).await, expected);
    }
    assert_eq!(store.mark_interrupted().await, Ok(0));
}

async fn marking_one_conversation_interrupted_changes_only_its_streaming_replies(
    store: &dyn ConversationStore,
) {
    let mut expected = Vec::new();
    for (id, at) in [("a", 1_000), ("b", 2_000)] {
        let mut c = conversation(id, id, at);
        c.messages = vec![
            streaming(id, "cut", at),
            Message {
                status: Some(MessageStatus::Complete),
                ..message(id, Role::Assistant, "done", at)
            },
        ];
        store.create_conversation(&ann_writes(), &c).await.unwrap();
        expected.push(c);
    }
    assert_eq!(store.mark_interrupted_in(&ann_writes(), "a").await, Ok(1));
    assert_eq!(store.mark_interrupted_in(&ann_writes(), "a").await, Ok(0));
    assert_eq!(
        store.mark_interrupted_in(&ann_writes(), "unknown").await,
        Ok(0)
    );
    expected[0].messages[0].status = Some(MessageStatus::Error);
    for c in expected {
        assert_eq!(stored(store, &c.id).await, c);
    }
}

async fn two_owners_may_use_the_same_id_without_meeting(store: &dyn ConversationStore) {
    let mut ann_c = conversation("c", "ann's", 1_000);
    ann_c
        .messages
        .push(message("c", Role::User, "from ann", 1_000));
    store
        .create_conversation(&ann_writes(), &ann_c)
        .await
        .unwrap();
    let mut bob_c = conversation("c", "bob's", 2_000);
    bob_c
        .messages
        .push(message("c", Role::User, "from bob", 2_000));
    store
        .create_conversation(&bob_writes(), &bob_c)
        .await
        .unwrap();

    let reply = streaming("c", "", 3_000);
    store
        .save_message(&bob_writes(), &reply, at(3_000))
        .await
        .unwrap();
    bob_c.messages.push(reply);
    bob_c.updated_at = at(3_000);
    assert_eq!(stored(store, "c").await, ann_c);
    assert_eq!(
        store.load_conversation(&bob(), "c").await,
        Ok(Some(bob_c.clone()))
    );

    assert_eq!(store.mark_interrupted_in(&ann_writes(), "c").await, Ok(0));
    assert_eq!(
        store.delete_conversation(&ann_writes(), "c").await,
        Ok(true)
    );
    assert_eq!(store.load_conversation(&ann(), "c").await, Ok(None));
    assert_eq!(store.load_conversation(&bob(), "c").await, Ok(Some(bob_c)));
}

async fn an_owner_lists_only_its_own_conversations(store: &dyn ConversationStore) {
    for (owner, id, updated_at) in [
        (ann(), "a1", 1_000),
        (bob(), "b1", 2_000),
        (ann(), "a2", 3_000),
        (bob(), "b2", 4_000),
    ] {
        let mut c = conversation(id, id, updated_at);
        c.messages.push(message(id, Role::User, id, updated_at));
        store
            .create_conversation(&Writer::unfenced(&owner), &c)
            .await
            .unwrap();
    }
    assert_eq!(listed_ids(store, Page::default()).await, ["a2", "a1"]);
    let page = Page {
        limit: Some(1),
        offset: 1,
    };
    assert_eq!(listed_ids(store, page).await, ["a1"]);
    let bobs = store
        .list_conversations(&bob(), Page::default())
        .await
        .unwrap();
    assert_eq!(
        bobs.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
        ["b2", "b1"]
    );
    assert!(
        bobs.iter()
            .all(|c| c.messages.len() == 1 && c.messages[0].content == c.id)
    );
    let nobody = UserId::new("carol");
    assert!(
        store
            .list_conversations(&nobody, Page::default())
            .await
            .unwrap()
            .is_empty()
    );
}

async fn an_owner_cannot_change_another_owners_conversation(store: &dyn ConversationStore) {
    let mut a = conversation("a", "first", 1_000);
    let question = message("a", Role::User, "question", 1_000);
    a.messages = vec![question.clone(), streaming("a", "partial", 1_000)];
    store.create_conversation(&ann_writes(), &a).await.unwrap();

    let bob = bob();
    let intruder = message("a", Role::User, "hello", 2_000);
    assert_eq!(
        store
            .save_message(&Writer::unfenced(&bob), &intruder, at(2_000))
            .await,
        Err(StoreError::NotFound)
    );
    assert_eq!(
        store
            .rename_conversation(&Writer::unfenced(&bob), "a", "mine", at(2_000))
            .await,
        Err(StoreError::NotFound)
    );
    assert_eq!(
        store
            .delete_message(&Writer::unfenced(&bob), "a", &question.id, at(2_000))
            .await,
        Err(StoreError::NotFound)
    );
    assert_eq!(
        store
            .mark_interrupted_in(&Writer::unfenced(&bob), "a")
            .await,
        Ok(0)
    );
    assert_eq!(
        store
            .delete_conversation(&Writer::unfenced(&bob), "a")
            .await,
        Ok(false)
    );
    assert_eq!(store.load_conversation(&bob, "a").await, Ok(None));
    assert_eq!(stored(store, "a").await, a);
}

async fn the_anonymous_user_is_an_owner_like_any_other(store: &dyn ConversationStore) {
    let anonymous = UserId::anonymous();
    let a = conversation("a", "anonymous", 1_000);
    store
        .create_conversation(&Writer::unfenced(&anonymous), &a)
        .await
        .unwrap();
    assert_eq!(
        store.load_conversation(&anonymous, "a").await,
        Ok(Some(a.clone()))
    );
    assert_eq!(store.load_conversation(&ann(), "a").await, Ok(None));
    assert_eq!(
        store.list_conversations(&anonymous, Page::default()).await,
        Ok(vec![a])
    );
    assert!(listed_ids(store, Page::default()).await.is_empty());
}

/// An account named `username`.
fn account(id: &str, username: &str) -> Account {
    Account {
        id: UserId::new(id),
        username: username.into(),
        password_hash: format!("$argon2id$v=19$m=19456,t=2,p=1$salt-of-{id}$hash"),
        created_at: at(1_000),
    }
}

async fn an_account_is_found_by_its_username_in_any_case(store: &dyn AccountStore) {
    assert_eq!(store.find_account("Ann").await, Ok(None));
    let ann = account("u1", "Ann");
    store.create_account(&ann).await.unwrap();
    store.create_account(&account("u2", "Bob")).await.unwrap();
    for name in ["Ann", "ann", "ANN"] {
        assert_eq!(
            store.find_account(name).await,
            Ok(Some(ann.clone())),
            "{name}"
        );
    }
    assert_eq!(store.find_account("Anne").await, Ok(None));
}

async fn a_username_taken_in_another_case_is_refused(store: &dyn AccountStore) {
    let ann = account("u1", "Ann");
    store.create_account(&ann).await.unwrap();
    assert_eq!(
        store.create_account(&account("u2", "aNN")).await,
        Err(StoreError::AlreadyExists)
    );
    assert_eq!(
        store.create_account(&account("u1", "Someone")).await,
        Err(StoreError::AlreadyExists)
    );
    assert_eq!(store.find_account("ann").await, Ok(Some(ann)));
    assert_eq!(store.find_account("someone").await, Ok(None));
}

async fn usage_adds_up_per_owner_and_day(store: &dyn ConversationStore) {
    assert_eq!(store.usage_on(&ann(), "2026-11-29").await, Ok(0));
    store.add_usage(&ann(), "2026-11-29", 120).await.unwrap();
    store.add_usage(&ann(), "2026-11-29", 30).await.unwrap();
    store.add_usage(&ann(), "2026-11-30", 7).await.unwrap();
    store.add_usage(&bob(), "2026-11-29", 1).await.unwrap();
    assert_eq!(store.usage_on(&ann(), "2026-11-29").await, Ok(150));
    assert_eq!(store.usage_on(&ann(), "2026-11-30").await, Ok(7));
    assert_eq!(store.usage_on(&bob(), "2026-11-29").await, Ok(1));
}

async fn a_reply_keeps_what_it_cost(store: &dyn ConversationStore) {
    let mut a = conversation("a", "first", 1_000);
    let mut reply = streaming("a", "par", 1_000);
    a.messages = vec![message("a", Role::User, "question", 1_000), reply.clone()];
    store.create_conversation(&ann_writes(), &a).await.unwrap();
    reply.content = "partial".into();
    reply.status = Some(MessageStatus::Complete);
    reply.usage = Some(MessageUsage {
        prompt_tokens: 12,
        completion_tokens: 3,
    });
    store
        .save_message(&ann_writes(), &reply, at(2_000))
        .await
        .unwrap();
    a.messages[1] = reply;
    a.updated_at = at(2_000);
    assert_eq!(stored(store, "a").await, a);
}

/// `owner`'s writer holding the claim `fence`.
fn fenced(owner: UserId, fence: u64) -> Writer {
    Writer {
        owner,
        fence: Some(fence),
    }
}

async fn claims_give_ever_greater_tokens(store: &dyn ConversationStore) {
    let first = store.claim(&ann(), "a").await.unwrap();
    let again = store.claim(&ann(), "a").await.unwrap();
    let other = store.claim(&ann(), "b").await.unwrap();
    let bobs = store.claim(&bob(), "a").await.unwrap();
    assert!(first < again && again < other && other < bobs);
    // A claim needs no stored conversation, and creates none.
    assert_eq!(store.load_conversation(&ann(), "a").await, Ok(None));
}

async fn a_writer_whose_claim_was_superseded_is_refused(store: &dyn ConversationStore) {
    let old = fenced(ann(), store.claim(&ann(), "a").await.unwrap());
    let mut a = conversation("a", "first", 1_000);
    a.messages = vec![
        message("a", Role::User, "question", 1_000),
        streaming("a", "partial", 1_000),
    ];
    store.create_conversation(&old, &a).await.unwrap();
    let new = fenced(ann(), store.claim(&ann(), "a").await.unwrap());

    let late = message("a", Role::User, "late", 2_000);
    let refused = [
        store.save_message(&old, &late, at(2_000)).await,
        store
            .delete_message(&old, "a", &a.messages[0].id, at(2_000))
            .await,
        store
            .rename_conversation(&old, "a", "stale", at(2_000))
            .await,
        store.mark_interrupted_in(&old, "a").await.map(drop),
        store.delete_conversation(&old, "a").await.map(drop),
        store
            .create_conversation(&old, &conversation("a", "again", 2_000))
            .await,
    ];
    for outcome in refused {
        assert_eq!(outcome, Err(StoreError::Fenced));
    }
    // A writer of another owner's claim, or one with no claim on the conversation, is refused.
    let bobs = fenced(bob(), new.fence.unwrap());
    assert_eq!(
        store
            .create_conversation(&bobs, &conversation("a", "bob's", 2_000))
            .await,
        Err(StoreError::Fenced)
    );
    assert_eq!(stored(store, "a").await, a);

    let reply = Message {
        content: "partial, then more".into(),
        ..a.messages[1].clone()
    };
    store.save_message(&new, &reply, at(3_000)).await.unwrap();
    a.messages[1] = reply;
    a.updated_at = at(3_000);
    assert_eq!(stored(store, "a").await, a);
    // Writers without a token are not checked: one process alone writes.
    store
        .rename_conversation(&ann_writes(), "a", "renamed", at(4_000))
        .await
        .unwrap();
    assert_eq!(stored(store, "a").await.title, "renamed");
}

async fn a_claim_outlives_its_conversation(store: &dyn ConversationStore) {
    let old = fenced(ann(), store.claim(&ann(), "a").await.unwrap());
    store
        .create_conversation(&old, &conversation("a", "first", 1_000))
        .await
        .unwrap();
    let new = fenced(ann(), store.claim(&ann(), "a").await.unwrap());
    assert_eq!(store.delete_conversation(&new, "a").await, Ok(true));
    // Deleted and made again by its latest writer; the older one stays fenced.
    store
        .create_conversation(&new, &conversation("a", "second", 2_000))
        .await
        .unwrap();
    assert_eq!(
        store
            .rename_conversation(&old, "a", "stale", at(3_000))
            .await,
        Err(StoreError::Fenced)
    );
    assert_eq!(stored(store, "a").await.title, "second");
}

/// Client text of any kind: U+0000, an emoji, a lone combining mark, and what surrounds them.
const ANY_TEXT: &str = "nul \u{0} here, \u{1F980} crab, \u{301} alone, \u{7F}\u{FEFF}\u{10FFFF}";

async fn any_text_round_trips(store: &dyn ConversationStore) {
    let mut a = conversation("a", ANY_TEXT, 1_000);
    a.messages = vec![
        message("a", Role::User, ANY_TEXT, 1_000),
        streaming("a", "\u{0}", 1_000),
    ];
    store.create_conversation(&ann_writes(), &a).await.unwrap();
    assert_eq!(stored(store, "a").await, a);

    let reply = Message {
        content: format!("{ANY_TEXT}{ANY_TEXT}"),
        ..a.messages[1].clone()
    };
    store
        .save_message(&ann_writes(), &reply, at(2_000))
        .await
        .unwrap();
    let title = "\u{301}\u{0}";
    store
        .rename_conversation(&ann_writes(), "a", title, at(3_000))
        .await
        .unwrap();
    a.messages[1] = reply;
    a.title = title.into();
    a.updated_at = at(3_000);
    assert_eq!(stored(store, "a").await, a);
    let listed = store
        .list_conversations(&ann(), Page::default())
        .await
        .unwrap();
    assert_eq!(listed, [a]);
}

async fn a_key_holding_nul_names_nothing(store: &dyn Store) {
    let mut a = conversation("a", "first", 1_000);
    a.messages.push(message("a", Role::User, "question", 1_000));
    store.create_conversation(&ann_writes(), &a).await.unwrap();
    store.create_account(&account("u1", "Ann")).await.unwrap();
    store.add_usage(&ann(), "2026-11-29", 5).await.unwrap();

    let ann_nul = UserId::new("ann\u{0}");
    assert_eq!(store.load_conversation(&ann(), "a\u{0}").await, Ok(None));
    assert_eq!(store.load_conversation(&ann_nul, "a").await, Ok(None));
    assert_eq!(
        store.list_conversations(&ann_nul, Page::default()).await,
        Ok(vec![])
    );
    assert_eq!(store.find_account("ann\u{0}").await, Ok(None));
    assert_eq!(store.usage_on(&ann_nul, "2026-11-29").await, Ok(0));
    assert_eq!(store.usage_on(&ann(), "2026-11-29\u{0}").await, Ok(0));

    let writer = Writer::unfenced(&ann());
    let question = message("a\u{0}", Role::User, "lost", 2_000);
    assert_eq!(
        store.save_message(&writer, &question, at(2_000)).await,
        Err(StoreError::NotFound)
    );
    assert_eq!(
        store
            .rename_conversation(&writer, "a\u{0}", "renamed", at(2_000))
            .await,
        Err(StoreError::NotFound)
    );
    assert_eq!(
        store
            .delete_message(&writer, "a\u{0}", &a.messages[0].id, at(2_000))
            .await,
        Err(StoreError::NotFound)
    );
    assert_eq!(store.mark_interrupted_in(&writer, "a\u{0}").await, Ok(0));
    assert_eq!(
        store.delete_conversation(&writer, "a\u{0}").await,
        Ok(false)
    );
    let fenced_writer = fenced(ann(), 1);
    assert_eq!(
        store
            .rename_conversation(&fenced_writer, "a\u{0}", "renamed", at(2_000))
            .await,
        Err(StoreError::Fenced)
    );
    // A message id that names nothing: nothing removed, and the conversation's time moves.
    store
        .delete_message(&writer, "a", "m\u{0}", at(2_000))
        .await
        .unwrap();
    a.updated_at = at(2_000);
    assert_eq!(stored(store, "a").await, a);
}

async fn writes_sent_together_each_get_their_own_outcome(store: &dyn ConversationStore) {
    let writer = Writer::unfenced(&ann());
    let mut a = conversation("a", "first", 1_000);
    a.messages.push(message("a", Role::User, "question", 1_000));
    let b = conversation("b", "second", 1_000);
    let stale = fenced(ann(), u64::MAX);
    let reply = streaming("a", "reply", 2_000);
    let orphan = message("c", Role::User, "lost", 2_000);
    // Sent at once, they may be committed together; each is answered as if alone, in order.
    let (created, again, saved, lost, fenced_out, renamed, other) = tokio::join!(
        store.create_conversation(&writer, &a),
        store.create_conversation(&writer, &a),
        store.save_message(&writer, &reply, at(2_000)),
        store.save_message(&writer, &orphan, at(2_000)),
        store.rename_conversation(&stale, "a", "stale", at(3_000)),
        store.rename_conversation(&writer, "a", "renamed", at(3_000)),
        store.create_conversation(&writer, &b),
    );
    assert_eq!(created, Ok(()));
    assert_eq!(again, Err(StoreError::AlreadyExists));
    assert_eq!(saved, Ok(()));
    assert_eq!(lost, Err(StoreError::NotFound));
    assert_eq!(fenced_out, Err(StoreError::Fenced));
    assert_eq!(renamed, Ok(()));
    assert_eq!(other, Ok(()));
    a.messages.push(reply);
    a.title = "renamed".into();
    a.updated_at = at(3_000);
    assert_eq!(stored(store, "a").await, a);
    assert_eq!(stored(store, "b").await, b);
    assert_eq!(store.load_conversation(&ann(), "c").await, Ok(None));
}

contract!(memory => fresh_memory);
contract!(sqlite => fresh_sqlite);
contract!(postgres => fresh_postgres);
