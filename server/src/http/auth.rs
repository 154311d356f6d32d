//! SMART on FHIR authentication and the authorization decision: bearer JWT validation
//! (RS256/ES256 against a JWKS, EdDSA for the server's own issuer key), the [`Grant`] a valid
//! token yields, and [`authorize`], the one function every handler asks.
//!
//! Nothing here logs or returns a token or a claim's value: errors carry fixed descriptions.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use fhirkeep_engine::resource::is_valid_id;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use zeroize::Zeroizing;

use super::OAuthUris;
use super::scopes::{Context, Letter, Scope, drop_privileged, parse_scopes};

/// The purpose under which the server's issuer key is derived from the database key.
pub(crate) const ISSUER_KEY_PURPOSE: &str = "smart token issuer v1";
/// Clock skew tolerated on `exp` and `nbf`, in seconds.
pub(crate) const LEEWAY_SECONDS: u64 = 30;
/// Longest lifetime of a token of the server's own issuer (`exp - iat`), in seconds.
pub(crate) const MAX_OWN_TOKEN_SECONDS: i64 = 3600;
/// The subject recorded when there is no valid token.
pub(crate) const ANONYMOUS: &str = "anonymous";
/// Longest subject or client name kept from a token (the rest is cut off).
const MAX_NAME_CHARS: usize = 128;

/// An interaction, as far as authorization is concerned (the SMART v2 letters).
pub(crate) type Interaction = Letter;

/// What one request may do: the validated token's identity and scopes.
#[derive(Debug, Clone)]
pub(crate) struct Grant {
    /// The token's `sub` (or `anonymous`).
    pub(crate) subject: String,
    /// The token's `client_id` or `azp`.
    pub(crate) client: String,
    /// The launch context's patient (`patient` claim), if any.
    pub(crate) patient: Option<String>,
    scopes: Vec<Scope>,
    /// `--auth none`: everything is allowed.
    unrestricted: bool,
}

impl Grant {
    /// The grant of every request under `--auth none`.
    pub(crate) fn unrestricted(client: &str) -> Grant {
        Grant {
            subject: ANONYMOUS.to_owned(),
            client: client.to_owned(),
            patient: None,
            scopes: Vec::new(),
            unrestricted: true,
        }
    }

    /// A grant that allows nothing (public routes without a token).
    pub(crate) fn nothing(client: &str) -> Grant {
        Grant {
            unrestricted: false,
            ..Grant::unrestricted(client)
        }
    }

    /// Whether everything is allowed (`--auth none`).
    pub(crate) fn is_unrestricted(&self) -> bool {
        self.unrestricted
    }

    /// Whether a `system/` scope without restriction allows `letter` on `resource_type`
    /// (or the server runs without auth): what administrative views such as the audit log
    /// require.
    pub(crate) fn has_system_scope(&self, letter: Letter, resource_type: &str) -> bool {
        self.unrestricted
            || self.scopes.iter().any(|s| {
                s.context == Context::System
                    && s.letters.contains(letter)
                    && s.restriction.is_empty()
                    && s.covers(Some(resource_type))
            })
    }

    /// A grant from already validated parts (patient scopes without a patient are dropped).
    pub(crate) fn from_token(
        subject: String,
        client: String,
        patient: Option<String>,
        scopes: Vec<Scope>,
    ) -> Grant {
        let scopes = scopes
            .into_iter()
            .filter(|s| s.context != Context::Patient || patient.is_some())
            .collect();
        Grant {
            subject,
            client,
            patient,
            scopes,
            unrestricted: false,
        }
    }
}

/// Which resources of a type one applicable scope reaches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Filter {
    /// Only this patient's compartment (`patient/` scopes).
    pub(crate) compartment: Option<String>,
    /// Only resources matching this search (v2 restrictions); empty for none.
    pub(crate) restriction: Vec<(String, String)>,
}

impl Filter {
    fn is_open(&self) -> bool {
        self.compartment.is_none() && self.restriction.is_empty()
    }

