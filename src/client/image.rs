//! Images in Modal's shape: an [`Image`] is a recipe (a base and build steps) that
//! [`Image::build`] turns into an `im-…` image in sbxd's store, and that
//! [`Sandbox::create`](super::Sandbox::create) accepts directly; plus the store calls (pull, list,
//! inspect, remove, export).
//!
//! ```no_run
//! use sbx::client::{Client, CreateSandbox, Image, Sandbox};
//!
//! # async fn demo() -> sbx::client::Result<()> {
//! let client = Client::connect().await?;
//! let image = Image::host()
//!     .run_commands(["mkdir -p /opt/app", "echo built > /opt/app/stamp"])
//!     .env([("APP_MODE", "dev")])
//!     .workdir("/opt/app")
//!     .copy_local_file("./config.toml", "/opt/app/config.toml");
//! // Each step is cached by its parent and itself: a second build reuses every step.
//! let built = image.build_with(&client, |ev| println!("{ev:?}")).await?;
//! println!("{}", built.id); // im-…
//!
//! // Or let create build it (quietly) and start a sandbox from the result.
//! let sb = Sandbox::create(&client, CreateSandbox {
//!     entrypoint: vec!["cat".into(), "stamp".into()],
//!     ..Default::default()
//! }.with_image(image)).await?;
//! # let _ = sb; Ok(()) }
//! ```
//!
//! Recipe mistakes (a Dockerfile line sbx does not support, a local path that does not exist)
//! are kept and reported as [`Error::Invalid`] by the call that needs the recipe (`build`,
//! `create`, `export`), so the builder methods chain without `?`.

use super::stream::LineBuffer;
use super::transport::{enc, Payload, Retry};
use super::{Client, Error, Result};
use crate::api::dockerfile;
use crate::api::images::{
    BuildEvent, BuildImage, BuildStep, ExportImage, ExportResult, ImageInfo, PullEvent, PullImage,
    IMAGE_ID_HEX,
};
use crate::api::CreateSandbox;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::Method;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

/// A recipe for an image: where it starts and the steps on top (Modal's `modal.Image`).
/// Cheap to clone; every builder method returns a new recipe.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    from: From,
    steps: Vec<Step>,
    build_args: BTreeMap<String, String>,
    tag: Option<String>,
    force_build: bool,
    /// The first recipe mistake, reported by the call that needs the recipe.
    error: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
enum From {
    /// `host`, a registry reference, `oci:…`, `dir:…`, an `im-…` id.
    Reference(String),
    /// Read and parsed when the recipe is used (so `build_args` apply to its `FROM`).
    Dockerfile { path: PathBuf, context: PathBuf },
}

#[derive(Debug, Clone, PartialEq)]
enum Step {
    Api(BuildStep),
    /// COPY with its own context directory (absolute, canonical); the build's one context is
    /// the common ancestor of all of them.
    Copy {
        context: PathBuf,
        sources: Vec<String>,
        dest: String,
    },
}

/// A built image in sbxd's store.
#[derive(Debug, Clone, PartialEq)]
pub struct BuiltImage {
    /// `im-…`: give it to `CreateSandbox::image` or [`Image::from_id`].
    pub id: String,
    pub info: ImageInfo,
}

impl Default for Image {
    /// [`Image::host`].
    fn default() -> Image {
        Image::host()
    }
}

impl Image {
    fn from_ref(reference: impl Into<String>) -> Image {
        Image {
            from: From::Reference(reference.into()),
            steps: Vec::new(),
            build_args: BTreeMap::new(),
            tag: None,
            force_build: false,
            error: None,
        }
    }

    /// The built-in `host` image (the host's /usr read-only, a minimal /etc); the default.
    pub fn host() -> Image {
        Image::from_ref("host")
    }

    /// An image from a registry (`127.0.0.1:5000/team/app:1`, `python:3.13-slim`), or any
    /// reference `create` takes (`oci:/abs/layout[:TAG]`, `docker-archive:/abs/file.tar`,
    /// `dir:/abs/rootfs`). Pulled into sbxd's store on first use.
    pub fn from_registry(reference: impl Into<String>) -> Image {
        Image::from_ref(reference)
    }

