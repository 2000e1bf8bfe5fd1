"""The history file's schema: the DDL, its forward migrations, and the SQL text the store runs.

Schema versions: ``MIGRATIONS[v]`` takes a file from ``PRAGMA user_version`` v to v + 1; they
run in order at open, each in its own transaction. Never edit a released script: append one.
1: jobs, attempts, deliveries. 2: ``jobs.nsfw_allowed`` (0 for older jobs). 3: ``jobs.origin_server_id``
('' for older jobs). 4: ``seen_keys`` (platform ids already handled, such as Slack event ids, kept
for a while: dedup.py). 5: ``jobs_fts``, a full-text index of the prompts (FTS5, trigram: any script,
emoji and substrings), kept in step by triggers and filled from the jobs already there (gallery.py).
6: ``model_presets`` (a model's steps/guidance set by /sweep, over config.toml: presets.py) and ``sheets``
(the contact sheets of /compare and /sweep: which jobs, which message shows them, the tile picked).
7: ``routing_feedback`` (model switches, compare picks, explicit
--model choices), ``learned_examples`` (the embedding stage's community examples), ``router_learns``
(every ``router learn``: check-set accuracy before and after, applied or refused): feedback.py.
"""

from __future__ import annotations

APPLICATION_ID = 0x50504943  # "PPIC" in the file header: tells our file from someone else's
ATTEMPT_OUTCOMES = ("succeeded", "failed", "retried", "interrupted")
DELIVERY_KINDS = ("status", "result")

# -- schema ---------------------------------------------------------------------------------

_SCHEMA_V1 = """
CREATE TABLE jobs (
    seq                 INTEGER PRIMARY KEY AUTOINCREMENT,  -- arrival order, never reused
    id                  TEXT    NOT NULL UNIQUE,            -- short and typable: 'k7mq2x'
    status              TEXT    NOT NULL
                        CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    created_at          REAL    NOT NULL,                   -- unix seconds
    started_at          REAL,                               -- first attempt
    finished_at         REAL,
    -- who asked, and where the answer goes (plain strings)
    requester_platform  TEXT    NOT NULL,
    requester_user_id   TEXT    NOT NULL,
    requester_name      TEXT    NOT NULL,
    origin_platform     TEXT    NOT NULL,
    origin_channel_id   TEXT    NOT NULL,
    origin_thread_id    TEXT    NOT NULL,
    origin_message_ref  TEXT    NOT NULL,
    -- the normalised request
    prompt              TEXT    NOT NULL,
    negative_prompt     TEXT    NOT NULL,
    model_asked         TEXT,                               -- NULL: the router chose
    model_used          TEXT    NOT NULL,
    route_reason        TEXT    NOT NULL,
    steps               INTEGER NOT NULL,
    guidance            REAL    NOT NULL,
    width               INTEGER NOT NULL,
    height              INTEGER NOT NULL,
    seed                INTEGER NOT NULL,
    -- outcome
    image_path          TEXT,                               -- relative to data_dir
    error_kind          TEXT,
    error_message       TEXT,
    queue_wait_s        REAL    NOT NULL DEFAULT 0,
    load_s              REAL    NOT NULL DEFAULT 0,
    generate_s          REAL    NOT NULL DEFAULT 0,
    total_s             REAL    NOT NULL DEFAULT 0,
    attempt_count       INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX jobs_unfinished  ON jobs (seq) WHERE status IN ('queued', 'running');
CREATE INDEX jobs_by_user     ON jobs (requester_platform, requester_user_id, seq);
CREATE INDEX jobs_with_image  ON jobs (finished_at) WHERE image_path IS NOT NULL;

CREATE TABLE attempts (
    job_id        TEXT    NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    n             INTEGER NOT NULL CHECK (n >= 1),
    model_id      TEXT    NOT NULL,
    prompt_used   TEXT    NOT NULL,
    started_at    REAL    NOT NULL,
    finished_at   REAL,
    outcome       TEXT    CHECK (outcome IN ('succeeded', 'failed', 'retried', 'interrupted')),
                                                  -- NULL while the attempt runs
    verdicts      TEXT,                           -- JSON: {"nsfw": {"flagged": true, "score": 0.9}}
    retry_reason  TEXT,
    PRIMARY KEY (job_id, n)
);

CREATE TABLE deliveries (
    job_id      TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    platform    TEXT NOT NULL,
    channel_id  TEXT NOT NULL,
    message_id  TEXT NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('status', 'result')),
    created_at  REAL NOT NULL,
    UNIQUE (platform, channel_id, message_id)         -- a message shows one job
);
CREATE INDEX deliveries_by_job ON deliveries (job_id);

PRAGMA application_id = 1347438915;                  -- APPLICATION_ID, "PPIC"
"""