    /// Whether everything `other` reaches, `self` reaches too.
    fn dominates(&self, other: &Filter) -> bool {
        (self.compartment.is_none() || self.compartment == other.compartment)
            && (self.restriction.is_empty() || self.restriction == other.restriction)
    }
}

/// The answer of [`authorize`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    /// No scope allows this interaction on this type: 403.
    Forbidden,
    /// Every resource of the type.
    All,
    /// The resources some of these filters reach (at least one filter; none dominated by
    /// another).
    Filtered(Vec<Filter>),
}

/// May `grant` do `interaction` on `resource_type` (`None`: on every type at once, as a
/// search across all types), and on which resources?
pub(crate) fn authorize(
    grant: &Grant,
    interaction: Interaction,
    resource_type: Option<&str>,
) -> Decision {
    if grant.unrestricted {
        return Decision::All;
    }
    let mut filters: Vec<Filter> = Vec::new();
    for scope in &grant.scopes {
        if !scope.letters.contains(interaction) || !scope.covers(resource_type) {
            continue;
        }
        let compartment = match scope.context {
            Context::Patient => match &grant.patient {
                Some(patient) => Some(patient.clone()),
                None => continue,
            },
            Context::User | Context::System => None,
        };
        let filter = Filter {
            compartment,
            restriction: scope.restriction.clone(),
        };
        if filter.is_open() {
            return Decision::All;
        }
        if filters.iter().any(|f| f.dominates(&filter)) {
            continue;
        }
        filters.retain(|f| !filter.dominates(f));
        filters.push(filter);
    }
    if filters.is_empty() {
        Decision::Forbidden
    } else {
        Decision::Filtered(filters)
    }
}

/// Why a request's token was refused (401). The descriptions are fixed texts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AuthError {
    /// No bearer token at all.
    Missing,
    /// A token that does not validate, with a description safe to send.
    Invalid(&'static str),
}

impl AuthError {
    pub(crate) fn description(self) -> &'static str {
        match self {
            AuthError::Missing => "this request needs a bearer token (SMART on FHIR)",
            AuthError::Invalid(description) => description,
        }
    }
}

/// A public key tokens may be signed with.
#[derive(Clone)]
pub(crate) struct TrustedKey {
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
    /// The server's own issuer key (tokens must then name the server as `iss`).
    own: bool,
}

impl std::fmt::Debug for TrustedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustedKey")
            .field("kid", &self.kid)
            .field("algorithm", &self.algorithm)
            .field("own", &self.own)
            .finish_non_exhaustive()
    }
}

/// The keys of a JWKS document that can verify tokens: RSA (RS256, 2048 bits or more),
/// EC P-256 (ES256) and Ed25519 (EdDSA) signature keys. Returns the keys and how many were
/// skipped (other types, curves, uses or algorithms).
pub(crate) fn trusted_keys(jwks: &JwkSet) -> (Vec<TrustedKey>, usize) {
    let mut keys = Vec::new();
    let mut skipped = 0;
    for jwk in &jwks.keys {
        let usable_use = !matches!(
            jwk.common.public_key_use,
            Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
        );
        let algorithm = match &jwk.algorithm {
            AlgorithmParameters::RSA(rsa) => {
                let bits = URL_SAFE_NO_PAD
                    .decode(rsa.n.trim_end_matches('='))
                    .map(|n| n.iter().skip_while(|b| **b == 0).count() * 8)
                    .unwrap_or(0);
                (bits >= 2048).then_some(Algorithm::RS256)
            }
            AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
                Some(Algorithm::ES256)
            }
            AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
                Some(Algorithm::EdDSA)
            }
            _ => None,
        };
        let declared_ok = |algorithm: Algorithm| match jwk.common.key_algorithm {
            None => true,
            Some(KeyAlgorithm::RS256) => algorithm == Algorithm::RS256,
            Some(KeyAlgorithm::ES256) => algorithm == Algorithm::ES256,
            Some(KeyAlgorithm::EdDSA) => algorithm == Algorithm::EdDSA,
            Some(_) => false,
        };
        match algorithm {
            Some(algorithm) if usable_use && declared_ok(algorithm) => {
                match DecodingKey::from_jwk(jwk) {
                    Ok(key) => keys.push(TrustedKey {
                        kid: jwk.common.key_id.clone(),
                        algorithm,
                        key,
                        own: false,
                    }),
                    Err(_) => skipped += 1,
                }
            }
            _ => skipped += 1,
        }
    }
    (keys, skipped)
}