    /// An image already in sbxd's store by its id (`im-…`, from a build or a snapshot).
    pub fn from_id(id: impl Into<String>) -> Image {
        Image::from_ref(id)
    }

    /// The image a Dockerfile describes (see [`crate::api::dockerfile`] for the subset),
    /// COPY sources relative to `context`. The file is read when the recipe is used.
    pub fn from_dockerfile(path: impl AsRef<Path>, context: impl AsRef<Path>) -> Image {
        let mut image = Image::host();
        let (path, context) = (path.as_ref(), context.as_ref());
        match std::fs::canonicalize(context) {
            Ok(c) if c.is_dir() => {
                image.from = From::Dockerfile {
                    path: path.to_path_buf(),
                    context: c,
                }
            }
            Ok(c) => image.fail(format!(
                "from_dockerfile: the build context {} is not a directory",
                c.display()
            )),
            Err(e) => image.fail(format!(
                "from_dockerfile: the build context {}: {e}",
                context.display()
            )),
        }
        image
    }

    /// The `im-…` id when this recipe is exactly a stored image (from `from_id` or a snapshot,
    /// no steps added), else `None` (Modal's `object_id` of a hydrated image).
    pub fn object_id(&self) -> Option<&str> {
        match &self.from {
            From::Reference(r) if self.steps.is_empty() && is_image_id(r) => Some(r),
            _ => None,
        }
    }

    fn fail(&mut self, message: String) {
        self.error.get_or_insert(message);
    }

    fn step(mut self, step: BuildStep) -> Image {
        self.steps.push(Step::Api(step));
        self
    }

