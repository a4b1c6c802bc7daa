"""Schema migrations, applied in order by ``PRAGMA user_version``. Append; never edit a shipped step."""

MIGRATIONS: list[str] = [
    # 1: jobs, events, metrics, adapters
    """
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        backend TEXT NOT NULL,
        status TEXT NOT NULL,
        raw_status TEXT,
        remote_id TEXT,
        spec TEXT NOT NULL,           -- TrainingSpec JSON (no credentials: the spec has none)
        data TEXT NOT NULL,           -- training/validation paths, sha256, row kind and count
        request TEXT,                 -- the planned request (from backend.plan)
        result TEXT,
        error TEXT,
        progress TEXT,
        pid INTEGER,
        heartbeat_at REAL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX jobs_backend ON jobs(backend, created_at);
    CREATE INDEX jobs_remote ON jobs(backend, remote_id);
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        created_at REAL NOT NULL,
        level TEXT NOT NULL,
        type TEXT NOT NULL,
        message TEXT NOT NULL,
        data TEXT,
        remote_id TEXT
    );
    CREATE INDEX events_job ON events(job_id, seq);
    CREATE UNIQUE INDEX events_remote ON events(job_id, remote_id) WHERE remote_id IS NOT NULL;
    CREATE TABLE metrics (
        job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        split TEXT NOT NULL,          -- train | eval
        step INTEGER NOT NULL,
        created_at REAL NOT NULL,
        values_json TEXT NOT NULL,
        PRIMARY KEY (job_id, split, step)
    );
    CREATE TABLE adapters (
        id TEXT PRIMARY KEY,
        name TEXT,
        job_id TEXT,
        backend TEXT NOT NULL,
        base_model TEXT,
        location TEXT NOT NULL,       -- adapter directory (local) or provider model id (managed)
        data_sha256 TEXT,
        info TEXT NOT NULL,           -- provenance: config, versions, metrics, hashes, owner
        merge_check TEXT,
        created_at REAL NOT NULL
    );
    CREATE INDEX adapters_base ON adapters(base_model);
    CREATE UNIQUE INDEX adapters_name ON adapters(name) WHERE name IS NOT NULL;
    """,
]