/// The server's own token issuer: an Ed25519 key derived from the database key (never stored).
pub(crate) struct IssuerKey {
    seed: Zeroizing<[u8; 32]>,
    public: [u8; 32],
}

impl std::fmt::Debug for IssuerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuerKey")
            .field("kid", &self.kid())
            .finish_non_exhaustive()
    }
}

/// PKCS#8 v1 prefix of an Ed25519 private key (RFC 8410), followed by the 32-byte seed.
const ED25519_PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

impl IssuerKey {
    /// The key for a secret from `Store::derive_secret(ISSUER_KEY_PURPOSE)`.
    pub(crate) fn from_secret(seed: Zeroizing<[u8; 32]>) -> IssuerKey {
        let public = ed25519_dalek::SigningKey::from_bytes(&seed)
            .verifying_key()
            .to_bytes();
        IssuerKey { seed, public }
    }

    /// The key id: derived from the public key, so it changes only if the key does.
    pub(crate) fn kid(&self) -> String {
        format!("fhirkeep-{}", hex_prefix(&self.public))
    }

    /// The public key as a JWK.
    pub(crate) fn public_jwk(&self) -> Value {
        json!({
            "kty": "OKP",
            "crv": "Ed25519",
            "use": "sig",
            "alg": "EdDSA",
            "kid": self.kid(),
            "x": URL_SAFE_NO_PAD.encode(self.public),
        })
    }

    fn trusted(&self) -> TrustedKey {
        TrustedKey {
            kid: Some(self.kid()),
            algorithm: Algorithm::EdDSA,
            key: DecodingKey::from_ed_components(&URL_SAFE_NO_PAD.encode(self.public))
                .unwrap_or_else(|_| DecodingKey::from_ed_der(&self.public)),
            own: true,
        }
    }

    /// Signs `claims` (EdDSA, with this key's `kid`).
    pub(crate) fn sign(&self, claims: &TokenClaims) -> Result<String, jsonwebtoken::errors::Error> {
        let mut der = Zeroizing::new(Vec::with_capacity(48));
        der.extend_from_slice(&ED25519_PKCS8_PREFIX);
        der.extend_from_slice(&self.seed[..]);
        let key = EncodingKey::from_ed_der(&der);
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid());
        jsonwebtoken::encode(&header, claims, &key)
    }
}

/// The hex of a public key's first 8 bytes: not secret, and enough to tell keys apart.
fn hex_prefix(public: &[u8; 32]) -> String {
    public[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// The claims of a token the server issues (`fhirkeep token`).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct TokenClaims {
    pub(crate) iss: String,
    pub(crate) aud: String,
    pub(crate) sub: String,
    pub(crate) client_id: String,
    pub(crate) iat: i64,
    pub(crate) nbf: i64,
    pub(crate) exp: i64,
    pub(crate) jti: String,
    pub(crate) scope: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) patient: Option<String>,
}

/// `scope` as a space-separated string, or (some servers) a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ScopeClaim {
    Text(String),
    List(Vec<String>),
}

/// The claims the server reads from a token (signature, `exp`, `nbf`, `iss` and `aud` are
/// checked by `jsonwebtoken` before this is used).
#[derive(Debug, Deserialize)]
struct Claims {
    sub: Option<String>,
    iat: Option<i64>,
    exp: Option<i64>,
    scope: Option<ScopeClaim>,
    scp: Option<ScopeClaim>,
    patient: Option<String>,
    client_id: Option<String>,
    azp: Option<String>,
    amr: Option<Vec<String>>,
}