_V2_NSFW_ALLOWED = """
-- 1 when the channel allowed adult images (JobRequest.nsfw_allowed): a job taken back after a
-- restart runs under the safety rule it was asked under
ALTER TABLE jobs ADD COLUMN nsfw_allowed INTEGER NOT NULL DEFAULT 0 CHECK (nsfw_allowed IN (0, 1));
"""

_V3_ORIGIN_SERVER = """
-- the server the job was asked in (Origin.server_id: Discord guild id, Slack team id; '' for a DM,
-- the terminal, and every job recorded before this version): who may look at it later
ALTER TABLE jobs ADD COLUMN origin_server_id TEXT NOT NULL DEFAULT '';
"""

_V4_SEEN_KEYS = """
-- ids a platform may deliver more than once (Slack's event ids, trigger ids), so a redelivery is
-- recognised after a restart too; a key is forgotten once its TTL has passed (dedup.py)
CREATE TABLE seen_keys (
    key         TEXT PRIMARY KEY,                     -- "slack:event:Ev0123", "slack:command:<trigger_id>"
    expires_at  REAL NOT NULL                         -- unix seconds: first seen + its TTL
) WITHOUT ROWID;
CREATE INDEX seen_keys_by_expiry ON seen_keys (expires_at);
"""

_V5_PROMPT_SEARCH = """
-- the web gallery's search: an external-content FTS5 index over jobs.prompt (rowid = jobs.seq).
-- The trigram tokenizer matches substrings in any script (Arabic, Hebrew, CJK) without word
-- rules; a search term shorter than three characters (an emoji) is matched with instr() instead.
CREATE VIRTUAL TABLE jobs_fts USING fts5(prompt, content = 'jobs', content_rowid = 'seq', tokenize = 'trigram');
CREATE TRIGGER jobs_fts_insert AFTER INSERT ON jobs BEGIN
    INSERT INTO jobs_fts (rowid, prompt) VALUES (new.seq, new.prompt);
END;
CREATE TRIGGER jobs_fts_delete AFTER DELETE ON jobs BEGIN
    INSERT INTO jobs_fts (jobs_fts, rowid, prompt) VALUES ('delete', old.seq, old.prompt);
END;
CREATE TRIGGER jobs_fts_update AFTER UPDATE OF prompt ON jobs BEGIN
    INSERT INTO jobs_fts (jobs_fts, rowid, prompt) VALUES ('delete', old.seq, old.prompt);
    INSERT INTO jobs_fts (rowid, prompt) VALUES (new.seq, new.prompt);
END;
INSERT INTO jobs_fts (jobs_fts) VALUES ('rebuild');  -- the jobs recorded before this version
CREATE INDEX jobs_by_model ON jobs (model_used, seq);
"""

_V6_PRESETS_AND_SHEETS = """
-- a model's default steps and guidance chosen from a /sweep sheet: over config.toml's, until /preset reset
CREATE TABLE model_presets (
    model_id  TEXT PRIMARY KEY,
    steps     INTEGER NOT NULL,
    guidance  REAL    NOT NULL,
    set_by    TEXT    NOT NULL,                       -- "discord:1234", who reacted
    set_at    REAL    NOT NULL
) WITHOUT ROWID;
-- a contact sheet of /compare or /sweep: its jobs in tile order, the message that shows it, the pick
CREATE TABLE sheets (
    id          TEXT PRIMARY KEY,
    kind        TEXT NOT NULL CHECK (kind IN ('compare', 'sweep')),
    job_ids     TEXT NOT NULL,                        -- JSON list, tile order
    platform    TEXT NOT NULL,
    channel_id  TEXT NOT NULL DEFAULT '',
    message_id  TEXT NOT NULL DEFAULT '',             -- '' until posted
    picked      INTEGER,                              -- 1-based tile, NULL until someone picks
    picked_by   TEXT,
    picked_at   REAL,
    created_at  REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX sheets_by_message ON sheets (platform, channel_id, message_id);
"""

