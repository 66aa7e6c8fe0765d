CREATE TABLE conversations (
    id         TEXT    PRIMARY KEY NOT NULL,
    title      TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);

CREATE INDEX conversations_by_update ON conversations (updated_at DESC, id DESC);

-- Messages keep the order they were added in through the implicit rowid.
CREATE TABLE messages (
    id              TEXT    NOT NULL UNIQUE,
    conversation_id TEXT    NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    role            TEXT    NOT NULL,
    content         TEXT    NOT NULL,
    status          TEXT,
    timestamp       INTEGER NOT NULL
);

CREATE INDEX messages_by_conversation ON messages (conversation_id);
CREATE INDEX messages_streaming ON messages (status) WHERE status = 'streaming';
