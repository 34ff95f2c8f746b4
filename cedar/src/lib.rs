//! The embedded Cedar PDP: a schema-validated policy bundle, versioned by a
//! content hash and reloaded atomically.
//!
//! [`CedarPdp`] implements `elevate-core`'s [`PolicyDecisionPoint`], so the
//! guard asks it for trust elevation like any other PDP; it lives in its own
//! crate so that `elevate-core` and the broker bindings do not pull in the
//! Cedar engine.
//!
//! A bundle is a directory holding every `*.cedar` policy file, exactly one
//! `*.cedarschema` schema (Cedar schema syntax) and `entities.json` (Cedar
//! entities JSON). At load the policies are validated strictly against the
//! schema and the entities are parsed with it; anything wrong rejects the
//! whole bundle with a [`BundleError`] naming the file and the reason. A
//! running [`CedarPdp`] keeps its last good bundle when a reload fails.
//!
//! Decisions never re-parse anything: the schema, policy set, entities and
//! the action and entity-type names are parsed once per bundle. Both halves
//! of trust elevation ([`PolicyDecisionPoint::evaluate_all`]) are answered
//! from one bundle snapshot, so a reload cannot split a decision.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use cedar_policy::{
    Authorizer, Context, Decision, Entities, EntityId, EntityTypeName, EntityUid, PolicyId,
    PolicySet, Request, RestrictedExpression, Schema, ValidationMode, Validator,
};
use sha2::{Digest, Sha256};

use elevate_core::pdp::{AccessDecision, AccessRequest, EntityRef, PdpError, PolicyDecisionPoint};

/// Name of the entities file in a bundle directory.
pub const ENTITIES_FILE: &str = "entities.json";
/// Extension of policy files in a bundle directory.
pub const POLICY_EXT: &str = "cedar";
/// Extension of the schema file in a bundle directory.
pub const SCHEMA_EXT: &str = "cedarschema";

/// Number of hex characters of the content hash used as the display version.
const SHORT_VERSION_LEN: usize = 16;

/// Why a policy bundle could not be loaded (the previous bundle stays in force).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// A bundle file or the directory could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The path that failed.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A bundle file is not UTF-8 text.
    #[error("{file}: not valid UTF-8")]
    NotUtf8 {
        /// The file (relative to the bundle).
        file: String,
    },
    /// The bundle has no `*.cedarschema` file.
    #[error("{dir}: no *.cedarschema schema file in the bundle")]
    MissingSchema {
        /// The bundle directory.
        dir: String,
    },
    /// The bundle has more than one `*.cedarschema` file.
    #[error("{dir}: exactly one *.cedarschema file expected, found {}", files.join(", "))]
    MultipleSchemas {
        /// The bundle directory.
        dir: String,
        /// The schema files found.
        files: Vec<String>,
    },
    /// The bundle has no `entities.json`.
    #[error("{dir}: no entities.json in the bundle")]
    MissingEntities {
        /// The bundle directory.
        dir: String,
    },
    /// The bundle has no `*.cedar` policy file.
    #[error("{dir}: no *.cedar policy file in the bundle")]
    NoPolicies {
        /// The bundle directory.
        dir: String,
    },
    /// The schema does not parse.
    #[error("{file}: invalid schema: {message}")]
    Schema {
        /// The schema file.
        file: String,
        /// The parser's explanation.
        message: String,
    },
    /// A policy file does not parse (or holds a template, which bundles do not support).
    #[error("{file}: invalid policy: {message}")]
    PolicyParse {
        /// The policy file.
        file: String,
        /// The parser's explanation.
        message: String,
    },
    /// Two policies share an id.
    #[error("{file}: duplicate policy id `{id}`{}", first.as_ref().map(|f| format!(" (first defined in {f})")).unwrap_or_default())]
    DuplicatePolicyId {
        /// The file of the second definition.
        file: String,
        /// The id.
        id: String,
        /// The file of the first definition, if known.
        first: Option<String>,
    },
    /// Policies do not validate (strict mode) against the schema.
    #[error("policies do not validate against {schema}: {}", errors.join("; "))]
    Validation {
        /// The schema file.
        schema: String,
        /// One line per problem: `<file>: policy <id>: <message>`.
        errors: Vec<String>,
    },
    /// The entities do not parse or do not conform to the schema.
    #[error("{file}: invalid entities: {message}")]
    Entities {
        /// The entities file.
        file: String,
        /// The parser's explanation.
        message: String,
    },
    /// The PDP was built from in-memory sources and has no directory to reload from.
    #[error("this PDP was built from in-memory sources; there is no bundle directory to reload")]
    NoSource,
}