/// Reads a JWKS file: its usable keys and how many were skipped, or why it cannot be used.
/// The error text names the file but holds none of its content.
pub(crate) fn load_jwks(path: &Path) -> Result<(Vec<TrustedKey>, usize), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("reading the JWKS {}: {e}", path.display()))?;
    let set: JwkSet = serde_json::from_str(&text)
        .map_err(|_| format!("{} is not a JSON Web Key Set", path.display()))?;
    let (keys, skipped) = trusted_keys(&set);
    if keys.is_empty() {
        return Err(format!("{} holds no usable signature key", path.display()));
    }
    Ok((keys, skipped))
}

/// How the `--jwks` file is read again while the server runs, so that an authorization
/// server's key rotation needs no restart: when a token names a key id no trusted key has
/// (a new key), at most every `min_interval`; and in any case once the keys are older than
/// `max_age` (so a key removed from the file, say a compromised one, stops being trusted).
#[derive(Debug)]
struct JwksReload {
    path: PathBuf,
    min_interval: Duration,
    max_age: Duration,
    last: Mutex<Instant>,
}

/// The `--jwks` reload timing of a running server.
pub(crate) const JWKS_RELOAD_MIN_INTERVAL: Duration = Duration::from_secs(30);
/// The longest keys from the `--jwks` file are trusted without reading the file again.
pub(crate) const JWKS_MAX_AGE: Duration = Duration::from_secs(300);

/// Token validation settings of `--auth smart`.
#[derive(Debug)]
pub(crate) struct SmartAuth {
    /// The server's base URL: the expected `aud`, and `iss` of its own tokens.
    base_url: String,
    /// `--issuer`: the only `iss` accepted from JWKS keys.
    issuer: Option<String>,
    /// The server's own key first, then the `--jwks` keys.
    keys: RwLock<Vec<TrustedKey>>,
    reload: Option<JwksReload>,
    require_mfa: bool,
    own_jwk: Value,
    endpoints: OAuthUris,
}

impl SmartAuth {
    pub(crate) fn new(
        base_url: &str,
        own: &IssuerKey,
        jwks: Vec<TrustedKey>,
        issuer: Option<String>,
        require_mfa: bool,
        endpoints: OAuthUris,
    ) -> SmartAuth {
        let mut keys = vec![own.trusted()];
        keys.extend(jwks);
        SmartAuth {
            base_url: base_url.trim_end_matches('/').to_owned(),
            issuer: issuer.map(|i| i.trim_end_matches('/').to_owned()),
            keys: RwLock::new(keys),
            reload: None,
            require_mfa,
            own_jwk: own.public_jwk(),
            endpoints,
        }
    }

    /// Reads the `--jwks` keys again from `path` while running (see [`JwksReload`]).
    pub(crate) fn reloading_jwks(
        mut self,
        path: PathBuf,
        min_interval: Duration,
        max_age: Duration,
    ) -> SmartAuth {
        self.reload = Some(JwksReload {
            path,
            min_interval,
            max_age,
            last: Mutex::new(Instant::now()),
        });
        self
    }

    /// Reads the `--jwks` file again if `kid` is unknown (and the last read is at least the
    /// minimum interval ago) or the keys are older than their maximum age. A file that cannot
    /// be used keeps the keys as they are (logged).
    fn reload_jwks_if_due(&self, kid: Option<&str>) {
        let Some(reload) = &self.reload else {
            return;
        };
        let unknown = kid.is_some_and(|kid| {
            self.keys
                .read()
                .is_ok_and(|keys| !keys.iter().any(|k| k.kid.as_deref() == Some(kid)))
        });
        {
            let Ok(mut last) = reload.last.lock() else {
                return;
            };
            let age = last.elapsed();
            if !(age >= reload.max_age || (unknown && age >= reload.min_interval)) {
                return;
            }
            *last = Instant::now();
        }
        match load_jwks(&reload.path) {
            Ok((external, _)) => {
                if let Ok(mut keys) = self.keys.write() {
                    keys.retain(|k| k.own);
                    keys.extend(external);
                    tracing::info!(keys = keys.len() - 1, "read the JWKS again");
                }
            }
            Err(error) => {
                tracing::warn!(%error, "the JWKS could not be read again; keeping its keys");
            }
        }
    }

    /// The external authorization server's endpoints, if configured.
    pub(crate) fn endpoints(&self) -> &OAuthUris {
        &self.endpoints
    }

