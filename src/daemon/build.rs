//! Image builds (`POST /v1/images/build`): a base image and Dockerfile-like steps, each step
//! making a new image on top of the one before, cached by that parent and the step itself.
//!
//! RUN starts a runtime sandbox of the image so far, runs the command (as the image's user, in
//! its working directory, with its Env and the build's ARG values), streams the output, and
//! turns the sandbox's writable layer into a layer of the new image; COPY makes a layer from
//! the build context; the other steps change only the image config. Every step's result is
//! remembered under `<state>/images/build-cache/<key>` (the key hashes the parent image id, the
//! step, what COPY copies and the ARG values a RUN sees), so an unchanged recipe rebuilds
//! without running anything and yields the same image id.

use super::server::{parse, Fail};
use super::{check_argv, check_env, internal, off_thread, wait_exit, Daemon, ImageChoice};
use crate::api::images::{BuildEvent, BuildImage, BuildStep, ImageInfo};
use crate::api::{self, ApiError, ErrorCode};
use crate::runtime::{self, ExecSpec, Stdio};
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use rootfs_fetch::commit::{self, Derive};
use rootfs_fetch::store::{Digest, ImageConfig, ImageId, ImageRecord, Store};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;
use tokio::sync::mpsc;

/// How long one RUN may take before it is killed and the build fails.
const STEP_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// At most this many steps in one build.
const MAX_STEPS: usize = 1000;

/// Events queued for a client that reads slowly (RUN output then waits: back-pressure).
const EVENT_QUEUE: usize = 64;

/// What the image store records as the source of built images.
const BUILD_SOURCE: &str = "build";

/// The cache directory under the image store (also swept by `images::collect_garbage`).
const BUILD_CACHE: &str = "build-cache";

/// `POST /v1/images/build`: validate, then stream [`BuildEvent`]s as NDJSON while the build
/// runs. The build stops (and tears its sandbox down) when the client goes away.
pub(crate) async fn build_route(State(d): State<Arc<Daemon>>, body: Bytes) -> Response {
    let req = match parse::<BuildImage>("build", &body) {
        Ok(r) => r,
        Err(e) => return Fail(e).into_response(),
    };
    let plan = match Plan::check(&d, req) {
        Ok(p) => p,
        Err(e) => return Fail(e).into_response(),
    };
    let (tx, rx) = mpsc::channel::<BuildEvent>(EVENT_QUEUE);
    tokio::spawn(async move {
        let last = match run_build(&d, &plan, &tx).await {
            Ok(image) => BuildEvent::Done { image },
            Err(error) => {
                tracing::warn!(base = %plan.base_text, error = %error, "build failed");
                BuildEvent::Error(error)
            }
        };
        let _ = tx.send(last).await;
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let ev = rx.recv().await?;
        let mut line = serde_json::to_vec(&ev).unwrap_or_else(|e| {
            // Cannot happen (the events are plain data); still end the stream with a line.
            format!("{{\"error\":{{\"error\":{{\"code\":\"internal\",\"message\":\"encode a build event: {e}\"}}}}}}").into_bytes()
        });
        line.push(b'\n');
        Some((Ok::<_, std::io::Error>(Bytes::from(line)), rx))
    });
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-ndjson"),
        )],
        Body::from_stream(stream),
    )
        .into_response()
}

/// A checked build request.
struct Plan {
    base_text: String,
    base: ImageChoice,
    steps: Vec<BuildStep>,
    context: Option<PathBuf>,
    /// The tag as the store keeps it (a registry reference, normalized).
    tag: Option<String>,
    no_cache: bool,
    build_args: BTreeMap<String, String>,
}