_V7_ROUTING_FEEDBACK = """
-- routing feedback: a user's own choice of model for a prompt (docs/ROUTER.md, "Learning from the
-- community"). One row per (kind, job, user): eight reactions on one result by one user count once.
CREATE TABLE routing_feedback (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at    REAL    NOT NULL,
    kind          TEXT    NOT NULL CHECK (kind IN ('switch', 'compare_pick', 'explicit')),
    prompt        TEXT    NOT NULL,
    chosen_model  TEXT    NOT NULL,
    router_pick   TEXT,                               -- NULL: the router was not asked (--model)
    from_model    TEXT,                               -- switch: the model of the result reacted to
    server_id     TEXT    NOT NULL DEFAULT '',        -- the server the choice was made in (Origin.server_id)
    job_id        TEXT    NOT NULL DEFAULT '',        -- switch: the result; explicit: the job; compare_pick: the caller's id
    user_key      TEXT    NOT NULL DEFAULT '',        -- "discord:1234"
    UNIQUE (kind, job_id, user_key)
);
CREATE INDEX routing_feedback_by_prompt ON routing_feedback (prompt, user_key);

-- the examples `promptpics router learn` added to the embedding stage (global; capped per model)
CREATE TABLE learned_examples (
    prompt     TEXT PRIMARY KEY,                      -- normalised: lower case, single spaces
    model_id   TEXT NOT NULL,
    weight     REAL NOT NULL,
    added_at   REAL NOT NULL
) WITHOUT ROWID;

-- every learn, applied or refused, with its check-set figures and the thresholds it fitted
CREATE TABLE router_learns (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    at            REAL    NOT NULL,
    applied       INTEGER NOT NULL CHECK (applied IN (0, 1)),
    check_before  REAL    NOT NULL,                   -- strict accuracy on the check set
    check_after   REAL    NOT NULL,
    added         INTEGER NOT NULL,
    removed       INTEGER NOT NULL,
    thresholds    TEXT    NOT NULL                    -- JSON {model id: similarity}
);
"""

_V8_ATTEMPT_WORKER = """
-- which GPU worker ran each attempt (docs/CLUSTER.md): "gpu" in embedded mode, "w0", "w1", ... on Ray
ALTER TABLE attempts ADD COLUMN worker TEXT NOT NULL DEFAULT '';
"""

MIGRATIONS: list[str] = [_SCHEMA_V1, _V2_NSFW_ALLOWED, _V3_ORIGIN_SERVER, _V4_SEEN_KEYS, _V5_PROMPT_SEARCH,
                         _V6_PRESETS_AND_SHEETS, _V7_ROUTING_FEEDBACK, _V8_ATTEMPT_WORKER]
"""``MIGRATIONS[v]`` upgrades a file from ``user_version`` v to v + 1."""
SCHEMA_VERSION = len(MIGRATIONS)


# -- SQL the store runs ---------------------------------------------------------------------

INSERT_JOB = """
INSERT INTO jobs (id, status, created_at,
                  requester_platform, requester_user_id, requester_name,
                  origin_platform, origin_channel_id, origin_thread_id, origin_message_ref,
                  origin_server_id, prompt, negative_prompt, model_asked, model_used, route_reason,
                  steps, guidance, width, height, seed, nsfw_allowed)
VALUES (:id, :status, :created_at,
        :requester_platform, :requester_user_id, :requester_name,
        :origin_platform, :origin_channel_id, :origin_thread_id, :origin_message_ref,
        :origin_server_id, :prompt, :negative_prompt, :model_asked, :model_used, :route_reason,
        :steps, :guidance, :width, :height, :seed, :nsfw_allowed)
"""

FINISH_JOB = """
UPDATE jobs
   SET status        = :status,
       finished_at   = :finished_at,
       image_path    = :image_path,
       error_kind    = :error_kind,
       error_message = :error_message,
       queue_wait_s  = CASE WHEN :keep THEN queue_wait_s ELSE :queue_wait_s END,
       load_s        = CASE WHEN :keep THEN load_s       ELSE :load_s       END,
       generate_s    = CASE WHEN :keep THEN generate_s   ELSE :generate_s   END,
       total_s       = CASE WHEN :keep THEN total_s      ELSE :total_s      END
 WHERE id = :id AND status IN ('queued', 'running')
"""

UPDATE_PARAMS = """
UPDATE jobs
   SET prompt = :prompt, negative_prompt = :negative_prompt, model_used = :model_used,
       route_reason = :route_reason, steps = :steps, guidance = :guidance,
       width = :width, height = :height, seed = :seed
 WHERE id = :id
"""

RECENT_JOBS = """
SELECT * FROM jobs
 WHERE (:user_id  IS NULL OR requester_user_id  = :user_id)
   AND (:platform IS NULL OR requester_platform = :platform)
   AND (:server   IS NULL OR origin_server_id IN (:server, ''))
 ORDER BY seq DESC
 LIMIT :limit
"""

UPSERT_DELIVERY = """
INSERT INTO deliveries (job_id, platform, channel_id, message_id, kind, created_at)
VALUES (:job_id, :platform, :channel_id, :message_id, :kind, :created_at)
    ON CONFLICT (platform, channel_id, message_id)
    DO UPDATE SET job_id = excluded.job_id, kind = excluded.kind
"""

FORGET_SEEN_KEYS = "DELETE FROM seen_keys WHERE expires_at <= :now"

INSERT_SEEN_KEY = "INSERT INTO seen_keys (key, expires_at) VALUES (:key, :expires_at) ON CONFLICT (key) DO NOTHING"