    /// The server's own public key as a JWK.
    pub(crate) fn own_jwk(&self) -> &Value {
        &self.own_jwk
    }

    /// Whether `--require-mfa-for-privileged` is on.
    pub(crate) fn requires_mfa(&self) -> bool {
        self.require_mfa
    }

    /// Validates a bearer token and turns it into a [`Grant`].
    pub(crate) fn validate(&self, token: &str) -> Result<Grant, AuthError> {
        const MALFORMED: AuthError = AuthError::Invalid("the token is not a valid JWT");
        let header = jsonwebtoken::decode_header(token).map_err(|_| MALFORMED)?;
        if !matches!(
            header.alg,
            Algorithm::RS256 | Algorithm::ES256 | Algorithm::EdDSA
        ) {
            return Err(AuthError::Invalid(
                "the token's algorithm is not accepted (RS256, ES256, EdDSA)",
            ));
        }
        self.reload_jwks_if_due(header.kid.as_deref());
        let keys = self
            .keys
            .read()
            .map_err(|_| AuthError::Invalid("the trusted keys are unavailable"))?;
        let of_algorithm = || keys.iter().filter(|k| k.algorithm == header.alg);
        let by_kid: Vec<&TrustedKey> = match &header.kid {
            Some(kid) => of_algorithm()
                .filter(|k| k.kid.as_deref() == Some(kid.as_str()))
                .collect(),
            None => Vec::new(),
        };
        let candidates: Vec<&TrustedKey> = if by_kid.is_empty() {
            of_algorithm().collect()
        } else {
            by_kid
        };
        let mut verified = None;
        for key in candidates {
            let mut validation = Validation::new(header.alg);
            validation.leeway = LEEWAY_SECONDS;
            validation.validate_exp = true;
            validation.validate_nbf = true;
            validation.set_required_spec_claims(&["exp", "iss", "aud"]);
            let audiences = [self.base_url.clone(), format!("{}/", self.base_url)];
            validation.set_audience(&audiences);
            if key.own {
                validation.set_issuer(&[self.base_url.clone(), format!("{}/", self.base_url)]);
            } else if let Some(issuer) = &self.issuer {
                validation.set_issuer(&[issuer.clone(), format!("{issuer}/")]);
            }
            match jsonwebtoken::decode::<Claims>(token, &key.key, &validation) {
                Ok(data) => {
                    verified = Some((data.claims, key.own));
                    break;
                }
                Err(error) => {
                    use jsonwebtoken::errors::ErrorKind as K;
                    match error.kind() {
                        // Not this key: try the next one.
                        K::InvalidSignature
                        | K::InvalidEcdsaKey
                        | K::InvalidEddsaKey
                        | K::InvalidRsaKey(_)
                        | K::InvalidKeyFormat
                        | K::InvalidAlgorithm
                        | K::Provider(_) => {}
                        // The signature verified; the claims are wrong.
                        K::ExpiredSignature => {
                            return Err(AuthError::Invalid("the token has expired"));
                        }
                        K::ImmatureSignature => {
                            return Err(AuthError::Invalid("the token is not valid yet (nbf)"));
                        }
                        K::InvalidAudience => {
                            return Err(AuthError::Invalid(
                                "the token's audience is not this server",
                            ));
                        }
                        K::InvalidIssuer => {
                            return Err(AuthError::Invalid("the token's issuer is not trusted"));
                        }
                        K::MissingRequiredClaim(_) => {
                            return Err(AuthError::Invalid(
                                "the token lacks a required claim (exp, iss, aud)",
                            ));
                        }
                        _ => return Err(MALFORMED),
                    }
                }
            }
        }
        let Some((claims, own)) = verified else {
            return Err(AuthError::Invalid(
                "the token's signature does not verify with any trusted key",
            ));
        };
        if own {
            // Tokens of the server's own issuer live an hour at most, from when they were
            // issued (not later than now).
            let latest_iat = chrono::Utc::now().timestamp() + LEEWAY_SECONDS as i64;
            match (claims.iat, claims.exp) {
                (Some(iat), Some(exp))
                    if exp - iat <= MAX_OWN_TOKEN_SECONDS && iat <= latest_iat => {}
                _ => {
                    return Err(AuthError::Invalid(
                        "the token's lifetime exceeds what this server issues",
                    ));
                }
            }
        }
        Ok(self.grant_of(claims))
    }