impl Plan {
    /// Everything that can be checked before the stream starts (answered with 400 `invalid`
    /// naming the field).
    fn check(d: &Daemon, req: BuildImage) -> Result<Plan, ApiError> {
        if req.base.is_empty() {
            return Err(ApiError::invalid("base", "\"\"", "must name an image"));
        }
        let base = d.choose_image(Some(&req.base)).map_err(|e| {
            // choose_image speaks of the create's `image` field.
            match e.message.strip_prefix("invalid image ") {
                Some(rest) => ApiError::new(e.code, format!("invalid base {rest}")),
                None => e,
            }
        })?;
        if let ImageChoice::Ready(runtime::ImageRef::Dir(p), _) = &base {
            return Err(ApiError::invalid(
                "base",
                format!("{:?}", req.base),
                &format!(
                    "a dir: rootfs ({}) cannot be built on; import it as an image first",
                    p.display()
                ),
            ));
        }
        if req.steps.len() > MAX_STEPS {
            return Err(ApiError::invalid(
                "steps",
                format!("({} steps)", req.steps.len()),
                &format!("a build has at most {MAX_STEPS} steps"),
            ));
        }
        if req.steps.is_empty() && req.base == "host" {
            return Err(ApiError::invalid(
                "steps",
                "[]",
                "a build from host needs at least one step",
            ));
        }
        let context = match &req.context {
            None => None,
            Some(c) => {
                let p = PathBuf::from(c);
                if !p.is_absolute() || c.contains('\0') {
                    return Err(ApiError::invalid(
                        "context",
                        format!("{c:?}"),
                        "must be an absolute directory path",
                    ));
                }
                if !p.is_dir() {
                    return Err(ApiError::invalid(
                        "context",
                        format!("{c:?}"),
                        "is not a directory on the sbxd host",
                    ));
                }
                Some(p)
            }
        };
        for (i, step) in req.steps.iter().enumerate() {
            check_step(i, step, context.is_some())?;
        }
        for (k, v) in &req.build_args {
            if !api::valid_env_key(k) || v.contains('\0') {
                return Err(ApiError::invalid(
                    "build_args",
                    format!("{k:?}"),
                    "names must match ^[A-Za-z_][A-Za-z0-9_]*$ and values hold no NUL",
                ));
            }
        }
        let tag = match &req.tag {
            None => None,
            Some(t) => Some(normalize_tag(t)?),
        };
        Ok(Plan {
            base_text: req.base,
            base,
            steps: req.steps,
            context,
            tag,
            no_cache: req.no_cache,
            build_args: req.build_args,
        })
    }
}

/// A build tag is a registry-style name (`myapp:dev`, `registry.local/team/app:1`), stored
/// normalized as pulls are, so that a create with that `image` finds it without pulling.
fn normalize_tag(t: &str) -> Result<String, ApiError> {
    use rootfs_fetch::reference::Reference;
    let bad = |why: &str| ApiError::invalid("tag", format!("{t:?}"), why);
    match Reference::parse(t) {
        Ok(Reference::Registry(r)) if r.digest.is_none() => Ok(r.to_string()),
        Ok(Reference::Registry(_)) => Err(bad("a tag cannot carry a digest")),
        Ok(_) => Err(bad(
            "must be a name like myapp:dev (not host, an image id or a path reference)",
        )),
        Err(e) => Err(bad(&e.reason)),
    }
}

fn check_step(i: usize, step: &BuildStep, have_context: bool) -> Result<(), ApiError> {
    let f = |name: &str| format!("steps[{i}].{name}");
    let no_nul = |name: &str, v: &str| {
        if v.contains('\0') {
            Err(ApiError::invalid(&f(name), format!("{v:?}"), "NUL byte"))
        } else {
            Ok(())
        }
    };
    match step {
        BuildStep::Run { argv } => check_argv(&f("argv"), argv, true),
        BuildStep::Cmd { argv } | BuildStep::Entrypoint { argv } => {
            check_argv(&f("argv"), argv, false)
        }
        BuildStep::Env { vars } => {
            if vars.is_empty() {
                return Err(ApiError::invalid(&f("vars"), "{}", "names no variable"));
            }
            check_env(&f("vars"), vars)
        }
        BuildStep::Workdir { path } => {
            if path.is_empty() {
                return Err(ApiError::invalid(
                    &f("path"),
                    "\"\"",
                    "must name a directory",
                ));
            }
            no_nul("path", path)
        }
        BuildStep::User { user } => {
            if user.is_empty()
                || user.split(':').count() > 2
                || user.chars().any(char::is_whitespace)
            {
                return Err(ApiError::invalid(
                    &f("user"),
                    format!("{user:?}"),
                    "must be NAME, UID, NAME:GROUP or UID:GID",
                ));
            }
            no_nul("user", user)
        }
        BuildStep::Arg { name, default } => {
            if !api::valid_env_key(name) {
                return Err(ApiError::invalid(
                    &f("name"),
                    format!("{name:?}"),
                    "must match ^[A-Za-z_][A-Za-z0-9_]*$",
                ));
            }
            no_nul("default", default.as_deref().unwrap_or(""))
        }
        BuildStep::Copy { sources, dest } => {
            if !have_context {
                return Err(ApiError::invalid(
                    "context",
                    "null",
                    &format!("step {i} is a COPY: the build needs a context directory"),
                ));
            }
            if sources.is_empty() {
                return Err(ApiError::invalid(
                    &f("sources"),
                    "[]",
                    "names nothing to copy",
                ));
            }
            for s in sources {
                if s.is_empty() || s.split('/').any(|c| c == "..") || s.contains('\0') {
                    return Err(ApiError::invalid(
                        &f("sources"),
                        format!("{s:?}"),
                        "must be a path in the context (relative to it), without ..",
                    ));
                }
            }
            if dest.is_empty() {
                return Err(ApiError::invalid(&f("dest"), "\"\"", "must name a path"));
            }
            no_nul("dest", dest)
        }
    }
}

