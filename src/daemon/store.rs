//! Metadata in SQLite (WAL): sandboxes, names, tags, events, execs, the secrets and volumes
//! index. Every change is one transaction, so a crash leaves either the old or the new state.

use crate::api::{
    ApiError, CreateSandbox, ErrorCode, Event, EventKind, ExecInfo, ExecStatus, SandboxInfo,
    SandboxStatus, SandboxSummary, SecretInfo, StreamMode,
};
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

pub struct Store {
    conn: Mutex<Connection>,
    /// Called when a caller finds the connection held by someone else, before it waits (sbxd
    /// lifts its low-priority store writer then, so nobody waits behind a thread starved of
    /// CPU).
    on_contention: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
}

/// Run `sql` through the connection's statement cache: parsed once, not on every call (parsing
/// was a visible share of the daemon's CPU per create and exec).
fn exec_cached(c: &Connection, sql: &str, p: impl rusqlite::Params) -> rusqlite::Result<usize> {
    c.prepare_cached(sql)?.execute(p)
}

fn internal(step: &str, e: impl std::fmt::Display) -> ApiError {
    ApiError::new(ErrorCode::Internal, format!("store: {step}: {e}"))
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY,
    app TEXT NOT NULL,
    name TEXT,
    tags TEXT NOT NULL,
    status TEXT NOT NULL,
    config TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    ready_at REAL,
    finished_at REAL,
    returncode INTEGER,
    end_reason TEXT,
    error TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS sandboxes_live_name
    ON sandboxes(app, name) WHERE name IS NOT NULL AND status != 'finished';
CREATE INDEX IF NOT EXISTS sandboxes_created ON sandboxes(created_at);
CREATE TABLE IF NOT EXISTS events (
    sandbox_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    at REAL NOT NULL,
    reason TEXT,
    returncode INTEGER,
    message TEXT,
    PRIMARY KEY (sandbox_id, seq)
);
CREATE TABLE IF NOT EXISTS execs (
    exec_id TEXT NOT NULL,
    sandbox_id TEXT NOT NULL,
    argv TEXT NOT NULL,
    status TEXT NOT NULL,
    returncode INTEGER,
    signal INTEGER,
    timed_out INTEGER NOT NULL DEFAULT 0,
    oom INTEGER NOT NULL DEFAULT 0,
    started_at REAL NOT NULL,
    finished_at REAL,
    stdout TEXT NOT NULL,
    stderr TEXT NOT NULL,
    pty INTEGER NOT NULL,
    PRIMARY KEY (sandbox_id, exec_id)
);
CREATE TABLE IF NOT EXISTS secrets (
    name TEXT PRIMARY KEY,
    keys TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS volumes (
    name TEXT PRIMARY KEY,
    created_at REAL NOT NULL
);
"#;

fn enum_str<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

fn enum_from<T: serde::de::DeserializeOwned>(s: &str) -> Option<T> {
    serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
}

/// A new sandbox row.
pub struct NewSandbox<'a> {
    pub id: &'a str,
    pub app: &'a str,
    pub name: Option<&'a str>,
    pub tags: &'a BTreeMap<String, String>,
    pub config: &'a CreateSandbox,
    pub created_at: f64,
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, ApiError> {
        let conn = Connection::open(path).map_err(|e| internal("open", e))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| internal("set WAL", e))?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(|e| internal("set synchronous", e))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(|e| internal("busy timeout", e))?;
        conn.execute_batch(SCHEMA)
            .map_err(|e| internal("create schema", e))?;
        // Every statement of this file fits, so none is parsed twice.
        conn.set_prepared_statement_cache_capacity(64);
        Ok(Store {
            conn: Mutex::new(conn),
            on_contention: std::sync::OnceLock::new(),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        match self.conn.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                if let Some(f) = self.on_contention.get() {
                    f();
                }
                self.conn.lock().unwrap_or_else(|p| p.into_inner())
            }
        }
    }

    /// Set what runs when a caller has to wait for the connection (once; later calls are
    /// ignored).
    pub fn set_on_contention(&self, f: impl Fn() + Send + Sync + 'static) {
        let _ = self.on_contention.set(Box::new(f));
    }

    /// Insert a pending sandbox and its Created and Scheduled events; `already_exists` when the name is held
    /// by a running sandbox of the app.
    pub fn insert_sandbox(&self, s: &NewSandbox<'_>) -> Result<(), ApiError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| internal("begin", e))?;
        let config = serde_json::to_string(s.config).map_err(|e| internal("config", e))?;
        let tags = serde_json::to_string(s.tags).map_err(|e| internal("tags", e))?;
        let r = exec_cached(&tx,
            "INSERT INTO sandboxes (id, app, name, tags, status, config, created_at) VALUES (?1, ?2, ?3, ?4, 'pending', ?5, ?6)",
            params![s.id, s.app, s.name, tags, config, s.created_at],
        );
        if let Err(rusqlite::Error::SqliteFailure(f, _)) = &r {
            if f.code == rusqlite::ErrorCode::ConstraintViolation {
                return Err(ApiError::new(
                    ErrorCode::AlreadyExists,
                    format!(
                        "a running sandbox in app {:?} is already named {:?}",
                        s.app,
                        s.name.unwrap_or_default()
                    ),
                ));
            }
        }
        r.map_err(|e| internal("insert sandbox", e))?;
        // Created, then at once Scheduled: this host runs it (one write instead of two).
        exec_cached(&tx,
            "INSERT INTO events (sandbox_id, seq, kind, at) VALUES (?1, 1, 'created', ?2), (?1, 2, 'scheduled', ?2)",
            params![s.id, s.created_at],
        )
        .map_err(|e| internal("insert event", e))?;
        tx.commit().map_err(|e| internal("commit", e))
    }

    /// Append an event; returns its seq.
    pub fn add_event(&self, id: &str, ev: &Event) -> Result<u64, ApiError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| internal("begin", e))?;
        let seq: u64 = tx
            .prepare_cached("SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE sandbox_id = ?1")
            .and_then(|mut st| st.query_row(params![id], |r| r.get(0)))
            .map_err(|e| internal("next seq", e))?;
        exec_cached(&tx,
            "INSERT INTO events (sandbox_id, seq, kind, at, reason, returncode, message) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                id,
                seq,
                enum_str(&ev.kind),
                ev.at,
                ev.reason.map(|r| r.as_str()),
                ev.returncode,
                ev.message
            ],
        )
        .map_err(|e| internal("insert event", e))?;
        match ev.kind {
            EventKind::Started => {
                exec_cached(
                    &tx,
                    "UPDATE sandboxes SET status = 'running', started_at = ?2 WHERE id = ?1",
                    params![id, ev.at],
                )
                .map_err(|e| internal("mark started", e))?;
            }
            EventKind::Ready => {
                exec_cached(
                    &tx,
                    "UPDATE sandboxes SET ready_at = ?2 WHERE id = ?1",
                    params![id, ev.at],
                )
                .map_err(|e| internal("mark ready", e))?;
            }
            EventKind::Finished => {
                exec_cached(&tx,
                    "UPDATE sandboxes SET status = 'finished', finished_at = ?2, returncode = ?3, end_reason = ?4, error = ?5 WHERE id = ?1",
                    params![id, ev.at, ev.returncode, ev.reason.map(|r| r.as_str()), ev.message],
                )
                .map_err(|e| internal("mark finished", e))?;
            }
            _ => {}
        }
        tx.commit().map_err(|e| internal("commit", e))?;
        Ok(seq)
    }

    pub fn events(&self, id: &str, after: u64) -> Result<Vec<Event>, ApiError> {
        let conn = self.conn();
        let mut st = conn
            .prepare_cached(
                "SELECT seq, kind, at, reason, returncode, message FROM events WHERE sandbox_id = ?1 AND seq > ?2 ORDER BY seq",
            )
            .map_err(|e| internal("prepare events", e))?;
        let rows = st
            .query_map(params![id, after], |r| {
                let kind: String = r.get(1)?;
                let reason: Option<String> = r.get(3)?;
                Ok(Event {
                    seq: r.get(0)?,
                    kind: enum_from(&kind).unwrap_or(EventKind::Created),
                    at: r.get(2)?,
                    reason: reason.as_deref().and_then(enum_from),
                    returncode: r.get(4)?,
                    message: r.get(5)?,
                })
            })
            .map_err(|e| internal("query events", e))?;
        rows.collect::<Result<_, _>>()
            .map_err(|e| internal("read events", e))
    }

    pub fn set_tags(&self, id: &str, tags: &BTreeMap<String, String>) -> Result<(), ApiError> {
        let tags = serde_json::to_string(tags).map_err(|e| internal("tags", e))?;
        let n = exec_cached(
            &self.conn(),
            "UPDATE sandboxes SET tags = ?2 WHERE id = ?1",
            params![id, tags],
        )
        .map_err(|e| internal("set tags", e))?;
        if n == 0 {
            return Err(not_found_sandbox(id));
        }
        Ok(())
    }

    fn row_to_info(r: &rusqlite::Row<'_>) -> rusqlite::Result<SandboxInfo> {
        let tags: String = r.get(3)?;
        let status: String = r.get(4)?;
        let config: String = r.get(5)?;
        let end_reason: Option<String> = r.get(11)?;
        Ok(SandboxInfo {
            id: r.get(0)?,
            app: r.get(1)?,
            name: r.get(2)?,
            tags: serde_json::from_str(&tags).unwrap_or_default(),
            status: enum_from(&status).unwrap_or(SandboxStatus::Finished),
            config: serde_json::from_str(&config).unwrap_or_default(),
            created_at: r.get(6)?,
            started_at: r.get(7)?,
            ready_at: r.get(8)?,
            finished_at: r.get(9)?,
            returncode: r.get(10)?,
            end_reason: end_reason.as_deref().and_then(enum_from),
            error: r.get(12)?,
            events: Vec::new(),
        })
    }

    const COLS: &'static str = "id, app, name, tags, status, config, created_at, started_at, ready_at, finished_at, returncode, end_reason, error";

    /// A sandbox with its events; `not_found` if unknown.
    pub fn sandbox(&self, id: &str) -> Result<SandboxInfo, ApiError> {
        let info = {
            let conn = self.conn();
            conn.prepare_cached(&format!(
                "SELECT {} FROM sandboxes WHERE id = ?1",
                Self::COLS
            ))
            .and_then(|mut st| st.query_row(params![id], Self::row_to_info))
            .optional()
            .map_err(|e| internal("read sandbox", e))?
        };
        let mut info = info.ok_or_else(|| not_found_sandbox(id))?;
        info.events = self.events(id, 0)?;
        Ok(info)
    }

    /// The running sandbox named `name` in `app`; with `include_terminated`, else the newest
    /// finished one.
    pub fn by_name(
        &self,
        app: &str,
        name: &str,
        include_terminated: bool,
    ) -> Result<String, ApiError> {
        let conn = self.conn();
        let q = if include_terminated {
            "SELECT id FROM sandboxes WHERE app = ?1 AND name = ?2 ORDER BY (status = 'finished'), created_at DESC LIMIT 1"
        } else {
            "SELECT id FROM sandboxes WHERE app = ?1 AND name = ?2 AND status != 'finished' LIMIT 1"
        };
        conn.query_row(q, params![app, name], |r| r.get::<_, String>(0))
            .optional()
            .map_err(|e| internal("find by name", e))?
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::NotFound,
                    format!(
                        "no {}sandbox named {name:?} in app {app:?}",
                        if include_terminated { "" } else { "running " }
                    ),
                )
            })
    }

    /// Newest first.
    pub fn list(
        &self,
        app: Option<&str>,
        tags: &BTreeMap<String, String>,
        all: bool,
    ) -> Result<Vec<SandboxSummary>, ApiError> {
        let conn = self.conn();
        let mut st = conn
            .prepare_cached(&format!(
                "SELECT {} FROM sandboxes WHERE (?1 IS NULL OR app = ?1) AND (?2 OR status != 'finished') ORDER BY created_at DESC, rowid DESC",
                Self::COLS
            ))
            .map_err(|e| internal("prepare list", e))?;
        let rows = st
            .query_map(params![app, all], Self::row_to_info)
            .map_err(|e| internal("list", e))?;
        let mut out = Vec::new();
        for r in rows {
            let i = r.map_err(|e| internal("read list", e))?;
            if tags.iter().all(|(k, v)| i.tags.get(k) == Some(v)) {
                out.push(SandboxSummary {
                    id: i.id,
                    app: i.app,
                    name: i.name,
                    tags: i.tags,
                    status: i.status,
                    created_at: i.created_at,
                    returncode: i.returncode,
                    end_reason: i.end_reason,
                });
            }
        }
        Ok(out)
    }

    /// Ids of sandboxes not finished (a restarted sbxd reconciles them).
    pub fn unfinished(&self) -> Result<Vec<String>, ApiError> {
        let conn = self.conn();
        let mut st = conn
            .prepare("SELECT id FROM sandboxes WHERE status != 'finished'")
            .map_err(|e| internal("prepare unfinished", e))?;
        let rows = st
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(|e| internal("unfinished", e))?;
        rows.collect::<Result<_, _>>()
            .map_err(|e| internal("read unfinished", e))
    }

    pub fn count_by_status(&self) -> Result<BTreeMap<String, u64>, ApiError> {
        let conn = self.conn();
        let mut st = conn
            .prepare("SELECT status, COUNT(*) FROM sandboxes GROUP BY status")
            .map_err(|e| internal("prepare count", e))?;
        let rows = st
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u64>(1)?)))
            .map_err(|e| internal("count", e))?;
        rows.collect::<Result<_, _>>()
            .map_err(|e| internal("read count", e))
    }

    pub fn delete_sandbox(&self, id: &str) -> Result<(), ApiError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| internal("begin", e))?;
        for q in [
            "DELETE FROM events WHERE sandbox_id = ?1",
            "DELETE FROM execs WHERE sandbox_id = ?1",
            "DELETE FROM sandboxes WHERE id = ?1",
        ] {
            exec_cached(&tx, q, params![id]).map_err(|e| internal("delete sandbox", e))?;
        }
        tx.commit().map_err(|e| internal("commit", e))
    }

    pub fn insert_exec(&self, e: &ExecInfo) -> Result<(), ApiError> {
        let argv = serde_json::to_string(&e.argv).map_err(|x| internal("argv", x))?;
        self.conn()
            .prepare_cached(
"INSERT INTO execs (exec_id, sandbox_id, argv, status, started_at, stdout, stderr, pty) VALUES (?1, ?2, ?3, 'running', ?4, ?5, ?6, ?7)",            )
            .and_then(|mut st| {
                st.execute(
                params![
                    e.exec_id,
                    e.sandbox_id,
                    argv,
                    e.started_at,
                    enum_str(&e.stdout),
                    enum_str(&e.stderr),
                    e.pty
                ])
            })
            .map_err(|x| internal("insert exec", x))?;
        Ok(())
    }

    pub fn finish_exec(&self, e: &ExecInfo) -> Result<(), ApiError> {
        self.conn()
            .prepare_cached(
"UPDATE execs SET status = 'exited', returncode = ?3, signal = ?4, timed_out = ?5, oom = ?6, finished_at = ?7 WHERE sandbox_id = ?1 AND exec_id = ?2",            )
            .and_then(|mut st| {
                st.execute(
                params![
                    e.sandbox_id,
                    e.exec_id,
                    e.returncode,
                    e.signal,
                    e.timed_out,
                    e.oom,
                    e.finished_at
                ])
            })
            .map_err(|x| internal("finish exec", x))?;
        Ok(())
    }

    pub fn exec(&self, sandbox_id: &str, exec_id: &str) -> Result<ExecInfo, ApiError> {
        let conn = self.conn();
        let mut st = conn
            .prepare_cached(
                "SELECT exec_id, sandbox_id, argv, status, returncode, signal, timed_out, oom, started_at, finished_at, stdout, stderr, pty FROM execs WHERE sandbox_id = ?1 AND exec_id = ?2",
            )
            .map_err(|e| internal("prepare exec", e))?;
        st.query_row(params![sandbox_id, exec_id], |r| {
            let argv: String = r.get(2)?;
            let status: String = r.get(3)?;
            let so: String = r.get(10)?;
            let se: String = r.get(11)?;
            Ok(ExecInfo {
                exec_id: r.get(0)?,
                sandbox_id: r.get(1)?,
                argv: serde_json::from_str(&argv).unwrap_or_default(),
                status: enum_from(&status).unwrap_or(ExecStatus::Exited),
                returncode: r.get(4)?,
                signal: r.get(5)?,
                timed_out: r.get(6)?,
                oom: r.get(7)?,
                started_at: r.get(8)?,
                finished_at: r.get(9)?,
                stdout: enum_from(&so).unwrap_or(StreamMode::Pipe),
                stderr: enum_from(&se).unwrap_or(StreamMode::Pipe),
                pty: r.get(12)?,
            })
        })
        .optional()
        .map_err(|x| internal("read exec", x))?
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::NotFound,
                format!("no exec {exec_id:?} in sandbox {sandbox_id}"),
            )
        })
    }

    /// Execs recorded as running of a sandbox that has finished: they ended with it.
    pub fn end_running_execs(&self, sandbox_id: &str, at: f64) -> Result<(), ApiError> {
        exec_cached(&self.conn(),
                "UPDATE execs SET status = 'exited', returncode = 137, signal = 9, finished_at = ?2 WHERE sandbox_id = ?1 AND status = 'running'",
                params![sandbox_id, at],
            )
            .map_err(|x| internal("end execs", x))?;
        Ok(())
    }

    pub fn put_secret(&self, info: &SecretInfo, overwrite: bool) -> Result<(), ApiError> {
        let keys = serde_json::to_string(&info.keys).map_err(|x| internal("keys", x))?;
        let q = if overwrite {
            "INSERT OR REPLACE INTO secrets (name, keys, created_at) VALUES (?1, ?2, ?3)"
        } else {
            "INSERT INTO secrets (name, keys, created_at) VALUES (?1, ?2, ?3)"
        };
        match exec_cached(&self.conn(), q, params![info.name, keys, info.created_at]) {
            Err(rusqlite::Error::SqliteFailure(f, _))
                if f.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(ApiError::new(
                    ErrorCode::AlreadyExists,
                    format!(
                        "secret {:?} already exists (pass overwrite to replace it)",
                        info.name
                    ),
                ))
            }
            r => r.map(|_| ()).map_err(|x| internal("put secret", x)),
        }
    }

    pub fn secrets(&self) -> Result<Vec<SecretInfo>, ApiError> {
        let conn = self.conn();
        let mut st = conn
            .prepare("SELECT name, keys, created_at FROM secrets ORDER BY name")
            .map_err(|x| internal("prepare secrets", x))?;
        let rows = st
            .query_map([], |r| {
                let keys: String = r.get(1)?;
                Ok(SecretInfo {
                    name: r.get(0)?,
                    keys: serde_json::from_str(&keys).unwrap_or_default(),
                    created_at: r.get(2)?,
                })
            })
            .map_err(|x| internal("secrets", x))?;
        rows.collect::<Result<_, _>>()
            .map_err(|x| internal("read secrets", x))
    }

    /// Whether it existed.
    pub fn delete_secret(&self, name: &str) -> Result<bool, ApiError> {
        let n = exec_cached(
            &self.conn(),
            "DELETE FROM secrets WHERE name = ?1",
            params![name],
        )
        .map_err(|x| internal("delete secret", x))?;
        Ok(n > 0)
    }

    /// Record a volume (no-op if known).
    pub fn touch_volume(&self, name: &str, at: f64) -> Result<(), ApiError> {
        exec_cached(
            &self.conn(),
            "INSERT OR IGNORE INTO volumes (name, created_at) VALUES (?1, ?2)",
            params![name, at],
        )
        .map_err(|x| internal("record volume", x))?;
        Ok(())
    }

    pub fn volumes(&self) -> Result<Vec<(String, f64)>, ApiError> {
        let conn = self.conn();
        let mut st = conn
            .prepare("SELECT name, created_at FROM volumes ORDER BY name")
            .map_err(|x| internal("prepare volumes", x))?;
        let rows = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(|x| internal("volumes", x))?;
        rows.collect::<Result<_, _>>()
            .map_err(|x| internal("read volumes", x))
    }

    pub fn delete_volume(&self, name: &str) -> Result<bool, ApiError> {
        let n = exec_cached(
            &self.conn(),
            "DELETE FROM volumes WHERE name = ?1",
            params![name],
        )
        .map_err(|x| internal("delete volume", x))?;
        Ok(n > 0)
    }
}