    fn grant_of(&self, claims: Claims) -> Grant {
        let scope_texts: Vec<String> = [claims.scope, claims.scp]
            .into_iter()
            .flatten()
            .flat_map(|claim| match claim {
                ScopeClaim::Text(text) => vec![text],
                ScopeClaim::List(list) => list,
            })
            .collect();
        let mut scopes = parse_scopes(scope_texts.iter().map(String::as_str));
        let mfa = claims
            .amr
            .as_ref()
            .is_some_and(|amr| amr.iter().any(|m| m == "mfa"));
        if self.require_mfa && !mfa {
            scopes = drop_privileged(scopes);
        }
        let patient = claims.patient.filter(|p| is_valid_id(p));
        let client = claims
            .client_id
            .or(claims.azp)
            .map_or_else(|| "unknown-client".to_owned(), |c| clean_name(&c));
        let subject = claims
            .sub
            .map_or_else(|| format!("client:{client}"), |s| clean_name(&s));
        Grant::from_token(subject, client, patient, scopes)
    }
}

/// A name from a token as the audit log keeps it: printable, bounded.
fn clean_name(name: &str) -> String {
    name.chars()
        .filter(|c| !c.is_control())
        .take(MAX_NAME_CHARS)
        .collect()
}

/// The bearer token of a request, if it sent one (`Authorization: Bearer ...`). Several
/// Authorization headers are refused as invalid.
pub(crate) fn bearer_token(headers: &axum::http::HeaderMap) -> Result<Option<&str>, AuthError> {
    let mut values = headers.get_all(axum::http::header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(AuthError::Invalid("several Authorization headers"));
    }
    let text = value
        .to_str()
        .map_err(|_| AuthError::Invalid("the Authorization header is not text"))?;
    let Some((scheme, token)) = text.trim().split_once(' ') else {
        return Ok(None);
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        // Another scheme: as if no token was sent.
        return Ok(None);
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(AuthError::Invalid("the bearer token is empty"));
    }
    Ok(Some(token))
}