/// The step as a Dockerfile line (`RUN make`, `COPY a b /app/`).
pub(crate) fn step_text(step: &BuildStep) -> String {
    let json = |v: &[String]| serde_json::to_string(v).unwrap_or_default();
    let shell_or_json = |v: &[String]| match v {
        [sh, c, cmd] if sh == "/bin/sh" && c == "-c" => cmd.clone(),
        _ => json(v),
    };
    let word = |s: &str| {
        if s.is_empty()
            || s.chars()
                .any(|c| c.is_whitespace() || c == '"' || c == '\\')
        {
            serde_json::to_string(s).unwrap_or_default()
        } else {
            s.to_string()
        }
    };
    match step {
        BuildStep::Run { argv } => format!("RUN {}", shell_or_json(argv)),
        BuildStep::Cmd { argv } => format!("CMD {}", json(argv)),
        BuildStep::Entrypoint { argv } => format!("ENTRYPOINT {}", json(argv)),
        BuildStep::Env { vars } => {
            let kv: Vec<String> = vars
                .iter()
                .map(|(k, v)| format!("{k}={}", word(v)))
                .collect();
            format!("ENV {}", kv.join(" "))
        }
        BuildStep::Workdir { path } => format!("WORKDIR {path}"),
        BuildStep::User { user } => format!("USER {user}"),
        BuildStep::Arg {
            name,
            default: None,
        } => format!("ARG {name}"),
        BuildStep::Arg {
            name,
            default: Some(v),
        } => format!("ARG {name}={}", word(v)),
        BuildStep::Copy { sources, dest } => {
            if sources
                .iter()
                .chain([dest])
                .any(|s| s.chars().any(char::is_whitespace))
            {
                let mut all = sources.clone();
                all.push(dest.clone());
                format!("COPY {}", json(&all))
            } else {
                format!("COPY {} {dest}", sources.join(" "))
            }
        }
    }
}

/// The image a step builds on: the built-in host image or one in the store.
#[derive(Clone)]
struct Current {
    /// None: the host image itself (the base, before any step).
    rec: Option<ImageRecord>,
}

impl Current {
    fn key_part(&self) -> String {
        match &self.rec {
            Some(r) => r.id.to_string(),
            None => "host".into(),
        }
    }

    fn config(&self) -> ImageConfig {
        self.rec
            .as_ref()
            .map(|r| r.config.clone())
            .unwrap_or_default()
    }

    fn host_base(&self) -> bool {
        self.rec.as_ref().is_none_or(|r| r.host_base)
    }

    fn image_ref(&self) -> runtime::ImageRef {
        match &self.rec {
            Some(r) => runtime::ImageRef::Stored(r.id.clone()),
            None => runtime::ImageRef::Host,
        }
    }
}

/// What the build knows between steps.
struct Scope {
    /// ARG values declared so far (an ARG with no default and no build arg has none).
    args: BTreeMap<String, String>,
    /// Whether a CMD step of this build set the Cmd (an ENTRYPOINT then keeps it; otherwise an
    /// ENTRYPOINT clears the Cmd inherited from the base, as Docker does).
    cmd_set: bool,
}

/// Where step `i` failed: `step 3/7 (RUN make)`.
fn at(i: usize, total: usize, text: &str) -> String {
    format!("step {}/{total} ({text})", i + 1)
}