pub fn not_found_sandbox(id: &str) -> ApiError {
    ApiError::new(ErrorCode::NotFound, format!("no sandbox {id:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::EndReason;

    fn tmp() -> (tempdir::Dir, Store) {
        let d = tempdir::Dir::new();
        let s = Store::open(&d.0.join("sbx.db")).unwrap();
        (d, s)
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                let p = std::env::temp_dir().join(format!(
                    "sbx-store-test-{}-{:?}",
                    std::process::id(),
                    std::thread::current().id()
                ));
                let _ = std::fs::remove_dir_all(&p);
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    fn new<'a>(
        id: &'a str,
        name: Option<&'a str>,
        tags: &'a BTreeMap<String, String>,
        cfg: &'a CreateSandbox,
        at: f64,
    ) -> NewSandbox<'a> {
        NewSandbox {
            id,
            app: "default",
            name,
            tags,
            config: cfg,
            created_at: at,
        }
    }

    #[test]
    fn names_are_unique_among_running_and_free_after_finish() {
        let (_d, s) = tmp();
        let t = BTreeMap::new();
        let c = CreateSandbox::default();
        s.insert_sandbox(&new("sb-a", Some("web"), &t, &c, 1.0))
            .unwrap();
        let e = s
            .insert_sandbox(&new("sb-b", Some("web"), &t, &c, 2.0))
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::AlreadyExists);
        assert_eq!(s.by_name("default", "web", false).unwrap(), "sb-a");
        s.add_event(
            "sb-a",
            &Event {
                seq: 0,
                kind: EventKind::Finished,
                at: 3.0,
                reason: Some(EndReason::Terminated),
                returncode: Some(137),
                message: None,
            },
        )
        .unwrap();
        assert_eq!(
            s.by_name("default", "web", false).unwrap_err().code,
            ErrorCode::NotFound
        );
        assert_eq!(s.by_name("default", "web", true).unwrap(), "sb-a");
        s.insert_sandbox(&new("sb-b", Some("web"), &t, &c, 4.0))
            .unwrap();
        assert_eq!(s.by_name("default", "web", true).unwrap(), "sb-b");
        let info = s.sandbox("sb-a").unwrap();
        assert_eq!(info.status, SandboxStatus::Finished);
        assert_eq!(info.returncode, Some(137));
        assert_eq!(info.end_reason, Some(EndReason::Terminated));
        assert_eq!(
            info.events.iter().map(|e| e.kind).collect::<Vec<_>>(),
            vec![
                EventKind::Created,
                EventKind::Scheduled,
                EventKind::Finished
            ]
        );
    }

    #[test]
    fn list_filters_by_tags_and_running_newest_first() {
        let (_d, s) = tmp();
        let c = CreateSandbox::default();
        let a: BTreeMap<_, _> = [("env".to_string(), "prod".to_string())].into();
        let b: BTreeMap<_, _> = [
            ("env".to_string(), "prod".to_string()),
            ("team".to_string(), "x".to_string()),
        ]
        .into();
        s.insert_sandbox(&new("sb-1", None, &a, &c, 1.0)).unwrap();
        s.insert_sandbox(&new("sb-2", None, &b, &c, 2.0)).unwrap();
        let ids = |v: Vec<SandboxSummary>| v.into_iter().map(|x| x.id).collect::<Vec<_>>();
        assert_eq!(
            ids(s.list(None, &a, false).unwrap()),
            vec!["sb-2".to_string(), "sb-1".to_string()]
        );
        let team: BTreeMap<_, _> = [("team".to_string(), "x".to_string())].into();
        assert_eq!(ids(s.list(None, &team, false).unwrap()), vec!["sb-2"]);
        assert!(s.list(Some("other"), &a, true).unwrap().is_empty());
    }
}
