-- The accounts of AUTH_MODE=local. A username is unique ignoring case: username_key is its
-- lower-case form.
CREATE TABLE accounts (
    id            TEXT    PRIMARY KEY NOT NULL,
    username      TEXT    NOT NULL,
    username_key  TEXT    NOT NULL UNIQUE,
    password_hash TEXT    NOT NULL,
    created_at    INTEGER NOT NULL
);