/// One file of a bundle: its name relative to the bundle and its bytes.
type BundleFile = (String, Vec<u8>);

/// SHA-256 (hex) over the bundle files sorted by name: for each file,
/// `len(name) ‖ name ‖ len(bytes) ‖ bytes` with lengths as u64 little-endian.
pub fn content_hash(files: &[(String, Vec<u8>)]) -> String {
    let mut sorted: Vec<&(String, Vec<u8>)> = files.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut h = Sha256::new();
    for (name, bytes) in sorted {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    hex::encode(h.finalize())
}

/// Reads the bundle files of `dir` (non-recursive): `*.cedar`, `*.cedarschema`
/// and `entities.json`, sorted by name. Other files are ignored.
///
/// # Errors
///
/// Returns [`BundleError::Io`] naming the path if `dir` cannot be listed or a bundle file in it
/// cannot be read.
pub fn read_bundle_files(dir: &Path) -> Result<Vec<(String, Vec<u8>)>, BundleError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BundleError::Io { path, source }
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let path = entry.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let is_bundle_file = name == ENTITIES_FILE
            || matches!(
                path.extension().and_then(|e| e.to_str()),
                Some(POLICY_EXT | SCHEMA_EXT)
            );
        if !is_bundle_file || !path.is_file() {
            continue;
        }
        let bytes = std::fs::read(&path).map_err(io(&path))?;
        files.push((name.to_string(), bytes));
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(files)
}

/// A loaded, validated policy bundle: everything a decision needs, parsed once.
pub struct Bundle {
    /// Full SHA-256 (hex) of the bundle files.
    hash: String,
    schema: Schema,
    policies: PolicySet,
    entities: Entities,
    /// Action name → `Action::"<name>"`, from the schema.
    actions: HashMap<String, EntityUid>,
    /// Entity type name → parsed type name, from the schema.
    entity_types: HashMap<String, EntityTypeName>,
    /// Action name → the principal and resource types it applies to, from the
    /// schema: checked per request instead of re-validating the whole request.
    applies: HashMap<String, (HashSet<EntityTypeName>, HashSet<EntityTypeName>)>,
    /// Policy id → the file it came from.
    policy_files: BTreeMap<String, String>,
    /// A signed bundle's revision and manifest hash (`None`: an unsigned directory).
    signed: Option<(u64, String)>,
}

impl std::fmt::Debug for Bundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bundle")
            .field("version", &self.version())
            .field("policies", &self.policy_files)
            .finish_non_exhaustive()
    }
}

