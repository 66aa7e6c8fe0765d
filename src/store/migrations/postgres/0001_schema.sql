-- The whole schema, as SQLite's migrations 0001 to 0005 left it.
-- Ids compare byte by byte (COLLATE "C"), so listings break ties in the order the other stores
-- use, whatever the database's locale. Titles and contents are client text of any kind, which
-- text cannot hold when it has U+0000: they are bytea holding UTF-8. Times are milliseconds since
-- the Unix epoch, as the domain keeps them.
CREATE TABLE conversations (
    owner      text COLLATE "C" NOT NULL,
    id         text COLLATE "C" NOT NULL,
    title      bytea            NOT NULL,
    created_at bigint           NOT NULL,
    updated_at bigint           NOT NULL,
    PRIMARY KEY (owner, id)
);

CREATE INDEX conversations_by_update ON conversations (owner, updated_at DESC, id DESC);

-- Messages keep the order they were added in through seq.
CREATE TABLE messages (
    seq               bigint GENERATED ALWAYS AS IDENTITY,
    id                text COLLATE "C" NOT NULL PRIMARY KEY,
    owner             text COLLATE "C" NOT NULL,
    conversation_id   text COLLATE "C" NOT NULL,
    role              text             NOT NULL,
    content           bytea            NOT NULL,
    status            text,
    timestamp         bigint           NOT NULL,
    prompt_tokens     bigint,
    completion_tokens bigint,
    FOREIGN KEY (owner, conversation_id) REFERENCES conversations (owner, id) ON DELETE CASCADE
);

CREATE INDEX messages_by_conversation ON messages (owner, conversation_id, seq);
CREATE INDEX messages_streaming ON messages (status) WHERE status = 'streaming';

-- The accounts of AUTH_MODE=local. A username is unique ignoring case: username_key is its
-- lower-case form.
CREATE TABLE accounts (
    id            text COLLATE "C" PRIMARY KEY,
    username      text             NOT NULL,
    username_key  text COLLATE "C" NOT NULL UNIQUE,
    password_hash text             NOT NULL,
    created_at    bigint           NOT NULL
);

-- Each user's tokens per UTC day, kept apart from the messages so that deleting a conversation
-- does not give its tokens back.
CREATE TABLE daily_usage (
    owner  text COLLATE "C" NOT NULL,
    day    text COLLATE "C" NOT NULL,
    tokens bigint           NOT NULL,
    PRIMARY KEY (owner, day)
);

-- Claims on conversations, for several servers writing one database: each new writer of a
-- conversation takes a fencing token from one sequence, and writes carrying an older token are
-- refused. A claim outlives its conversation. The sequence is a row, not a SEQUENCE: its lock,
-- held until commit, makes tokens commit in the order they were given.
CREATE TABLE claims (
    owner text COLLATE "C" NOT NULL,
    id    text COLLATE "C" NOT NULL,
    fence bigint           NOT NULL,
    PRIMARY KEY (owner, id)
);

CREATE TABLE fence_sequence (last bigint NOT NULL);
INSERT INTO fence_sequence (last) VALUES (0);