    /// Shell commands, one RUN step each (`/bin/sh -c CMD`).
    pub fn run_commands<I, S>(mut self, commands: I) -> Image
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        for c in commands {
            self = self.step(BuildStep::Run {
                argv: vec!["/bin/sh".into(), "-c".into(), c.into()],
            });
        }
        self
    }

    /// One RUN step of `argv`, run directly (no shell).
    pub fn run_argv<I, S>(self, argv: I) -> Image
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.step(BuildStep::Run {
            argv: argv.into_iter().map(Into::into).collect(),
        })
    }

    /// Environment variables of later steps and of sandboxes (image Env).
    pub fn env<I, K, V>(self, vars: I) -> Image
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        self.step(BuildStep::Env {
            vars: vars
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        })
    }

    /// The working directory of later steps and of sandboxes (created when missing).
    pub fn workdir(self, path: impl Into<String>) -> Image {
        self.step(BuildStep::Workdir { path: path.into() })
    }

    /// The user (`NAME`, `UID`, `UID:GID`) later RUN steps and sandboxes run as.
    pub fn user(self, user: impl Into<String>) -> Image {
        self.step(BuildStep::User { user: user.into() })
    }

    /// The image Entrypoint.
    pub fn entrypoint<I, S>(self, argv: I) -> Image
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.step(BuildStep::Entrypoint {
            argv: argv.into_iter().map(Into::into).collect(),
        })
    }

    /// The image Cmd.
    pub fn cmd<I, S>(self, argv: I) -> Image
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.step(BuildStep::Cmd {
            argv: argv.into_iter().map(Into::into).collect(),
        })
    }

    /// Copies the contents of the local directory `local` into `remote` in the image.
    pub fn copy_local_dir(self, local: impl AsRef<Path>, remote: impl Into<String>) -> Image {
        self.copy_local("copy_local_dir", local.as_ref(), remote.into(), true)
    }

    /// Copies the local file `local` to `remote` (into it when `remote` ends with `/`).
    pub fn copy_local_file(self, local: impl AsRef<Path>, remote: impl Into<String>) -> Image {
        self.copy_local("copy_local_file", local.as_ref(), remote.into(), false)
    }

    fn copy_local(mut self, what: &str, local: &Path, dest: String, dir: bool) -> Image {
        let canonical = match std::fs::canonicalize(local) {
            Ok(c) => c,
            Err(e) => {
                self.fail(format!("{what}: {}: {e}", local.display()));
                return self;
            }
        };
        if canonical.is_dir() != dir {
            let kind = if dir { "a directory" } else { "a file" };
            self.fail(format!("{what}: {} is not {kind}", local.display()));
            return self;
        }
        let (Some(parent), Some(name)) = (canonical.parent(), canonical.file_name()) else {
            self.fail(format!("{what}: cannot copy {}", canonical.display()));
            return self;
        };
        let Some(name) = name.to_str() else {
            self.fail(format!("{what}: {} is not UTF-8", canonical.display()));
            return self;
        };
        self.steps.push(Step::Copy {
            context: parent.to_path_buf(),
            sources: vec![name.to_string()],
            dest,
        });
        self
    }

    /// Dockerfile instructions (no FROM) as steps: `["RUN apt-get update", "ENV A=1"]`.
    /// Their COPY sources are relative to the build context of [`Image::from_dockerfile`];
    /// on other recipes COPY here is refused (use `copy_local_*`).
    pub fn dockerfile_commands<I, S>(mut self, commands: I) -> Image
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let text = commands
            .into_iter()
            .map(Into::into)
            .collect::<Vec<String>>()
            .join("\n");
        match dockerfile::parse_steps(&text) {
            Ok(parsed) => {
                for step in parsed.steps {
                    match (step, &self.from) {
                        (BuildStep::Copy { sources, dest }, From::Dockerfile { context, .. }) => {
                            let context = context.clone();
                            self.steps.push(Step::Copy {
                                context,
                                sources,
                                dest,
                            })
                        }
                        (BuildStep::Copy { sources, .. }, From::Reference(_)) => {
                            self.fail(format!(
                                "dockerfile_commands: COPY {} needs a build context; use \
                                 copy_local_dir/copy_local_file or from_dockerfile",
                                sources.join(" ")
                            ));
                        }
                        (step, _) => self.steps.push(Step::Api(step)),
                    }
                }
            }
            Err(e) => self.fail(format!("dockerfile_commands: {e}")),
        }
        self
    }

    /// `ARG` values (`--build-arg`), also for a Dockerfile's `FROM`.
    pub fn build_args<I, K, V>(mut self, args: I) -> Image
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        self.build_args
            .extend(args.into_iter().map(|(k, v)| (k.into(), v.into())));
        self
    }

    /// Tag the result with a name in the store (`myapp:dev`).
    pub fn tag(mut self, name: impl Into<String>) -> Image {
        self.tag = Some(name.into());
        self
    }

    /// Run every step even when cached (Modal's `force_build`).
    pub fn force_build(mut self, force: bool) -> Image {
        self.force_build = force;
        self
    }

    /// The `POST /v1/images/build` request of this recipe, and the warnings of its Dockerfile
    /// (instructions accepted without effect, such as EXPOSE).
    pub fn build_request(&self) -> Result<(BuildImage, Vec<String>)> {
        if let Some(e) = &self.error {
            return Err(Error::Invalid(e.clone()));
        }
        let mut warnings = Vec::new();
        let (base, mut steps) = match &self.from {
            From::Reference(r) => (r.clone(), Vec::new()),
            From::Dockerfile { path, context } => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    Error::Invalid(format!("reading the Dockerfile {}: {e}", path.display()))
                })?;
                let parsed = dockerfile::parse(&text, &self.build_args)
                    .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
                warnings = parsed.warnings;
                let steps = parsed
                    .steps
                    .into_iter()
                    .map(|s| match s {
                        BuildStep::Copy { sources, dest } => Step::Copy {
                            context: context.clone(),
                            sources,
                            dest,
                        },
                        other => Step::Api(other),
                    })
                    .collect();
                (parsed.base, steps)
            }
        };
        steps.extend(self.steps.iter().cloned());
        let (context, steps) = one_context(steps)?;
        Ok((
            BuildImage {
                base,
                steps,
                context,
                tag: self.tag.clone(),
                no_cache: self.force_build,
                build_args: self.build_args.clone(),
            },
            warnings,
        ))
    }

    /// Builds the recipe in sbxd (each step cached by its parent and itself) and returns the
    /// image. The build's progress is not shown; see [`build_with`](Self::build_with).
    pub async fn build(&self, client: &Client) -> Result<BuiltImage> {
        self.build_with(client, |_| {}).await
    }

    /// Builds, handing every [`BuildEvent`] to `on_event` as it arrives (steps, whether they
    /// were cached, RUN output). A failed step is the `Err` (a RUN that exits non-zero is
    /// [`Error::Invalid`] naming its code); `on_event` has seen its output by then.
    pub async fn build_with<F>(&self, client: &Client, mut on_event: F) -> Result<BuiltImage>
    where
        F: FnMut(&BuildEvent) + Send,
    {
        // Already a stored image: nothing to build.
        if let (Some(id), None, false) = (self.object_id(), &self.tag, self.force_build) {
            let info = Image::inspect(client, id).await?;
            return Ok(BuiltImage {
                id: info.id.clone(),
                info,
            });
        }
        let (req, _warnings) = self.build_request()?;
        let mut stream = Ndjson::open(client, "/v1/images/build", &Payload::json(&req)?).await?;
        while let Some(ev) = stream.next::<BuildEvent>().await? {
            on_event(&ev);
            match ev {
                BuildEvent::Done { image } => {
                    return Ok(BuiltImage {
                        id: image.id.clone(),
                        info: image,
                    })
                }
                BuildEvent::Error(error) => return Err(error.into()),
                _ => {}
            }
        }
        Err(stream.ended_early("done"))
    }

    /// The image reference `create` should use: the reference itself when there is nothing
    /// to build, else the id of the built recipe.
    pub(crate) async fn resolve(
        &self,
        client: &Client,
        on_build: Option<&BuildCallback>,
    ) -> Result<String> {
        if let (From::Reference(r), true, None, None) =
            (&self.from, self.steps.is_empty(), &self.tag, &self.error)
        {
            return Ok(r.clone());
        }
        let built = match on_build {
            Some(f) => self.build_with(client, |ev| f(ev)).await?,
            None => self.build(client).await?,
        };
        Ok(built.id)
    }

    /// Pulls (or imports) `reference` into sbxd's store, handing every [`PullEvent`] to
    /// `on_event` as it arrives (per-layer start, progress, done/cached).
    pub async fn pull<F>(client: &Client, reference: &str, mut on_event: F) -> Result<ImageInfo>
    where
        F: FnMut(&PullEvent) + Send,
    {
        let req = PullImage {
            reference: reference.to_string(),
        };
        let mut stream = Ndjson::open(client, "/v1/images/pull", &Payload::json(&req)?).await?;
        while let Some(ev) = stream.next::<PullEvent>().await? {
            on_event(&ev);
            match ev {
                PullEvent::Done { image } => return Ok(image),
                PullEvent::Error(error) => return Err(error.into()),
                _ => {}
            }
        }
        Err(stream.ended_early("done"))
    }

    /// Every image in the store, newest first.
    pub async fn list(client: &Client) -> Result<Vec<ImageInfo>> {
        client.get("/v1/images").await
    }

    /// One image, by `im-…` id or a reference the store has.
    pub async fn inspect(client: &Client, reference: &str) -> Result<ImageInfo> {
        client.get(&format!("/v1/images/{}", enc(reference))).await
    }

    /// Removes a reference (and the image when no reference is left), or by id the image and
    /// its references. `Conflict` while a running sandbox uses it.
    pub async fn remove(client: &Client, reference: &str) -> Result<()> {
        client
            .unit(
                Method::DELETE,
                &format!("/v1/images/{}", enc(reference)),
                &Payload::Empty,
                Retry::IfUnsent,
            )
            .await
    }

    /// Writes the image (built first if the recipe has steps) into an OCI layout:
    /// `destination` is `oci:/absolute/path[:TAG]`. Images built on `host` cannot be exported.
    pub async fn export(&self, client: &Client, destination: &str) -> Result<ExportResult> {
        let image = self.resolve(client, None).await?;
        client
            .json(
                Method::POST,
                "/v1/images/export",
                &Payload::json(&ExportImage {
                    image,
                    destination: destination.to_string(),
                })?,
                Retry::Always,
            )
            .await
    }
}