impl Bundle {
    /// Parses and validates a bundle from its files (names relative to the
    /// bundle); `origin` names the bundle in error messages.
    ///
    /// # Errors
    ///
    /// Returns [`BundleError::NotUtf8`] if a file is not UTF-8; [`BundleError::MissingSchema`],
    /// [`BundleError::MultipleSchemas`], [`BundleError::MissingEntities`] or
    /// [`BundleError::NoPolicies`] if the bundle does not have exactly one schema, an
    /// `entities.json` and at least one policy file; [`BundleError::Schema`] if the schema does not
    /// parse; [`BundleError::PolicyParse`] if a policy file does not parse or holds a template;
    /// [`BundleError::DuplicatePolicyId`] if two policies share an id; [`BundleError::Validation`]
    /// if the policies do not validate strictly against the schema; and [`BundleError::Entities`]
    /// if the entities do not parse or conform to it.
    pub fn from_files(origin: &str, files: &[(String, Vec<u8>)]) -> Result<Self, BundleError> {
        let text = |(name, bytes): &BundleFile| -> Result<(String, String), BundleError> {
            let s = std::str::from_utf8(bytes)
                .map_err(|_| BundleError::NotUtf8 { file: name.clone() })?;
            Ok((name.clone(), s.to_string()))
        };
        let has_ext = |name: &str, ext: &str| {
            Path::new(name).extension().and_then(|e| e.to_str()) == Some(ext)
        };

        let schemas: Vec<&BundleFile> = files
            .iter()
            .filter(|(n, _)| has_ext(n, SCHEMA_EXT))
            .collect();
        let schema_file = match schemas.as_slice() {
            [] => {
                return Err(BundleError::MissingSchema {
                    dir: origin.to_string(),
                });
            }
            [one] => text(one)?,
            many => {
                return Err(BundleError::MultipleSchemas {
                    dir: origin.to_string(),
                    files: many.iter().map(|(n, _)| n.clone()).collect(),
                });
            }
        };
        let entities_file = files
            .iter()
            .find(|(n, _)| n == ENTITIES_FILE)
            .ok_or_else(|| BundleError::MissingEntities {
                dir: origin.to_string(),
            })
            .and_then(text)?;
        let mut policy_files = files
            .iter()
            .filter(|(n, _)| has_ext(n, POLICY_EXT))
            .map(text)
            .collect::<Result<Vec<_>, _>>()?;
        if policy_files.is_empty() {
            return Err(BundleError::NoPolicies {
                dir: origin.to_string(),
            });
        }
        policy_files.sort_by(|a, b| a.0.cmp(&b.0));

        // Schema.
        let (schema, warnings) =
            Schema::from_cedarschema_str(&schema_file.1).map_err(|e| BundleError::Schema {
                file: schema_file.0.clone(),
                message: describe(&e, Some(&schema_file.1)),
            })?;
        for w in warnings {
            tracing::warn!(file = %schema_file.0, warning = %w, "Cedar schema warning");
        }

        // Policies, named by @id or <file>:<index>.
        let mut policies = PolicySet::new();
        let mut owners: BTreeMap<String, String> = BTreeMap::new();
        for (file, src) in &policy_files {
            for policy in parse_policy_file(file, src)? {
                let id = policy.id().to_string();
                if let Some(first) = owners.get(&id) {
                    return Err(BundleError::DuplicatePolicyId {
                        file: file.clone(),
                        id,
                        first: Some(first.clone()),
                    });
                }
                policies
                    .add(policy)
                    .map_err(|_| BundleError::DuplicatePolicyId {
                        file: file.clone(),
                        id: id.clone(),
                        first: None,
                    })?;
                owners.insert(id, file.clone());
            }
        }

        // Strict validation against the schema.
        let result = Validator::new(schema.clone()).validate(&policies, ValidationMode::Strict);
        if !result.validation_passed() {
            let sources: HashMap<&str, &str> = policy_files
                .iter()
                .map(|(f, src)| (f.as_str(), src.as_str()))
                .collect();
            let errors = result
                .validation_errors()
                .map(|e| {
                    let id = e.policy_id().to_string();
                    let file = owners.get(&id).map(String::as_str).unwrap_or("?");
                    let src = sources.get(file).copied();
                    let msg = message(e);
                    let msg = msg
                        .strip_prefix(&format!("for policy `{id}`, "))
                        .unwrap_or(&msg);
                    match locate(e, src) {
                        Some(loc) => format!("{file}: policy `{id}` ({loc}): {msg}"),
                        None => format!("{file}: policy `{id}`: {msg}"),
                    }
                })
                .collect();
            return Err(BundleError::Validation {
                schema: schema_file.0.clone(),
                errors,
            });
        }
        for w in result.validation_warnings() {
            tracing::warn!(policy = %w.policy_id(), warning = %w, "Cedar policy validation warning");
        }

        // Entities, parsed and checked with the schema (action entities come from it).
        let entities = Entities::from_json_str(&entities_file.1, Some(&schema)).map_err(|e| {
            BundleError::Entities {
                file: entities_file.0.clone(),
                message: describe(&e, None),
            }
        })?;

        let actions: HashMap<String, EntityUid> = schema
            .actions()
            .map(|uid| (uid.id().unescaped().to_string(), uid.clone()))
            .collect();
        let applies = actions
            .iter()
            .map(|(name, uid)| {
                let principals = schema
                    .principals_for_action(uid)
                    .map(|it| it.cloned().collect())
                    .unwrap_or_default();
                let resources = schema
                    .resources_for_action(uid)
                    .map(|it| it.cloned().collect())
                    .unwrap_or_default();
                (name.clone(), (principals, resources))
            })
            .collect();
        let entity_types = schema
            .entity_types()
            .map(|t| (t.to_string(), t.clone()))
            .collect();

        Ok(Bundle {
            hash: content_hash(files),
            schema,
            policies,
            entities,
            actions,
            entity_types,
            applies,
            policy_files: owners,
            signed: None,
        })
    }