async fn run_build(
    d: &Arc<Daemon>,
    plan: &Plan,
    tx: &mpsc::Sender<BuildEvent>,
) -> Result<ImageInfo, ApiError> {
    let state_dir = d.cfg.state_dir.clone();
    let store = {
        let s = state_dir.clone();
        off_thread(move || {
            rootfs_fetch::image_store(&s).map_err(|e| format!("open the image store: {e}"))
        })
        .await
        .map_err(internal)?
    };
    let mut cur = match &plan.base {
        ImageChoice::Ready(runtime::ImageRef::Host, _) => Current { rec: None },
        ImageChoice::Ready(runtime::ImageRef::Stored(id), _) => {
            let (s, id) = (store.clone(), id.clone());
            let rec = off_thread(move || {
                s.load_image(&id)
                    .map_err(|e| format!("read base image {id}: {e}"))
            })
            .await
            .map_err(|e| ApiError::new(ErrorCode::NotFound, e))?;
            Current { rec: Some(rec) }
        }
        ImageChoice::Ready(runtime::ImageRef::Dir(_), _) => {
            return Err(ApiError::invalid(
                "base",
                format!("{:?}", plan.base_text),
                "a dir: rootfs cannot be built on",
            ))
        }
        ImageChoice::Fetch(f) => {
            let log = Arc::new(super::PullLog {
                sandbox: "build".into(),
                image: f.text.clone(),
            });
            let rec = d.resolve_image("build", f, log, false).await.map_err(|e| {
                ApiError::new(e.code, format!("base image {}: {}", f.text, e.message))
            })?;
            Current { rec: Some(rec) }
        }
    };
    let cache_dir = store.root().join(BUILD_CACHE);
    std::fs::create_dir_all(&cache_dir)
        .map_err(|e| internal(format!("create {}: {e}", cache_dir.display())))?;
    let total = plan.steps.len();
    let mut scope = Scope {
        args: BTreeMap::new(),
        cmd_set: false,
    };
    for (i, raw) in plan.steps.iter().enumerate() {
        if tx.is_closed() {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                "the client went away: build stopped",
            ));
        }
        let text = step_text(raw);
        let here = at(i, total, &text);
        let step = substitute_step(raw, &scope, &cur.config())
            .map_err(|e| ApiError::new(ErrorCode::Invalid, format!("{here}: {e}")))?;
        if let BuildStep::Arg { name, default } = &step {
            match plan.build_args.get(name).or(default.as_ref()) {
                Some(v) => {
                    scope.args.insert(name.clone(), v.clone());
                }
                None => {
                    scope.args.remove(name);
                }
            }
        }
        // What the step's result depends on besides the parent and the step.
        let mut extra = String::new();
        if let BuildStep::Copy { sources, .. } = &step {
            let ctx = plan.context.clone().ok_or_else(|| {
                ApiError::invalid("context", "null", "COPY needs a context directory")
            })?;
            let srcs = sources.clone();
            let digest =
                off_thread(move || commit::context_digest(&ctx, &srcs).map_err(|e| e.to_string()))
                    .await
                    .map_err(|e| ApiError::new(ErrorCode::Invalid, format!("{here}: {e}")))?;
            extra = digest.to_string();
        }
        if let BuildStep::Run { .. } = &step {
            extra = serde_json::to_string(&scope.args).unwrap_or_default();
        }
        if let BuildStep::Entrypoint { .. } = &step {
            // ENTRYPOINT clears a Cmd inherited from the base, not one this build set.
            extra = format!("cmd_set={}", scope.cmd_set);
        }
        let key = cache_key(&cur.key_part(), &step, &extra);
        let gate = key_gate(&key);
        let _held = gate.lock().await;
        // No garbage collection while the step stores blobs and records (nor removes the
        // image it builds on).
        let _storing = d.image_gc.read().await;
        let cache_file = cache_dir.join(&key);
        let hit = if plan.no_cache {
            None
        } else {
            cache_lookup(&store, &cache_file).await
        };
        let rec = match hit {
            Some(rec) => {
                send(
                    tx,
                    BuildEvent::Step {
                        index: i,
                        total,
                        text: text.clone(),
                        cached: true,
                    },
                )
                .await;
                rec
            }
            None => {
                send(
                    tx,
                    BuildEvent::Step {
                        index: i,
                        total,
                        text: text.clone(),
                        cached: false,
                    },
                )
                .await;
                let rec = run_step(d, &store, plan, &cur, &step, &mut scope, &here, tx).await?;
                let (f, id) = (cache_file.clone(), rec.id.to_string());
                off_thread(move || {
                    write_text_atomic(&f, &id).map_err(|e| format!("record {}: {e}", f.display()))
                })
                .await
                .map_err(internal)?;
                rec
            }
        };
        if matches!(step, BuildStep::Cmd { .. }) {
            scope.cmd_set = true;
        }
        tracing::info!(step = i + 1, total, text = %text, image = %rec.id, "build step done");
        send(
            tx,
            BuildEvent::StepDone {
                index: i,
                image: rec.id.to_string(),
            },
        )
        .await;
        cur = Current { rec: Some(rec) };
    }
    let Some(rec) = cur.rec else {
        // Plan::check refuses a build from host without steps.
        return Err(internal("a build from host produced no image"));
    };
    let _storing = d.image_gc.read().await;
    let s = store.clone();
    let tag = plan.tag.clone();
    off_thread(move || {
        if let Some(t) = &tag {
            s.set_tag(t, &rec.id)
                .map_err(|e| format!("tag {} as {t}: {e}", rec.id))?;
        }
        super::images::info_of(&s, &rec).map_err(|e| e.message)
    })
    .await
    .map_err(internal)
}

async fn send(tx: &mpsc::Sender<BuildEvent>, ev: BuildEvent) {
    // A client that went away stops the build at the next check; nothing to do here.
    let _ = tx.send(ev).await;
}

/// The cache key of a step: sha256 over the parent, the step (after ARG substitution) and
/// what else its result depends on, as hex.
fn cache_key(parent: &str, step: &BuildStep, extra: &str) -> String {
    let step_json = serde_json::to_string(step).unwrap_or_default();
    let text = format!("sbx-build-v1\0{parent}\0{step_json}\0{extra}");
    Digest::of(text.as_bytes()).hex().to_string()
}

/// One lock per cache key: a second build of the same step waits for the first and then
/// finds its result in the cache.
fn key_gate(key: &str) -> Arc<tokio::sync::Mutex<()>> {
    static GATES: OnceLock<Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>> = OnceLock::new();
    let mut m = GATES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    m.retain(|_, w| w.strong_count() > 0);
    if let Some(g) = m.get(key).and_then(Weak::upgrade) {
        return g;
    }
    let g = Arc::new(tokio::sync::Mutex::new(()));
    m.insert(key.to_string(), Arc::downgrade(&g));
    g
}

