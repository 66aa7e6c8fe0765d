-- Claims on conversations, for several processes writing one database: each new writer of a
-- conversation takes a fencing token from one sequence, and writes carrying an older token are
-- refused. A claim outlives its conversation, so a deleted and re-created one is still fenced.
CREATE TABLE claims (
    owner TEXT    NOT NULL,
    id    TEXT    NOT NULL,
    fence INTEGER NOT NULL,
    PRIMARY KEY (owner, id)
);

CREATE TABLE fence_sequence (last INTEGER NOT NULL);
INSERT INTO fence_sequence (last) VALUES (0);