    /// The same bundle, known to be a signed bundle of `revision` whose
    /// manifest hashes to `manifest_sha256` (hex): its version is then the
    /// manifest's hash (`elevate-bundle` verifies the signature and files).
    pub fn with_manifest(mut self, revision: u64, manifest_sha256: impl Into<String>) -> Self {
        self.signed = Some((revision, manifest_sha256.into()));
        self
    }

    /// The signed bundle's revision (`None` for an unsigned directory).
    pub fn revision(&self) -> Option<u64> {
        self.signed.as_ref().map(|(r, _)| *r)
    }

    /// Loads a bundle from a directory.
    ///
    /// # Errors
    ///
    /// Returns the errors of [`read_bundle_files`] and [`from_files`](Self::from_files).
    pub fn load_dir(dir: &Path) -> Result<Self, BundleError> {
        let files = read_bundle_files(dir)?;
        Self::from_files(&dir.display().to_string(), &files)
    }

    /// The display version: the first 16 hex characters of the manifest's
    /// hash for a signed bundle, else of the content hash.
    pub fn version(&self) -> &str {
        let full = self.signed.as_ref().map_or(&self.hash, |(_, m)| m);
        &full[..SHORT_VERSION_LEN.min(full.len())]
    }

    /// The full SHA-256 (hex) content hash of the bundle.
    pub fn content_hash(&self) -> &str {
        &self.hash
    }

    /// Ids of the policies in the bundle, each with the file it came from.
    pub fn policy_ids(&self) -> impl Iterator<Item = (&str, &str)> {
        self.policy_files
            .iter()
            .map(|(id, file)| (id.as_str(), file.as_str()))
    }

    /// Evaluates one request against this bundle.
    ///
    /// # Errors
    ///
    /// Returns [`PdpError::InvalidRequest`] if the action or an entity type is not in the schema,
    /// the action does not apply to the subject's and resource's entity types, or the context does
    /// not fit the schema. A deny is a decision, not an error.
    pub fn decide(
        &self,
        authorizer: &Authorizer,
        req: &AccessRequest,
    ) -> Result<AccessDecision, PdpError> {
        self.decide_with(authorizer, req, fast_context(&req.context))
    }