/// `im-` and [`IMAGE_ID_HEX`] lowercase hex digits.
pub fn is_image_id(s: &str) -> bool {
    s.strip_prefix("im-").is_some_and(|h| {
        h.len() == IMAGE_ID_HEX
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// The recipe's steps with one build context: the deepest directory holding every COPY's
/// own context; each COPY source is rewritten relative to it.
fn one_context(steps: Vec<Step>) -> Result<(Option<String>, Vec<BuildStep>)> {
    let mut common: Option<PathBuf> = None;
    for s in &steps {
        if let Step::Copy { context, .. } = s {
            common = Some(match common {
                None => context.clone(),
                Some(c) => common_ancestor(&c, context),
            });
        }
    }
    let Some(common) = common else {
        let steps = steps
            .into_iter()
            .map(|s| match s {
                Step::Api(s) => s,
                Step::Copy { .. } => unreachable!("no COPY when there is no context"),
            })
            .collect();
        return Ok((None, steps));
    };
    let context = common.to_str().map(str::to_string).ok_or_else(|| {
        Error::Invalid(format!(
            "the build context {} is not UTF-8",
            common.display()
        ))
    })?;
    let steps = steps
        .into_iter()
        .map(|s| match s {
            Step::Api(s) => Ok(s),
            Step::Copy {
                context: own,
                sources,
                dest,
            } => {
                let rel = own
                    .strip_prefix(&common)
                    .expect("the common ancestor is a prefix of every context");
                let rel = rel.to_str().ok_or_else(|| {
                    Error::Invalid(format!("the COPY context {} is not UTF-8", own.display()))
                })?;
                Ok(BuildStep::Copy {
                    sources: sources.iter().map(|s| rebase(rel, s)).collect(),
                    dest,
                })
            }
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((Some(context), steps))
}

fn common_ancestor(a: &Path, b: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for (x, y) in a.components().zip(b.components()) {
        if x != y {
            break;
        }
        out.push(x);
    }
    if out.as_os_str().is_empty() {
        out.push(Component::RootDir);
    }
    out
}

/// `source` (relative to a context at `rel` under the build context) relative to the build
/// context: `rebase("a/b", "./x")` is `a/b/x`, `rebase("a/b", ".")` is `a/b`.
fn rebase(rel: &str, source: &str) -> String {
    if rel.is_empty() {
        return source.to_string();
    }
    let trimmed = source.trim_start_matches("./");
    match trimmed {
        "" | "." => rel.to_string(),
        "./" | "/" => format!("{rel}/"),
        t => format!("{rel}/{t}"),
    }
}

impl CreateSandbox {
    /// These parameters with an [`Image`] recipe: `create` builds it first (when it has
    /// steps) and starts the sandbox from the result (Modal's `Sandbox.create(image=…)`).
    pub fn with_image(self, image: Image) -> NewSandbox {
        NewSandbox {
            params: self,
            image: Some(image),
            on_build: None,
        }
    }
}

/// Hears every [`BuildEvent`] of the build a create starts for its recipe.
pub type BuildCallback = std::sync::Arc<dyn Fn(&BuildEvent) + Send + Sync>;

/// What [`Sandbox::create`](super::Sandbox::create) takes: the parameters, and optionally an
/// [`Image`] recipe (then `params.image` must be `None`). A plain [`CreateSandbox`] converts
/// into it, and so does an [`Image`] (with default parameters).
#[derive(Clone, Default)]
pub struct NewSandbox {
    pub params: CreateSandbox,
    pub image: Option<Image>,
    /// Where the recipe's build output goes while `create` builds it; see
    /// [`NewSandbox::on_build`] and [`NewSandbox::print_build_output`].
    pub on_build: Option<BuildCallback>,
}

impl std::fmt::Debug for NewSandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewSandbox")
            .field("params", &self.params)
            .field("image", &self.image)
            .field("on_build", &self.on_build.as_ref().map(|_| "…"))
            .finish()
    }
}

impl std::convert::From<CreateSandbox> for NewSandbox {
    fn from(params: CreateSandbox) -> NewSandbox {
        NewSandbox {
            params,
            image: None,
            on_build: None,
        }
    }
}

impl std::convert::From<Image> for NewSandbox {
    fn from(image: Image) -> NewSandbox {
        NewSandbox {
            params: CreateSandbox::default(),
            image: Some(image),
            on_build: None,
        }
    }
}

impl NewSandbox {
    /// Hand every event of the recipe's build (steps, cached or not, RUN output as it comes)
    /// to `f` while `create` builds it.
    pub fn on_build(mut self, f: impl Fn(&BuildEvent) + Send + Sync + 'static) -> NewSandbox {
        self.on_build = Some(std::sync::Arc::new(f));
        self
    }

    /// Stream the recipe's build to stderr while `create` builds it, as `sbx image build`
    /// shows it: `Step i/n: TEXT`, ` ---> cached`, the RUN output.
    pub fn print_build_output(self) -> NewSandbox {
        self.on_build(|ev| {
            use std::io::Write as _;
            let mut err = std::io::stderr().lock();
            let _ = match ev {
                BuildEvent::Step {
                    index,
                    total,
                    text,
                    cached,
                } => {
                    let r = writeln!(err, "Step {}/{total}: {text}", index + 1);
                    if *cached {
                        let _ = writeln!(err, " ---> cached");
                    }
                    r
                }
                BuildEvent::Output { data, .. } => write!(err, "{data}"),
                _ => Ok(()),
            };
        })
    }

    /// The create request, the recipe built first when it has steps.
    pub(crate) async fn request(self, client: &Client) -> Result<CreateSandbox> {
        let NewSandbox {
            mut params,
            image,
            on_build,
        } = self;
        if let Some(image) = image {
            if let Some(given) = &params.image {
                return Err(Error::Invalid(format!(
                    "create: both CreateSandbox.image ({given}) and an Image recipe were given; \
                     give one"
                )));
            }
            params.image = Some(image.resolve(client, on_build.as_ref()).await?);
        }
        Ok(params)
    }
}

/// A streamed reply of NDJSON lines, read as they arrive.
struct Ndjson {
    path: &'static str,
    body: Incoming,
    buf: LineBuffer,
    eof: bool,
}

impl Ndjson {
    /// Sends the POST (never repeated once sent: a build runs its steps); an error status
    /// (the call failed before its stream started) is the typed error.
    async fn open(client: &Client, path: &'static str, payload: &Payload) -> Result<Ndjson> {
        let response = client
            .send(Method::POST, path, payload, Retry::IfUnsent)
            .await?;
        Ok(Ndjson {
            path,
            body: response.into_body(),
            buf: LineBuffer::default(),
            eof: false,
        })
    }

    async fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>> {
        loop {
            if let Some(line) = self.buf.take_line(self.eof, 0)? {
                let line = line.trim();
                if line.is_empty() {
                    continue;
                }
                return serde_json::from_str(line).map(Some).map_err(|e| {
                    Error::Transport(format!(
                        "POST {}: a line of sbxd's stream is not the expected JSON: {e}: {line}",
                        self.path
                    ))
                });
            }
            if self.eof {
                return Ok(None);
            }
            match self.body.frame().await {
                None => self.eof = true,
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.push(&data);
                    }
                }
                Some(Err(e)) => {
                    return Err(Error::Transport(format!(
                        "POST {}: the stream broke off: {}",
                        self.path,
                        super::transport::chain(&e)
                    )))
                }
            }
        }
    }

    fn ended_early(&self, what: &str) -> Error {
        Error::Transport(format!(
            "POST {}: sbxd's stream ended without its `{what}` line",
            self.path
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipes_become_build_requests() {
        let dir = std::env::temp_dir().join(format!("sbx-image-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("ctx/sub")).unwrap();
        std::fs::create_dir_all(dir.join("other")).unwrap();
        std::fs::write(dir.join("ctx/sub/f.txt"), "x").unwrap();
        std::fs::write(dir.join("other/g.txt"), "y").unwrap();
        std::fs::write(
            dir.join("ctx/Dockerfile"),
            "ARG BASE=host\nFROM $BASE\nCOPY . /app\nEXPOSE 80\n",
        )
        .unwrap();
        let canon = std::fs::canonicalize(&dir).unwrap();

        let img = Image::from_dockerfile(dir.join("ctx/Dockerfile"), dir.join("ctx"))
            .build_args([("BASE", "im-000000000000000000000000")])
            .run_commands(["echo hi"])
            .copy_local_file(dir.join("other/g.txt"), "/app/")
            .copy_local_dir(dir.join("ctx/sub"), "/sub")
            .tag("t:1");
        let (req, warnings) = img.build_request().unwrap();
        assert_eq!(req.base, "im-000000000000000000000000");
        assert_eq!(req.context.as_deref(), canon.to_str());
        assert_eq!(req.tag.as_deref(), Some("t:1"));
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        let copies: Vec<_> = req
            .steps
            .iter()
            .filter_map(|s| match s {
                BuildStep::Copy { sources, dest } => Some((sources.join(","), dest.as_str())),
                _ => None,
            })
            .collect();
        assert_eq!(
            copies,
            [
                ("ctx".to_string(), "/app"),
                ("other/g.txt".to_string(), "/app/"),
                ("ctx/sub".to_string(), "/sub"),
            ]
        );

        // A single copy_local: the context is the source's parent.
        let (req, _) = Image::host()
            .copy_local_file(dir.join("other/g.txt"), "/g")
            .build_request()
            .unwrap();
        assert_eq!(
            req.context.as_deref(),
            canon.join("other").to_str(),
            "{req:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn recipe_mistakes_surface_at_use() {
        let img = Image::host()
            .copy_local_dir("/nonexistent/sbx-dir", "/x")
            .run_commands(["true"]);
        let e = img.build_request().unwrap_err();
        assert!(
            matches!(&e, Error::Invalid(m) if m.contains("copy_local_dir") && m.contains("/nonexistent/sbx-dir")),
            "{e}"
        );
        let e = Image::host()
            .dockerfile_commands(["RUN true", "LABEL a=b"])
            .build_request()
            .unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
        let e = Image::host()
            .dockerfile_commands(["COPY a /b"])
            .build_request()
            .unwrap_err();
        assert!(e.to_string().contains("needs a build context"), "{e}");
    }

    #[test]
    fn plain_references_need_no_build() {
        assert_eq!(
            Image::from_id("im-0123456789abcdef01234567").object_id(),
            Some("im-0123456789abcdef01234567")
        );
        assert_eq!(Image::from_registry("busybox").object_id(), None);
        assert_eq!(
            Image::from_id("im-0123456789abcdef01234567")
                .workdir("/x")
                .object_id(),
            None
        );
        assert_eq!(rebase("", "a"), "a");
        assert_eq!(rebase("a/b", "."), "a/b");
        assert_eq!(rebase("a/b", "./x/"), "a/b/x/");
        assert_eq!(
            common_ancestor(Path::new("/a/b/c"), Path::new("/a/d")),
            Path::new("/a")
        );
        assert_eq!(
            common_ancestor(Path::new("/x"), Path::new("/y")),
            Path::new("/")
        );
    }
}
