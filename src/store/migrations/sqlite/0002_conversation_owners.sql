-- Every conversation belongs to a user, and its id is unique per user: the key becomes
-- (owner, id). Conversations stored before belong to the anonymous user, whose id is empty.
-- SQLite cannot change a primary key in place, so both tables are made anew and filled from the
-- old ones, which are moved aside first (their indexes go with them).
ALTER TABLE conversations RENAME TO old_conversations;
ALTER TABLE messages RENAME TO old_messages;

CREATE TABLE conversations (
    owner      TEXT    NOT NULL,
    id         TEXT    NOT NULL,
    title      TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (owner, id)
);

INSERT INTO conversations (owner, id, title, created_at, updated_at)
    SELECT '', id, title, created_at, updated_at FROM old_conversations;

-- Messages keep the order they were added in through the implicit rowid, copied as it was.
CREATE TABLE messages (
    id              TEXT    NOT NULL UNIQUE,
    owner           TEXT    NOT NULL,
    conversation_id TEXT    NOT NULL,
    role            TEXT    NOT NULL,
    content         TEXT    NOT NULL,
    status          TEXT,
    timestamp       INTEGER NOT NULL,
    FOREIGN KEY (owner, conversation_id) REFERENCES conversations (owner, id) ON DELETE CASCADE
);

INSERT INTO messages (rowid, id, owner, conversation_id, role, content, status, timestamp)
    SELECT rowid, id, '', conversation_id, role, content, status, timestamp FROM old_messages;

DROP TABLE old_messages;
DROP TABLE old_conversations;

CREATE INDEX conversations_by_update ON conversations (owner, updated_at DESC, id DESC);
CREATE INDEX messages_by_conversation ON messages (owner, conversation_id);
CREATE INDEX messages_streaming ON messages (status) WHERE status = 'streaming';