/// The image a cache entry names, if the entry and the image are both still there.
async fn cache_lookup(store: &Store, file: &Path) -> Option<ImageRecord> {
    let (s, f) = (store.clone(), file.to_path_buf());
    off_thread(move || {
        let text = std::fs::read_to_string(&f).map_err(|e| e.to_string())?;
        let id = ImageId::parse(text.trim()).map_err(|e| e.reason.to_string())?;
        s.load_image(&id).map_err(|e| e.to_string())
    })
    .await
    .ok()
}

fn write_text_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension(format!(
        "tmp-{}-{}",
        std::process::id(),
        super::random_id("", 8)
    ));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Execute one (uncached) step: the new image record.
#[allow(clippy::too_many_arguments)]
async fn run_step(
    d: &Arc<Daemon>,
    store: &Store,
    plan: &Plan,
    cur: &Current,
    step: &BuildStep,
    scope: &mut Scope,
    here: &str,
    tx: &mpsc::Sender<BuildEvent>,
) -> Result<ImageRecord, ApiError> {
    let mut config = cur.config();
    let mut layer = None;
    match step {
        BuildStep::Run { argv } => {
            layer = Some(run_in_sandbox(d, store, cur, argv, &scope.args, here, tx).await?);
        }
        BuildStep::Env { vars } => {
            for (k, v) in vars {
                let prefix = format!("{k}=");
                let entry = format!("{k}={v}");
                match config.env.iter_mut().find(|e| e.starts_with(&prefix)) {
                    Some(e) => *e = entry,
                    None => config.env.push(entry),
                }
            }
        }
        BuildStep::Workdir { path } => {
            config.working_dir = Some(join_path(config.working_dir.as_deref(), path));
        }
        BuildStep::User { user } => config.user = Some(user.clone()),
        BuildStep::Cmd { argv } => config.cmd = Some(argv.clone()),
        BuildStep::Entrypoint { argv } => {
            config.entrypoint = Some(argv.clone());
            if !scope.cmd_set {
                config.cmd = None;
            }
        }
        BuildStep::Arg { .. } => {}
        BuildStep::Copy { sources, dest } => {
            let mut abs = join_path(config.working_dir.as_deref(), dest);
            if (dest.ends_with('/') || dest == "." || dest.ends_with("/.")) && !abs.ends_with('/') {
                abs.push('/');
            }
            let ctx = plan.context.clone().ok_or_else(|| {
                ApiError::invalid("context", "null", "COPY needs a context directory")
            })?;
            let (s, srcs) = (store.clone(), sources.clone());
            layer = Some(
                off_thread(move || {
                    commit::layer_from_context(&s, &ctx, &srcs, &abs).map_err(|e| e.to_string())
                })
                .await
                .map_err(|e| ApiError::new(ErrorCode::Invalid, format!("{here}: {e}")))?,
            );
        }
    }
    let (s, parent, host_base) = (store.clone(), cur.rec.clone(), cur.host_base());
    let created_by = step_text(step);
    let here2 = here.to_string();
    off_thread(move || {
        commit::derive_image(
            &s,
            Derive {
                parent: parent.as_ref(),
                host_base,
                layer,
                config,
                created_by,
                reference: BUILD_SOURCE.into(),
            },
        )
        .map_err(|e| format!("{here2}: write the image: {e}"))
    })
    .await
    .map_err(internal)
}

/// A runtime sandbox of a build, torn down when dropped (also when the build is cancelled).
struct BuildSandbox(Option<Arc<runtime::Sandbox>>);

impl BuildSandbox {
    fn get(&self) -> Arc<runtime::Sandbox> {
        self.0.clone().expect("present until destroy")
    }

    /// Tear it down now, off the async threads; errors are logged (the step's outcome is
    /// already known and more important).
    async fn destroy(mut self) {
        let Some(sb) = self.0.take() else { return };
        let id = sb.id().to_string();
        let r = tokio::task::spawn_blocking(move || match Arc::try_unwrap(sb) {
            Ok(sb) => sb.destroy(),
            // A waiter still holds it: the last holder's drop tears it down.
            Err(shared) => shared.kill(),
        })
        .await;
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(sandbox = %id, error = %e, "build sandbox teardown"),
            Err(e) => tracing::error!(sandbox = %id, error = %e, "build sandbox teardown panicked"),
        }
    }
}

impl Drop for BuildSandbox {
    fn drop(&mut self) {
        if let Some(sb) = self.0.take() {
            let _ = sb.kill();
        }
    }
}

