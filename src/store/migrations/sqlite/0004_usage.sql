-- What replies cost: each assistant message's tokens, and each user's tokens per UTC day (kept
-- apart from the messages, so that deleting a conversation does not give its tokens back).
ALTER TABLE messages ADD COLUMN prompt_tokens INTEGER;
ALTER TABLE messages ADD COLUMN completion_tokens INTEGER;

CREATE TABLE daily_usage (
    owner  TEXT    NOT NULL,
    day    TEXT    NOT NULL,
    tokens INTEGER NOT NULL,
    PRIMARY KEY (owner, day)
);
