//! What the conversation actors show from outside: who is a member of a conversation, and when
//! its actor leaves memory. Run over every transport.

use std::time::Duration;

use serde_json::json;

use crate::support::{
    ModelServer, RealtimeClient, TestServer, config_for, over_every_transport, words,
};

over_every_transport!(a_refused_request_joins_nothing_and_the_conversation_still_passivates);

async fn a_refused_request_joins_nothing_and_the_conversation_still_passivates<
    C: RealtimeClient,
>() {
    let model = ModelServer::start().await;
    model.set_reply(words(10), Duration::from_millis(100));
    let mut config = config_for(&model);
    config.conversations.idle_timeout = Duration::from_millis(100);
    let server = TestServer::start(config).await;

    for (round, refused) in ["stream_chat", "regenerate"].into_iter().enumerate() {
        let id = format!("busy-{round}");
        // Both tabs connect first: a slow handshake must not outlast the first reply.
        let mut first = C::connect(server.addr()).await;
        let mut second = C::connect(server.addr()).await;
        first
            .emit(
                "stream_chat",
                json!({"conversationId": id, "message": "hi"}),
            )
            .await;
        assert_eq!(first.next().await.0, "stream_start");

        // Another tab asks for a reply while this one streams, is refused, and goes.
        second
            .emit(refused, json!({"conversationId": id, "message": "me too"}))
            .await;
        let (event, error) = second.next().await;
        assert_eq!(event, "error", "{error}");
        assert_eq!(error["code"], "CONFLICT");
        first.until_complete().await;
        assert_eq!(second.try_next(Duration::from_millis(200)).await, None);
        second.close().await;
        first.close().await;

        server
            .wait_for_health(|h| h["activeConnections"] == 0 && h["activeConversations"] == 0)
            .await;
    }
}