    /// Evaluates several requests against this bundle; requests that share
    /// their context JSON (both halves of trust elevation do) share its
    /// conversion.
    ///
    /// # Errors
    ///
    /// Returns the first [`PdpError::InvalidRequest`] of any request (see
    /// [`decide`](Self::decide)); no decisions are returned then.
    pub fn decide_all(
        &self,
        authorizer: &Authorizer,
        reqs: &[AccessRequest],
    ) -> Result<Vec<AccessDecision>, PdpError> {
        let mut shared: Option<(&serde_json::Value, Option<Context>)> = None;
        reqs.iter()
            .map(|r| {
                let context = match &shared {
                    Some((json, built)) if **json == r.context => built.clone(),
                    _ => {
                        let built = fast_context(&r.context);
                        shared = Some((&r.context, built.clone()));
                        built
                    }
                };
                self.decide_with(authorizer, r, context)
            })
            .collect()
    }

    /// Evaluates one request, with its context already converted when the fast path could.
    fn decide_with(
        &self,
        authorizer: &Authorizer,
        req: &AccessRequest,
        context: Option<Context>,
    ) -> Result<AccessDecision, PdpError> {
        let request = self.request(req, context)?;
        let response = authorizer.is_authorized(&request, &self.policies, &self.entities);
        let mut policies: Vec<String> = response
            .diagnostics()
            .reason()
            .map(ToString::to_string)
            .collect();
        policies.sort();
        let errors: Vec<String> = response
            .diagnostics()
            .errors()
            .map(|e| error_chain(e))
            .collect();
        // Cedar skips a policy whose evaluation errors, so an erroring `forbid`
        // would no longer block a `permit`: any evaluation error denies.
        Ok(AccessDecision {
            allowed: response.decision() == Decision::Allow && errors.is_empty(),
            policies,
            errors,
        })
    }

    /// Builds a schema-checked Cedar request; anything that does not fit is
    /// `InvalidRequest`.
    fn request(&self, req: &AccessRequest, fast: Option<Context>) -> Result<Request, PdpError> {
        let action = self
            .actions
            .get(&req.action)
            .ok_or_else(|| PdpError::InvalidRequest(format!("unknown action {:?}", req.action)))?;
        let principal = self.entity(&req.subject)?;
        let resource = self.entity(&req.resource)?;
        let fits = self.applies.get(&req.action).is_some_and(|(p, r)| {
            p.contains(principal.type_name()) && r.contains(resource.type_name())
        });
        if !fits {
            return Err(PdpError::InvalidRequest(format!(
                "action {:?} does not apply to principal {} and resource {}",
                req.action, req.subject.kind, req.resource.kind
            )));
        }
        // Fast path: plain JSON (strings, booleans, integers, sets, records)
        // becomes Cedar values directly, and `Request::new` checks the whole
        // request, context types included, against the schema. Whatever the
        // fast path cannot take or the check refuses (entity or extension
        // values, a wrongly-typed context) goes through Cedar's
        // schema-directed JSON parser and the same check, which decide — and
        // explain — exactly as before.
        if let Some(request) = fast.and_then(|context| {
            Request::new(
                principal.clone(),
                action.clone(),
                resource.clone(),
                context,
                Some(&self.schema),
            )
            .ok()
        }) {
            return Ok(request);
        }
        let context = Context::from_json_value(req.context.clone(), Some((&self.schema, action)))
            .map_err(|e| {
            PdpError::InvalidRequest(format!(
                "context of {:?} does not fit the schema: {}",
                req.action,
                error_chain(&e)
            ))
        })?;
        Request::new(
            principal,
            action.clone(),
            resource,
            context,
            Some(&self.schema),
        )
        .map_err(|e| PdpError::InvalidRequest(error_chain(&e)))
    }

    fn entity(&self, e: &EntityRef) -> Result<EntityUid, PdpError> {
        let ty = self
            .entity_types
            .get(&e.kind)
            .ok_or_else(|| PdpError::InvalidRequest(format!("unknown entity type {:?}", e.kind)))?;
        Ok(EntityUid::from_type_name_and_id(
            ty.clone(),
            EntityId::new(&e.id),
        ))
    }
}