/// RUN: the command in a sandbox of the current image; its writable layer as a new layer.
async fn run_in_sandbox(
    d: &Arc<Daemon>,
    store: &Store,
    cur: &Current,
    argv: &[String],
    args: &BTreeMap<String, String>,
    here: &str,
    tx: &mpsc::Sender<BuildEvent>,
) -> Result<rootfs_fetch::store::LayerRef, ApiError> {
    let config = cur.config();
    // ARG values, under the image's Env (ENV wins over ARG, as in Docker).
    let mut env = args.clone();
    env.extend(
        config
            .env
            .iter()
            .filter_map(|kv| kv.split_once('='))
            .filter(|(k, _)| api::valid_env_key(k))
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    super::check_process_size(argv, &env)
        .map_err(|e| ApiError::new(e.code, format!("{here}: {}", e.message)))?;
    let cwd = config.working_dir.clone().filter(|w| w.starts_with('/'));
    let user = config.user.clone().filter(|u| !u.is_empty());
    let spec = runtime::SandboxSpec {
        id: Some(super::new_sandbox_id()),
        image: cur.image_ref(),
        ..Default::default()
    };
    let rt = d.rt.clone();
    let sb = tokio::task::spawn_blocking(move || runtime::Sandbox::spawn(&rt, spec))
        .await
        .map_err(|e| internal(format!("{here}: start the build sandbox panicked: {e}")))?
        .map_err(|e| internal(format!("{here}: start the build sandbox: {e}")))?;
    let sb = BuildSandbox(Some(Arc::new(sb)));
    tracing::info!(sandbox = %sb.get().id(), step = %here, "build step running");
    let r = run_and_commit(&sb, store, argv, env, cwd, user, here, tx).await;
    sb.destroy().await;
    r
}

#[allow(clippy::too_many_arguments)]
async fn run_and_commit(
    sb: &BuildSandbox,
    store: &Store,
    argv: &[String],
    env: BTreeMap<String, String>,
    cwd: Option<String>,
    user: Option<String>,
    here: &str,
    tx: &mpsc::Sender<BuildEvent>,
) -> Result<rootfs_fetch::store::LayerRef, ApiError> {
    let s = sb.get();
    let argv = argv.to_vec();
    let here_s = here.to_string();
    let started = tokio::task::spawn_blocking(move || {
        let (uid, gid) = match &user {
            Some(u) => super::resolve_user(&s, u).map_err(|e| {
                ApiError::new(ErrorCode::Invalid, format!("{here_s}: USER {u}: {e}"))
            })?,
            None => (0, 0),
        };
        if let Some(w) = &cwd {
            s.fs().mkdir(w, true).map_err(|e| {
                ApiError::new(
                    ErrorCode::Invalid,
                    format!("{here_s}: create the working directory {w}: {e}"),
                )
            })?;
        }
        let spec = ExecSpec {
            argv,
            env: env.into_iter().collect(),
            cwd,
            uid,
            gid,
            stdin: Stdio::Null,
            stdout: Stdio::Pipe,
            stderr: Stdio::Pipe,
            pty: None,
        };
        s.exec(spec).map_err(|e| {
            let code = match &e {
                runtime::RuntimeError::Exec { errno, .. }
                    if *errno == libc::ENOENT
                        || *errno == libc::EACCES
                        || *errno == libc::ENOTDIR =>
                {
                    ErrorCode::NotFound
                }
                runtime::RuntimeError::Invalid { .. } => ErrorCode::Invalid,
                _ => ErrorCode::Internal,
            };
            ApiError::new(code, format!("{here_s}: {e}"))
        })
    })
    .await
    .map_err(|e| internal(format!("{here}: exec panicked: {e}")))??;
    let mut p = started;
    let pumps: Vec<_> = [("stdout", p.stdout.take()), ("stderr", p.stderr.take())]
        .into_iter()
        .filter_map(|(name, f)| f.map(|f| (name, f)))
        .map(|(name, f)| tokio::spawn(pump(name, f, tx.clone())))
        .collect();
    let pr = Arc::new(std::sync::RwLock::new(p));
    let exit = tokio::select! {
        r = wait_exit(pr, Some(STEP_TIMEOUT)) => Some(r),
        _ = tx.closed() => None,
    };
    // Whatever the outcome, nothing of this step runs on: background processes end, their
    // pipes close, and the writable layer holds still for the commit.
    let s = sb.get();
    let _ = tokio::task::spawn_blocking(move || s.kill()).await;
    for h in pumps {
        match tokio::time::timeout(Duration::from_secs(10), h).await {
            Ok(_) => {}
            Err(_) => tracing::warn!(step = %here, "build output still open 10 s after the kill"),
        }
    }
    let Some((exit, timed_out)) = exit else {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            format!("{here}: the client went away: build stopped"),
        ));
    };
    if timed_out {
        return Err(ApiError::new(
            ErrorCode::Timeout,
            format!(
                "{here}: still running after {} minutes: killed",
                STEP_TIMEOUT.as_secs() / 60
            ),
        ));
    }
    let code = exit.map(|x| x.code()).unwrap_or(137);
    if code != 0 {
        let oom = if exit.is_some_and(|x| x.oom) {
            " (out of memory)"
        } else {
            ""
        };
        return Err(ApiError::new(
            ErrorCode::Invalid,
            format!("{here}: the command exited with code {code}{oom}"),
        ));
    }
    // init gone (the kill above): no process writes to the upper dir any more.
    let s = sb.get();
    let ended = tokio::time::timeout(
        Duration::from_secs(30),
        super::waiter_thread("sbx-build-wait", move || s.wait()),
    )
    .await;
    if !matches!(ended, Ok(Ok(Ok(_)))) {
        return Err(internal(format!(
            "{here}: the build sandbox did not end after its kill"
        )));
    }
    let s = sb.get();
    let (upper, (base, count)) = (s.upper_dir(), s.id_range());
    drop(s);
    let st = store.clone();
    let here_s = here.to_string();
    off_thread(move || {
        commit::layer_from_upper(&st, &upper, base, count)
            .map_err(|e| format!("{here_s}: commit the filesystem changes: {e}"))
    })
    .await
    .map_err(internal)
}