/// The scopes the server knows how to honour, for `/.well-known/smart-configuration`.
pub(crate) fn scopes_supported() -> Vec<&'static str> {
    vec![
        "patient/*.rs",
        "patient/*.cruds",
        "user/*.rs",
        "user/*.cruds",
        "system/*.rs",
        "system/*.cruds",
        "patient/*.read",
        "patient/*.write",
        "user/*.read",
        "user/*.write",
        "system/*.read",
        "system/*.write",
    ]
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn grant(scopes: &str, patient: Option<&str>) -> Grant {
        Grant::from_token(
            "s".into(),
            "c".into(),
            patient.map(str::to_owned),
            parse_scopes([scopes]),
        )
    }

    fn compartment(patient: &str) -> Filter {
        Filter {
            compartment: Some(patient.to_owned()),
            restriction: Vec::new(),
        }
    }

    fn restricted(name: &str, value: &str) -> Filter {
        Filter {
            compartment: None,
            restriction: vec![(name.to_owned(), value.to_owned())],
        }
    }

    #[test]
    fn authorize_decides_by_letter_type_context_and_restriction() {
        use Letter::{Create, Delete, Read, Search, Update};
        let p1 = Some("p1");
        type Row = (
            &'static str,
            Option<&'static str>,
            Letter,
            Option<&'static str>,
            Decision,
        );
        let table: Vec<Row> = vec![
            ("system/*.*", None, Delete, Some("Patient"), Decision::All),
            ("system/*.*", None, Search, None, Decision::All),
            (
                "user/Observation.rs",
                None,
                Read,
                Some("Observation"),
                Decision::All,
            ),
            (
                "user/Observation.rs",
                None,
                Update,
                Some("Observation"),
                Decision::Forbidden,
            ),
            (
                "user/Observation.rs",
                None,
                Read,
                Some("Patient"),
                Decision::Forbidden,
            ),
            (
                "user/Observation.rs",
                None,
                Search,
                None,
                Decision::Forbidden,
            ),
            (
                "user/*.write",
                None,
                Create,
                Some("Encounter"),
                Decision::All,
            ),
            (
                "user/*.write",
                None,
                Read,
                Some("Encounter"),
                Decision::Forbidden,
            ),
            (
                "patient/*.rs",
                p1,
                Read,
                Some("Observation"),
                Decision::Filtered(vec![compartment("p1")]),
            ),
            (
                "patient/*.rs",
                None,
                Read,
                Some("Observation"),
                Decision::Forbidden,
            ),
            // A broader scope wins over a narrower one.
            (
                "patient/*.rs user/Observation.r",
                p1,
                Read,
                Some("Observation"),
                Decision::All,
            ),
            (
                "patient/Observation.rs?category=laboratory patient/Observation.rs",
                p1,
                Search,
                Some("Observation"),
                Decision::Filtered(vec![compartment("p1")]),
            ),
            (
                "user/Observation.rs?category=laboratory user/Observation.rs?category=vital-signs",
                None,
                Search,
                Some("Observation"),
                Decision::Filtered(vec![
                    restricted("category", "laboratory"),
                    restricted("category", "vital-signs"),
                ]),
            ),
            (
                "openid fhirUser",
                None,
                Read,
                Some("Patient"),
                Decision::Forbidden,
            ),
            ("", None, Read, Some("Patient"), Decision::Forbidden),
        ];
        for (scopes, patient, letter, resource_type, expected) in table {
            assert_eq!(
                authorize(&grant(scopes, patient), letter, resource_type),
                expected,
                "{scopes} {letter:?} {resource_type:?}"
            );
        }
        assert_eq!(
            authorize(&Grant::unrestricted("x"), Delete, Some("Patient")),
            Decision::All
        );
        assert_eq!(
            authorize(&Grant::nothing("x"), Read, Some("Patient")),
            Decision::Forbidden
        );
    }

    #[test]
    fn only_signature_keys_of_the_accepted_kinds_are_trusted() {
        let jwks: JwkSet = serde_json::from_value(json!({"keys": [
            // RSA of 512 bits: too small.
            {"kty": "RSA", "kid": "small", "e": "AQAB",
             "n": "sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXbw"},
            // An encryption key.
            {"kty": "EC", "use": "enc", "crv": "P-256",
             "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
             "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
            // Declared for another algorithm.
            {"kty": "EC", "alg": "ES384", "crv": "P-256",
             "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
             "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
            // A usable ES256 key.
            {"kty": "EC", "kid": "ok", "use": "sig", "crv": "P-256",
             "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
             "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
        ]}))
        .unwrap();
        let (keys, skipped) = trusted_keys(&jwks);
        assert_eq!(skipped, 3);
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].kid.as_deref(), Some("ok"));
        assert_eq!(keys[0].algorithm, Algorithm::ES256);
    }

    #[test]
    fn bearer_tokens_are_found_only_in_a_single_bearer_authorization_header() {
        use axum::http::header::AUTHORIZATION;
        use axum::http::{HeaderMap, HeaderValue};
        let mut headers = HeaderMap::new();
        assert_eq!(bearer_token(&headers), Ok(None));
        headers.insert(
            AUTHORIZATION,
            HeaderValue::from_static("bearer  abc.def.ghi "),
        );
        assert_eq!(bearer_token(&headers), Ok(Some("abc.def.ghi")));
        headers.insert(AUTHORIZATION, HeaderValue::from_static("Basic dTpw"));
        assert_eq!(bearer_token(&headers), Ok(None));
        headers.insert(AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert_eq!(bearer_token(&headers), Ok(None));
        headers.append(AUTHORIZATION, HeaderValue::from_static("Bearer x"));
        assert!(bearer_token(&headers).is_err());
    }

    #[test]
    fn a_rotated_jwks_is_read_again_for_new_and_removed_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("issuers.jwks.json");
        let write = |keys: Vec<Value>| {
            std::fs::write(&path, json!({"keys": keys}).to_string()).unwrap();
        };
        let old_key = IssuerKey::from_secret(Zeroizing::new([11u8; 32]));
        let new_key = IssuerKey::from_secret(Zeroizing::new([12u8; 32]));
        write(vec![old_key.public_jwk()]);
        let (keys, _) = load_jwks(&path).unwrap();
        let own = IssuerKey::from_secret(Zeroizing::new([7u8; 32]));
        let max_age = Duration::from_millis(300);
        let auth = SmartAuth::new(
            "http://h.test",
            &own,
            keys,
            None,
            false,
            OAuthUris::default(),
        )
        .reloading_jwks(path.clone(), Duration::ZERO, max_age);
        let signed_by = |key: &IssuerKey, issuer: &str| {
            let now = chrono::Utc::now().timestamp();
            key.sign(&TokenClaims {
                iss: issuer.into(),
                aud: "http://h.test".into(),
                sub: "me".into(),
                client_id: "cli".into(),
                iat: now,
                nbf: now,
                exp: now + 60,
                jti: "1".into(),
                scope: "system/*.rs".into(),
                patient: None,
            })
            .unwrap()
        };
        let token = |key: &IssuerKey| signed_by(key, "https://issuer.test");
        assert!(auth.validate(&token(&old_key)).is_ok());
        assert!(auth.validate(&token(&new_key)).is_err());
        // The issuer rotates: a token with the new key id makes the server read the file.
        write(vec![old_key.public_jwk(), new_key.public_jwk()]);
        assert!(auth.validate(&token(&new_key)).is_ok());
        // The old key is withdrawn: it stops being trusted once the keys reach their age.
        write(vec![new_key.public_jwk()]);
        std::thread::sleep(max_age + Duration::from_millis(50));
        assert!(auth.validate(&token(&old_key)).is_err());
        assert!(auth.validate(&token(&new_key)).is_ok());
        // A broken file keeps the keys as they were.
        std::fs::write(&path, "not json").unwrap();
        std::thread::sleep(max_age + Duration::from_millis(50));
        assert!(auth.validate(&token(&new_key)).is_ok());
        assert!(load_jwks(&path).is_err());
        // The server's own key is never dropped by a reload.
        write(vec![new_key.public_jwk()]);
        std::thread::sleep(max_age + Duration::from_millis(50));
        assert!(auth.validate(&signed_by(&own, "http://h.test")).is_ok());
        assert!(auth.validate(&token(&new_key)).is_ok());
    }

    #[test]
    fn the_issuer_key_signs_tokens_its_public_key_verifies() {
        let key = IssuerKey::from_secret(Zeroizing::new([7u8; 32]));
        let auth = SmartAuth::new(
            "http://h.test/",
            &key,
            Vec::new(),
            None,
            false,
            OAuthUris::default(),
        );
        let now = chrono::Utc::now().timestamp();
        let token = key
            .sign(&TokenClaims {
                iss: "http://h.test".into(),
                aud: "http://h.test".into(),
                sub: "me".into(),
                client_id: "cli".into(),
                iat: now,
                nbf: now,
                exp: now + 60,
                jti: "1".into(),
                scope: "patient/*.rs launch".into(),
                patient: Some("p9".into()),
            })
            .unwrap();
        let grant = auth.validate(&token).unwrap();
        assert_eq!(grant.subject, "me");
        assert_eq!(grant.client, "cli");
        assert_eq!(grant.patient.as_deref(), Some("p9"));
        assert_eq!(
            authorize(&grant, Letter::Read, Some("Observation")),
            Decision::Filtered(vec![compartment("p9")])
        );
        // Another database's key does not verify it.
        let other = IssuerKey::from_secret(Zeroizing::new([8u8; 32]));
        let other_auth = SmartAuth::new(
            "http://h.test",
            &other,
            Vec::new(),
            None,
            false,
            OAuthUris::default(),
        );
        assert!(other_auth.validate(&token).is_err());
        assert_ne!(key.kid(), other.kid());
        assert!(!format!("{key:?}").contains("seed"));
    }
}