/// The context as a Cedar context built without the JSON parser, when it is plain JSON.
fn fast_context(context: &serde_json::Value) -> Option<Context> {
    Context::from_pairs(context_pairs(context)?).ok()
}

/// The context object as Cedar (name, value) pairs, when every value is plain
/// JSON (no `__entity`/`__extn` escapes, no floats or nulls); else `None`.
fn context_pairs(context: &serde_json::Value) -> Option<Vec<(String, RestrictedExpression)>> {
    context
        .as_object()?
        .iter()
        .map(|(k, v)| Some((k.clone(), restricted(v)?)))
        .collect()
}

/// One plain JSON value as a Cedar restricted expression (see [`context_pairs`]).
fn restricted(v: &serde_json::Value) -> Option<RestrictedExpression> {
    use serde_json::Value;
    Some(match v {
        Value::String(s) => RestrictedExpression::new_string(s.clone()),
        Value::Bool(b) => RestrictedExpression::new_bool(*b),
        Value::Number(n) => RestrictedExpression::new_long(n.as_i64()?),
        Value::Array(items) => {
            RestrictedExpression::new_set(items.iter().map(restricted).collect::<Option<Vec<_>>>()?)
        }
        Value::Object(fields) => {
            if fields.contains_key("__entity") || fields.contains_key("__extn") {
                return None;
            }
            RestrictedExpression::new_record(
                fields
                    .iter()
                    .map(|(k, v)| Some((k.clone(), restricted(v)?)))
                    .collect::<Option<Vec<_>>>()?,
            )
            .ok()?
        }
        Value::Null => return None,
    })
}

/// Parses one policy file; each policy gets its `@id` or `<file>:<index>`.
fn parse_policy_file(file: &str, src: &str) -> Result<Vec<cedar_policy::Policy>, BundleError> {
    let set = PolicySet::from_str(src).map_err(|e| BundleError::PolicyParse {
        file: file.to_string(),
        message: e
            .iter()
            .map(|pe| describe(pe, Some(src)))
            .collect::<Vec<_>>()
            .join("; "),
    })?;
    if set.templates().next().is_some() {
        return Err(BundleError::PolicyParse {
            file: file.to_string(),
            message: "policy templates are not supported in a bundle".to_string(),
        });
    }
    // The parser names policies `policy0`, `policy1`... in source order.
    let mut indexed: Vec<(usize, &cedar_policy::Policy)> = set
        .policies()
        .map(|p| {
            let idx = p
                .id()
                .to_string()
                .strip_prefix("policy")
                .and_then(|n| n.parse::<usize>().ok())
                .unwrap_or(usize::MAX);
            (idx, p)
        })
        .collect();
    indexed.sort_by_key(|(i, _)| *i);
    Ok(indexed
        .into_iter()
        .enumerate()
        .map(|(pos, (_, p))| {
            let id = match p.annotation("id") {
                Some(id) if !id.is_empty() => id.to_string(),
                _ => format!("{file}:{pos}"),
            };
            p.new_id(PolicyId::new(id))
        })
        .collect())
}

/// A Cedar diagnostic as one line: `line L, column C: message (help: ...)`,
/// locating it in `src` when its labels point there.
fn describe(e: &dyn miette::Diagnostic, src: Option<&str>) -> String {
    match locate(e, src) {
        Some(loc) => format!("{loc}: {}", message(e)),
        None => message(e),
    }
}

/// `line L, column C` of a diagnostic's first label in `src`.
fn locate(e: &dyn miette::Diagnostic, src: Option<&str>) -> Option<String> {
    let label = e.labels()?.next()?;
    let (line, col) = line_col(src?, label.offset());
    Some(format!("line {line}, column {col}"))
}

/// A diagnostic's message and sources, with its help text if any.
fn message(e: &dyn miette::Diagnostic) -> String {
    let mut out = error_chain(e);
    if let Some(help) = e.help() {
        out.push_str(&format!(" (help: {help})"));
    }
    out
}