/// Forward one output pipe as `Output` events until EOF (lossy UTF-8; a character split
/// across reads is kept whole).
async fn pump(stream: &'static str, f: std::fs::File, tx: mpsc::Sender<BuildEvent>) {
    use tokio::io::AsyncReadExt;
    let mut rd = match tokio::net::unix::pipe::Receiver::from_file(f) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "register a build output pipe");
            return;
        }
    };
    let mut buf = vec![0u8; 64 << 10];
    let mut carry: Vec<u8> = Vec::new();
    let mut open = true;
    loop {
        let n = match rd.read(&mut buf).await {
            Ok(0) | Err(_) => 0,
            Ok(n) => n,
        };
        if n == 0 {
            if !carry.is_empty() && open {
                let data = String::from_utf8_lossy(&carry).into_owned();
                let _ = tx
                    .send(BuildEvent::Output {
                        stream: stream.into(),
                        data,
                    })
                    .await;
            }
            return;
        }
        carry.extend_from_slice(&buf[..n]);
        // Keep an incomplete UTF-8 sequence at the end for the next read.
        let keep = match std::str::from_utf8(&carry) {
            Ok(_) => 0,
            Err(e) if e.error_len().is_none() => carry.len() - e.valid_up_to(),
            Err(_) => 0,
        };
        let rest = carry.split_off(carry.len() - keep);
        let data = String::from_utf8_lossy(&carry).into_owned();
        carry = rest;
        // A client that went away: keep draining so the process never blocks on a full pipe.
        if open
            && tx
                .send(BuildEvent::Output {
                    stream: stream.into(),
                    data,
                })
                .await
                .is_err()
        {
            open = false;
        }
    }
}

/// `path` taken relative to `base` (default `/`), normalized (`.`, `..` and repeated `/`
/// resolved lexically); always absolute.
fn join_path(base: Option<&str>, path: &str) -> String {
    let full = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("{}/{path}", base.unwrap_or("/"))
    };
    let mut parts: Vec<&str> = Vec::new();
    for c in full.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
}