/// 1-based line and column of a byte offset in `src`.
fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let before = src.get(..offset.min(src.len())).unwrap_or(src);
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(before.chars().count(), |nl| {
        before[nl + 1..].chars().count()
    }) + 1;
    (line, col)
}

/// An error and its sources, joined with `: ` (Cedar keeps details in sources).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let msg = s.to_string();
        if !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        cur = s.source();
    }
    out
}

/// The embedded Cedar PDP: answers from the bundle in force, reloads atomically.
pub struct CedarPdp {
    current: ArcSwap<Bundle>,
    authorizer: Authorizer,
    /// The bundle directory, if loaded from one.
    dir: Option<PathBuf>,
    /// Serializes reloads so an older read can never replace a newer one.
    reload_lock: parking_lot::Mutex<()>,
}

impl std::fmt::Debug for CedarPdp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CedarPdp")
            .field("dir", &self.dir)
            .field("bundle", &*self.current.load())
            .finish()
    }
}

impl CedarPdp {
    fn with_bundle(bundle: Bundle, dir: Option<PathBuf>) -> Self {
        CedarPdp {
            current: ArcSwap::from_pointee(bundle),
            authorizer: Authorizer::new(),
            dir,
            reload_lock: parking_lot::Mutex::new(()),
        }
    }

    /// Loads a bundle directory (`*.cedar`, one `*.cedarschema`, `entities.json`).
    ///
    /// # Errors
    ///
    /// Returns the errors of [`Bundle::load_dir`]: [`BundleError::Io`] if the directory or a file
    /// cannot be read, and the parse and validation errors of [`Bundle::from_files`].
    pub fn load_dir(dir: impl AsRef<Path>) -> Result<Self, BundleError> {
        let dir = dir.as_ref().to_path_buf();
        let bundle = Bundle::load_dir(&dir)?;
        tracing::info!(dir = %dir.display(), version = bundle.version(), "Cedar policy bundle loaded");
        Ok(Self::with_bundle(bundle, Some(dir)))
    }

    /// A PDP answering from `bundle` (a verified signed bundle, say); it
    /// has no directory: new bundles arrive through [`CedarPdp::install`].
    pub fn from_bundle(bundle: Bundle) -> Self {
        Self::with_bundle(bundle, None)
    }

    /// Swaps `bundle` in atomically (decisions in progress finish on the
    /// one they started with); returns the version it replaced.
    pub fn install(&self, bundle: Bundle) -> String {
        let _guard = self.reload_lock.lock();
        self.current.swap(Arc::new(bundle)).version().to_string()
    }

    /// Builds a PDP from in-memory sources (tests, embedded demos); it cannot reload.
    ///
    /// # Errors
    ///
    /// Returns the parse and validation errors of [`Bundle::from_files`] (schema, policies,
    /// entities).
    pub fn from_sources(
        policies: &str,
        schema: &str,
        entities_json: &str,
    ) -> Result<Self, BundleError> {
        let files = vec![
            ("policies.cedar".to_string(), policies.as_bytes().to_vec()),
            ("schema.cedarschema".to_string(), schema.as_bytes().to_vec()),
            (ENTITIES_FILE.to_string(), entities_json.as_bytes().to_vec()),
        ];
        let bundle = Bundle::from_files("<inline>", &files)?;
        Ok(Self::with_bundle(bundle, None))
    }

    /// The display version of the bundle in force (16 hex chars of its content hash).
    pub fn version(&self) -> String {
        self.current.load().version().to_string()
    }

    /// The full SHA-256 content hash of the bundle in force.
    pub fn content_hash(&self) -> String {
        self.current.load().content_hash().to_string()
    }

    /// The bundle in force (a snapshot: later reloads do not change it).
    pub fn snapshot(&self) -> Arc<Bundle> {
        self.current.load_full()
    }