/// ARG (and image ENV) substitution in the steps Docker substitutes: ENV values, WORKDIR,
/// COPY, USER and ARG defaults. RUN, CMD and ENTRYPOINT are left as written (a RUN sees the
/// ARG values in its environment, and its shell expands them, as in Docker).
fn substitute_step(
    step: &BuildStep,
    scope: &Scope,
    config: &ImageConfig,
) -> Result<BuildStep, String> {
    let mut vars = scope.args.clone();
    vars.extend(
        config
            .env
            .iter()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let sub = |s: &str| substitute(s, &vars);
    Ok(match step {
        BuildStep::Env { vars: m } => BuildStep::Env {
            vars: m
                .iter()
                .map(|(k, v)| Ok((k.clone(), sub(v)?)))
                .collect::<Result<_, String>>()?,
        },
        BuildStep::Workdir { path } => BuildStep::Workdir { path: sub(path)? },
        BuildStep::User { user } => BuildStep::User { user: sub(user)? },
        BuildStep::Copy { sources, dest } => BuildStep::Copy {
            sources: sources.iter().map(|s| sub(s)).collect::<Result<_, _>>()?,
            dest: sub(dest)?,
        },
        BuildStep::Arg { name, default } => BuildStep::Arg {
            name: name.clone(),
            default: default.as_deref().map(sub).transpose()?,
        },
        other => other.clone(),
    })
}

/// `$NAME`, `${NAME}`, `${NAME:-word}`, `${NAME:+word}`; `\$` is a literal `$`; an unset
/// name is empty (Docker's rules).
pub(crate) fn substitute(s: &str, vars: &BTreeMap<String, String>) -> Result<String, String> {
    let b: Vec<char> = s.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_';
    while i < b.len() {
        match b[i] {
            '\\' if b.get(i + 1) == Some(&'$') => {
                out.push('$');
                i += 2;
            }
            '$' if b.get(i + 1) == Some(&'{') => {
                let close = b[i + 2..]
                    .iter()
                    .position(|&c| c == '}')
                    .ok_or_else(|| format!("{s:?}: unterminated ${{"))?;
                let inner: String = b[i + 2..i + 2 + close].iter().collect();
                let (name, op) = match inner.find(':') {
                    Some(k) => (&inner[..k], Some(&inner[k..])),
                    None => (inner.as_str(), None),
                };
                if name.is_empty() || !name.chars().all(is_name) {
                    return Err(format!("{s:?}: bad variable name {name:?}"));
                }
                let val = vars.get(name).filter(|v| !v.is_empty());
                match op {
                    None => out.push_str(vars.get(name).map(String::as_str).unwrap_or("")),
                    Some(o) if o.starts_with(":-") => {
                        out.push_str(val.map(String::as_str).unwrap_or(&o[2..]))
                    }
                    Some(o) if o.starts_with(":+") => {
                        if val.is_some() {
                            out.push_str(&o[2..])
                        }
                    }
                    Some(o) => return Err(format!("{s:?}: unsupported modifier {o:?} of ${name}")),
                }
                i += close + 3;
            }
            '$' if b
                .get(i + 1)
                .is_some_and(|&c| c.is_ascii_alphabetic() || c == '_') =>
            {
                let mut j = i + 1;
                while j < b.len() && is_name(b[j]) {
                    j += 1;
                }
                let name: String = b[i + 1..j].iter().collect();
                out.push_str(vars.get(&name).map(String::as_str).unwrap_or(""));
                i = j;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn substitution_follows_docker() {
        let v = vars(&[("A", "x"), ("E", "")]);
        assert_eq!(substitute("/a/$A/b", &v).unwrap(), "/a/x/b");
        assert_eq!(substitute("${A}y", &v).unwrap(), "xy");
        assert_eq!(substitute("$NOPE-", &v).unwrap(), "-");
        assert_eq!(substitute("${E:-d} ${A:-d}", &v).unwrap(), "d x");
        assert_eq!(substitute("${A:+set}${E:+set}", &v).unwrap(), "set");
        assert_eq!(substitute("\\$A $ 5$", &v).unwrap(), "$A $ 5$");
        assert!(substitute("${A", &v).is_err());
        assert!(substitute("${A:?x}", &v).is_err());
    }

    #[test]
    fn paths_join_lexically() {
        assert_eq!(join_path(None, "app"), "/app");
        assert_eq!(join_path(Some("/srv"), "a/../b/./c"), "/srv/b/c");
        assert_eq!(join_path(Some("/srv"), "/abs"), "/abs");
        assert_eq!(join_path(Some("/srv"), "."), "/srv");
        assert_eq!(join_path(Some("/"), "../.."), "/");
    }

    #[test]
    fn step_texts_read_like_a_dockerfile() {
        let run = BuildStep::Run {
            argv: vec!["/bin/sh".into(), "-c".into(), "make all".into()],
        };
        assert_eq!(step_text(&run), "RUN make all");
        let exec = BuildStep::Run {
            argv: vec!["/bin/true".into()],
        };
        assert_eq!(step_text(&exec), "RUN [\"/bin/true\"]");
        let env = BuildStep::Env {
            vars: vars(&[("A", "1"), ("B", "two words")]),
        };
        assert_eq!(step_text(&env), "ENV A=1 B=\"two words\"");
        let copy = BuildStep::Copy {
            sources: vec!["a".into(), "b".into()],
            dest: "/app/".into(),
        };
        assert_eq!(step_text(&copy), "COPY a b /app/");
    }

    #[test]
    fn cache_keys_change_with_parent_step_and_extra() {
        let s = BuildStep::User {
            user: "1000".into(),
        };
        let k = cache_key("host", &s, "");
        assert_eq!(k, cache_key("host", &s, ""));
        assert_ne!(k, cache_key("im-000000000000000000000001", &s, ""));
        assert_ne!(k, cache_key("host", &s, "{\"V\":\"1\"}"));
        assert_ne!(
            k,
            cache_key(
                "host",
                &BuildStep::User {
                    user: "1001".into()
                },
                ""
            )
        );
        assert_eq!(k.len(), 64);
    }

    #[test]
    fn tags_are_normalized_registry_names() {
        assert_eq!(
            normalize_tag("myapp:dev").unwrap(),
            "docker.io/library/myapp:dev"
        );
        assert_eq!(
            normalize_tag("127.0.0.1:5000/t/app:1").unwrap(),
            "127.0.0.1:5000/t/app:1"
        );
        assert!(normalize_tag("host").is_err());
        assert!(normalize_tag("Bad Tag").is_err());
    }
}