    /// The bundle directory, if this PDP was loaded from one.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Re-reads the bundle directory and swaps it in atomically; on error the
    /// bundle in force stays and the error says which file and why.
    ///
    /// # Errors
    ///
    /// Returns [`BundleError::NoSource`] if the PDP was built from in-memory sources, and the read,
    /// parse and validation errors of [`Bundle::load_dir`]; the bundle in force then stays.
    pub fn reload(&self) -> Result<String, BundleError> {
        let dir = self.dir.as_ref().ok_or(BundleError::NoSource)?;
        let _guard = self.reload_lock.lock();
        let files = read_bundle_files(dir)?;
        if content_hash(&files) == self.current.load().content_hash() {
            return Ok(self.version());
        }
        let bundle = Bundle::from_files(&dir.display().to_string(), &files)?;
        let version = bundle.version().to_string();
        self.current.store(Arc::new(bundle));
        Ok(version)
    }

    /// Polls the bundle directory's content hash every `every` and reloads
    /// on change, logging success or the error (the old bundle stays on error).
    /// The task ends when the PDP is dropped.
    pub fn spawn_watcher(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(every);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker.tick().await;
            // Content hash of a bundle that failed to load: not retried until it changes.
            let mut failed_hash: Option<String> = None;
            // Last failure logged (content hash, error): the same broken bundle is
            // not logged again every tick, but every new breakage is.
            let mut last_error: Option<(Option<String>, String)> = None;
            loop {
                ticker.tick().await;
                let Some(pdp) = weak.upgrade() else {
                    return;
                };
                let skip = failed_hash.clone();
                let polled =
                    tokio::task::spawn_blocking(move || pdp.poll_once(skip.as_deref())).await;
                match polled {
                    Ok(Ok(None)) => {}
                    Ok(Ok(Some(version))) => {
                        failed_hash = None;
                        last_error = None;
                        tracing::info!(version, "Cedar policy bundle reloaded");
                    }
                    Ok(Err((hash, e))) => {
                        failed_hash = hash.clone();
                        let failure = (hash, e.to_string());
                        if last_error.as_ref() != Some(&failure) {
                            tracing::error!(
                                error = %failure.1,
                                content_hash = failure.0.as_deref().unwrap_or("unreadable"),
                                "Cedar policy bundle reload failed; keeping the bundle in force"
                            );
                            last_error = Some(failure);
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "Cedar policy bundle watcher task failed");
                        return;
                    }
                }
            }
        })
    }

    /// One watcher step: reloads if the directory's content changed (and is not
    /// the known-broken `skip`). `Ok(Some(version))` when a new bundle is in
    /// force; on error, the content hash that failed (if it could be read).
    fn poll_once(
        &self,
        skip: Option<&str>,
    ) -> Result<Option<String>, (Option<String>, BundleError)> {
        let dir = self.dir.as_ref().ok_or((None, BundleError::NoSource))?;
        let files = read_bundle_files(dir).map_err(|e| (None, e))?;
        let hash = content_hash(&files);
        if hash == self.current.load().content_hash() || skip == Some(hash.as_str()) {
            return Ok(None);
        }
        self.reload().map(Some).map_err(|e| (Some(hash), e))
    }
}

#[async_trait::async_trait]
impl PolicyDecisionPoint for CedarPdp {
    async fn evaluate(&self, req: &AccessRequest) -> Result<AccessDecision, PdpError> {
        self.current.load().decide(&self.authorizer, req)
    }

    async fn evaluate_all(&self, reqs: &[AccessRequest]) -> Result<Vec<AccessDecision>, PdpError> {
        // One snapshot for every request: a reload cannot split the answer.
        self.current.load().decide_all(&self.authorizer, reqs)
    }

    fn policy_version(&self) -> String {
        self.version()
    }

    fn policy_revision(&self) -> Option<u64> {
        self.current.load().revision()
    }
}
