"""Settings, read from the environment once and validated up front.

A broken setting must stop the function before it touches any record, with one
message that names every problem, rather than failing each record in turn.
"""

from __future__ import annotations

import os
import re
import string
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.headerregistry import Address
from email.utils import getaddresses
from pathlib import Path
from typing import Any, Literal, TypeVar, overload

TlsMode = Literal["starttls", "tls", "none"]
#: TRANSPORT: an SMTP relay, or the SES v2 API (SendEmail with raw content).
Transport = Literal["smtp", "ses"]
TRANSPORTS: tuple[Transport, ...] = ("smtp", "ses")
#: FALLBACK_TRANSPORT: the other transport, or none.
Fallback = Literal["none", "smtp", "ses"]
FALLBACKS: tuple[Fallback, ...] = ("none", *TRANSPORTS)
#: SMTP_RATE_LIMIT: the account's sends per second for the whole fleet, "auto" (read from
#: SES), or None (no pacing).
RateLimit = float | Literal["auto"] | None


class ConfigError(Exception):
    """A missing or invalid setting (or template); raised once, at start, naming every
    problem: the function cannot run, so the invocation fails loudly."""


@dataclass(frozen=True)
class Rule:
    """What `Settings.from_env` enforces for one variable, as its reader declares it.

    Recorded by the readers themselves (`Settings.rules`), so the bounds written in a
    reader's call are the only copy: the README's configuration table is checked against
    these (tests/test_docs.py), and cannot promise a range the parser does not hold.
    """

    default: str | int | float | bool | None = None  # None: unset, or not a literal
    required: bool = False
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()  # also the words a number may be replaced by
    pattern: str | None = None  # a text's shape, in words


_T = TypeVar("_T", bound=str)
TLS_MODES: tuple[TlsMode, ...] = ("starttls", "tls", "none")
MIB = 1024 * 1024
SUPPORTED_LOCALES: tuple[str, ...] = ("pt-BR", "en")
# Lambda's application log levels (AWS_LAMBDA_LOG_LEVEL) as Python's: TRACE has no twin.
LAMBDA_LOG_LEVELS = {
    "TRACE": "DEBUG",
    "DEBUG": "DEBUG",
    "INFO": "INFO",
    "WARN": "WARNING",
    "ERROR": "ERROR",
    "FATAL": "CRITICAL",
}
DEFAULT_TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates"


def _default_templates_dir(package: Path) -> Path:
    """The package's own templates/ (an installed wheel ships them there), else the one
    beside the package: a checkout, an editable install and the Lambda zip keep templates/ at
    the top level, next to async_notifier/."""
    inside = package / "templates"
    return inside if inside.is_dir() else package.parent / "templates"


DEFAULT_TEMPLATES_DIR = _default_templates_dir(Path(__file__).resolve().parent)
# An SES SMTP endpoint: email-smtp.REGION.amazonaws.com, its FIPS twin, and an interface
# VPC endpoint's own name.
_REGION = r"(?P<region>[a-z]{2}(?:-[a-z]+)+-\d+)"
_SES_SMTP_HOSTS = tuple(
    re.compile(pattern, re.IGNORECASE)
    for pattern in (
        rf"email-smtp(?:-fips)?\.{_REGION}\.amazonaws\.com\.?",
        rf"vpce-[a-z0-9-]+\.email-smtp\.{_REGION}\.vpce\.amazonaws\.com\.?",
    )
)
# S3's rules for a bucket's name (3-63 lower-case letters, digits, dots and hyphens).
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
ANY_BUCKET = "*"
# What ALLOWED_KEY_PREFIX may name, filled in from each message.
KEY_PREFIX_FIELDS = frozenset({"cognito_user_id", "video_id"})
# SES: "up to 64 characters: letters, numbers, underscores and dashes".
_CONFIGURATION_SET_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# A standard SNS topic's ARN (PublishBatch needs no group id: not a FIFO topic).
_TOPIC_ARN_RE = re.compile(r"^arn:aws[a-z-]*:sns:[a-z0-9-]+:\d{12}:[A-Za-z0-9_-]{1,256}$")
# The pattern AWS documents for UserPoolId.
USER_POOL_ID_RE = re.compile(r"^[\w-]+_[0-9a-zA-Z]+$")
# CloudWatch's namespace characters; "AWS/" is reserved for AWS's own namespaces.
_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9 .\-_/#:]{1,255}$")
NAMESPACE_RULE = "1-255 of A-Z a-z 0-9 . - _ / # : and space, not starting with AWS/"
USER_POOL_ID_RULE = "a user pool id such as us-east-1_AbCdEf123"
CONFIGURATION_SET_RULE = "1-64 of A-Z a-z 0-9 _ -"


def validate_namespace(namespace: str) -> str:
    """The namespace if CloudWatch accepts it, else ValueError (for the metrics too)."""
    if not _NAMESPACE_RE.match(namespace) or namespace.startswith("AWS/"):
        raise ValueError(f"invalid metric namespace {namespace!r}: {NAMESPACE_RULE}")
    return namespace


@dataclass(frozen=True)
class Settings:
    smtp_server: str
    email_from: Address
    # Which transport sends, and which one carries the mail while it cannot (None: none).
    transport: Transport = "smtp"
    fallback_transport: Transport | None = None
    # The SES API transport: its region (None: AWS_REGION), the bytes it holds at once.
    ses_region: str | None = None
    ses_max_inflight_bytes: int = 256 * MIB
    aws_region: str = "us-east-1"
    aws_endpoint_url: str | None = None
    smtp_port: int = 587
    smtp_user: str | None = None
    smtp_password: str | None = field(default=None, repr=False)
    smtp_tls: TlsMode = "starttls"
    smtp_ca_file: Path | None = None
    smtp_timeout: float = 30.0
    smtp_data_timeout: float = 600.0
    smtp_local_hostname: str | None = None
    smtp_pool_size: int = 8
    smtp_max_messages_per_connection: int = 100
    smtp_max_connection_age: float = 300.0
    smtp_idle_check: float = 10.0
    smtp_pipelining: bool = True
    smtp_breaker_threshold: int = 5
    smtp_breaker_cooldown: float = 30.0
    smtp_chunk_bytes: int = 64 * 1024
    max_concurrency: int = 32
    # The buckets a message may name ("*": any, said on purpose); none unless set.
    allowed_buckets: frozenset[str] = frozenset()
    # Keys a message may name, per message: "{cognito_user_id}" and "{video_id}" filled in.
    allowed_key_prefix: str | None = None
    default_locale: str = "pt-BR"
    templates_dir: Path = DEFAULT_TEMPLATES_DIR
    tmp_dir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()))
    download_chunk_bytes: int = 1024 * 1024
    # LOG_LEVEL, or in Lambda the function's application log level (AWS_LAMBDA_LOG_LEVEL).
    log_level: str = "INFO"
    # Reliability (deadlines, retries, dead letters, idempotency, large files).
    deadline_margin: float | None = None
    s3_timeout: float = 30.0
    retry_attempts: int = 3
    retry_base_delay: float = 0.2
    smtp_rate_limit: RateLimit = None
    # The instances that share the account's rate (Lambda: the queue's MaximumConcurrency).
    fleet_size: int = 1
    dead_letter_queue_url: str | None = None
    retry_backoff: bool = True
    # A notification is retried until it is this old (SQS's SentTimestamp), then expires.
    max_delivery_age: int = 24 * 3600
    retry_backoff_base: int = 30
    retry_backoff_cap: int = 300
    idempotency_table: str | None = None
    idempotency_ttl: int = 24 * 3600
    suppression_table: str | None = None
    suppression_soft_ttl: int = 30 * 24 * 3600
    # Delivery status per notification (`delivery_status`): the table, its TTL, the topic.
    status_table: str | None = None
    status_ttl: int = 90 * 24 * 3600
    status_topic_arn: str | None = None
    max_attachment_bytes: int = 18 * MIB
    link_expiry_seconds: int = 7 * 24 * 3600
    max_tmp_bytes: int = 400 * MIB
    # Operations (secrets, metrics, recipients from Cognito).
    smtp_password_secret_id: str | None = None
    smtp_secret_ttl: float = 300.0
    metrics_namespace: str = "AsyncNotifier"
    cognito_user_pool_id: str | None = None
    allow_unverified_email: bool = False
    # Links signed with these keys (an access key pair in Secrets Manager) last as asked.
    link_signing_secret_id: str | None = None
    # Headers of every email.
    reply_to: Address | None = None
    ses_configuration_set: str | None = None

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, sending: bool = True
    ) -> Settings:
        """Parse every setting, collecting all problems into one ConfigError.

        `sending=False` is the SES events function's: it mails nothing, so the SMTP server,
        sender and buckets are not needed, and SUPPRESSION_TABLE is.
        """
        env = _Env(os.environ if environ is None else environ)
        settings = cls._read(env, sending=sending)
        if env.problems:
            raise ConfigError("invalid configuration: " + "; ".join(env.problems))
        return settings

    @classmethod
    def for_status(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """The `status` and `canary` commands' settings: they read the status table, so
        STATUS_TABLE is required, and they mail nothing (no SMTP server, sender, buckets or
        suppression table needed)."""
        env = _Env(os.environ if environ is None else environ)
        settings = cls._read(env, sending=False, reading_status=True)
        if env.problems:
            raise ConfigError("invalid configuration: " + "; ".join(env.problems))
        return settings

    @classmethod
    def rules(cls) -> dict[str, Rule]:
        """Every variable `from_env` reads, with the default and bounds its reader enforces
        (read from the readers themselves, on an empty environment)."""
        env = _Env({})
        cls._read(env, sending=True)
        return dict(env.rules)

    @classmethod
    def _read(cls, env: _Env, *, sending: bool, reading_status: bool = False) -> Settings:
        """The settings `env` holds; its problems are collected in `env.problems`."""
        transport = env.choice("TRANSPORT", "smtp", TRANSPORTS)
        fallback_name = env.choice("FALLBACK_TRANSPORT", "none", FALLBACKS)
        fallback: Transport | None = None if fallback_name == "none" else fallback_name
        needs_smtp = sending and "smtp" in (transport, fallback)
        settings = cls(
            transport=transport,
            fallback_transport=fallback,
            ses_region=env.optional("SES_REGION"),
            ses_max_inflight_bytes=env.integer(
                "SES_MAX_INFLIGHT_BYTES", 256 * MIB, low=MIB, high=4096 * MIB
            ),
            smtp_server=env.required("SMTP_SERVER") if needs_smtp else env.text("SMTP_SERVER", ""),
            email_from=(
                env.address("EMAIL_FROM")
                if sending
                else env.address("EMAIL_FROM", required=False) or Address()
            ),
            aws_region=env.text("AWS_REGION", "us-east-1"),
            aws_endpoint_url=env.optional("AWS_ENDPOINT_URL"),
            # Implicit TLS lives on 465 (RFC 8314); submission with STARTTLS on 587.
            smtp_port=env.integer(
                "SMTP_PORT",
                465 if (env.optional("SMTP_TLS") or "").lower() == "tls" else 587,
                low=1,
                high=65535,
            ),
            smtp_user=env.optional("SMTP_USER"),
            smtp_password=env.optional("SMTP_PASSWORD"),
            smtp_tls=env.choice("SMTP_TLS", "starttls", TLS_MODES),
            smtp_ca_file=env.existing_file("SMTP_CA_FILE"),
            smtp_timeout=env.number("SMTP_TIMEOUT", 30.0, low=0.1),
            # RFC 5321 section 4.5.3.2.6: wait up to 10 minutes for the reply to the end of data.
            smtp_data_timeout=env.number("SMTP_DATA_TIMEOUT", 600.0, low=0.1),
            smtp_local_hostname=env.optional("SMTP_LOCAL_HOSTNAME"),
            smtp_pool_size=env.integer("SMTP_POOL_SIZE", 8, low=1, high=1000),
            smtp_max_messages_per_connection=env.integer(
                "SMTP_MAX_MESSAGES_PER_CONNECTION", 100, low=1
            ),
            smtp_max_connection_age=env.number("SMTP_MAX_CONNECTION_AGE", 300.0, low=1.0),
            smtp_idle_check=env.number("SMTP_IDLE_CHECK_SECONDS", 10.0, low=0.0),
            smtp_pipelining=env.boolean("SMTP_PIPELINING", True),
            smtp_breaker_threshold=env.integer("SMTP_BREAKER_THRESHOLD", 5, low=0, high=1000),
            smtp_breaker_cooldown=env.number("SMTP_BREAKER_COOLDOWN_SECONDS", 30.0, low=0.0),
            smtp_chunk_bytes=env.integer(
                "SMTP_CHUNK_BYTES", 64 * 1024, low=1024, high=16 * 1024 * 1024
            ),
            max_concurrency=env.integer("MAX_CONCURRENCY", 32, low=1, high=10000),
            allowed_buckets=env.buckets("ALLOWED_BUCKETS") if sending else frozenset(),
            allowed_key_prefix=env.key_prefix("ALLOWED_KEY_PREFIX"),
            default_locale=env.choice("DEFAULT_LOCALE", "pt-BR", SUPPORTED_LOCALES),
            templates_dir=env.directory("TEMPLATES_DIR", DEFAULT_TEMPLATES_DIR),
            tmp_dir=env.directory("TMP_DIR", Path(tempfile.gettempdir())),
            download_chunk_bytes=env.integer(
                "DOWNLOAD_CHUNK_BYTES", 1024 * 1024, low=4096, high=64 * 1024 * 1024
            ),
            log_level=env.log_level(
                env.choice("LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR"), upper=True),
                lambda_variable="AWS_LAMBDA_LOG_LEVEL",
            ),
            deadline_margin=env.optional_number("DEADLINE_MARGIN_SECONDS", low=0.0),
            s3_timeout=env.number("S3_TIMEOUT", 30.0, low=0.1),
            retry_attempts=env.integer("RETRY_ATTEMPTS", 3, low=1, high=20),
            retry_base_delay=env.number("RETRY_BASE_DELAY", 0.2, low=0.0),
            smtp_rate_limit=env.rate_limit(
                "SMTP_RATE_LIMIT", ses=transport == "ses" or is_ses(env.optional("SMTP_SERVER"))
            ),
            fleet_size=env.integer("FLEET_SIZE", 1, low=1, high=10000),
            dead_letter_queue_url=env.optional("DEAD_LETTER_QUEUE_URL"),
            retry_backoff=env.boolean("RETRY_BACKOFF", True),
            # SQS keeps a message at most 14 days.
            max_delivery_age=env.integer(
                "MAX_DELIVERY_AGE", 24 * 3600, low=60, high=14 * 24 * 3600
            ),
            retry_backoff_base=env.integer("RETRY_BACKOFF_BASE_SECONDS", 30, low=1, high=43200),
            # SQS's longest visibility timeout is 12 hours.
            retry_backoff_cap=env.integer("RETRY_BACKOFF_CAP_SECONDS", 300, low=1, high=43200),
            idempotency_table=env.optional("IDEMPOTENCY_TABLE"),
            idempotency_ttl=env.integer("IDEMPOTENCY_TTL_SECONDS", 24 * 3600, low=60),
            suppression_table=(
                env.optional("SUPPRESSION_TABLE")
                if sending or reading_status
                else env.required("SUPPRESSION_TABLE")
            ),
            suppression_soft_ttl=env.integer(
                "SUPPRESSION_SOFT_TTL_SECONDS", 30 * 24 * 3600, low=3600
            ),
            status_table=(
                env.required("STATUS_TABLE") if reading_status else env.optional("STATUS_TABLE")
            ),
            status_ttl=env.integer("STATUS_TTL_SECONDS", 90 * 24 * 3600, low=3600),
            status_topic_arn=env.pattern(
                "STATUS_TOPIC_ARN",
                _TOPIC_ARN_RE,
                "an SNS topic ARN (arn:aws:sns:REGION:ACCOUNT:NAME)",
            ),
            max_attachment_bytes=env.integer("MAX_ATTACHMENT_BYTES", 18 * MIB, low=0),
            # SigV4 presigned URLs are valid for at most 7 days.
            link_expiry_seconds=env.integer(
                "LINK_EXPIRY_SECONDS", 7 * 24 * 3600, low=60, high=7 * 24 * 3600
            ),
            max_tmp_bytes=env.integer("MAX_TMP_BYTES", 400 * MIB, low=MIB),
            smtp_password_secret_id=env.optional("SMTP_PASSWORD_SECRET_ID"),
            smtp_secret_ttl=env.number("SMTP_SECRET_TTL_SECONDS", 300.0, low=0.0),
            metrics_namespace=env.namespace("METRICS_NAMESPACE", "AsyncNotifier"),
            cognito_user_pool_id=env.pattern(
                "COGNITO_USER_POOL_ID", USER_POOL_ID_RE, USER_POOL_ID_RULE
            ),
            allow_unverified_email=env.boolean("ALLOW_UNVERIFIED_EMAIL", False),
            link_signing_secret_id=env.optional("LINK_SIGNING_SECRET_ID"),
            reply_to=env.address("REPLY_TO", required=False),
            ses_configuration_set=env.pattern(
                "SES_CONFIGURATION_SET", _CONFIGURATION_SET_RE, CONFIGURATION_SET_RULE
            ),
        )
        if settings.smtp_password and not settings.smtp_user:
            env.problems.append("SMTP_PASSWORD is set but SMTP_USER is not")
        if (
            settings.smtp_user
            and not settings.smtp_password
            and not settings.smtp_password_secret_id
        ):
            env.problems.append(
                "SMTP_USER is set but neither SMTP_PASSWORD nor SMTP_PASSWORD_SECRET_ID: the "
                "login would be refused for every record"
            )
        if settings.smtp_password and settings.smtp_password_secret_id:
            env.problems.append("set SMTP_PASSWORD or SMTP_PASSWORD_SECRET_ID, not both")
        if settings.smtp_password_secret_id and settings.smtp_tls == "none":
            env.problems.append(
                "SMTP_PASSWORD_SECRET_ID is set with SMTP_TLS=none: the password would cross "
                "the network in clear text"
            )
        if settings.smtp_user and settings.smtp_tls == "none":
            env.problems.append(
                "SMTP_USER is set with SMTP_TLS=none: the password would cross the network "
                "in clear text"
            )
        if settings.fallback_transport == settings.transport:
            env.problems.append("FALLBACK_TRANSPORT must differ from TRANSPORT (or be none)")
        return settings

    @property
    def sender_domain(self) -> str:
        return self.email_from.domain or "localhost"

    @property
    def quota_region(self) -> str | None:
        """Where the account's SES quota is read (SMTP_RATE_LIMIT=auto): the SES API
        transport's region, else the region of the SES SMTP endpoint SMTP_SERVER names."""
        if "ses" in (self.transport, self.fallback_transport):
            return self.ses_region or self.aws_region
        return ses_region(self.smtp_server)


def ses_region(smtp_server: str | None) -> str | None:
    """`eu-west-1` for `email-smtp.eu-west-1.amazonaws.com` (also the FIPS and VPC endpoint
    names); None for any other host."""
    host = (smtp_server or "").strip()
    for pattern in _SES_SMTP_HOSTS:
        if match := pattern.fullmatch(host):
            return match["region"].lower()
    return None


def is_ses(smtp_server: str | None) -> bool:
    """Whether the SMTP server is Amazon SES (whose quota SMTP_RATE_LIMIT=auto reads)."""
    return ses_region(smtp_server) is not None


class _Env:
    """Typed reads of an environment mapping that record problems instead of raising."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self.problems: list[str] = []
        # What each variable's reader enforces (`Settings.rules`); a typed reader's rule
        # replaces the bare one of the `optional` read it starts with.
        self.rules: dict[str, Rule] = {}

    def _rule(self, name: str, **rule: Any) -> None:
        self.rules[name] = Rule(**rule)

    def optional(self, name: str) -> str | None:
        self.rules.setdefault(name, Rule())
        value = self.environ.get(name, "").strip()
        return value or None

    def text(self, name: str, default: str) -> str:
        self._rule(name, default=default)
        return self.optional(name) or default

    def required(self, name: str) -> str:
        self._rule(name, required=True)
        value = self.optional(name)
        if value is None:
            self.problems.append(f"{name} is required")
            return ""
        return value

    def integer(self, name: str, default: int, *, low: int, high: int | None = None) -> int:
        self._rule(name, default=default, low=low, high=high)
        raw = self.optional(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            self.problems.append(f"{name} must be an integer, got {raw!r}")
            return default
        if value < low or (high is not None and value > high):
            bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
            self.problems.append(f"{name} must be {bounds}, got {value}")
            return default
        return value

    def number(self, name: str, default: float, *, low: float) -> float:
        self._rule(name, default=default, low=low)
        return self._number(name, default, low=low)

    def _number(self, name: str, default: float, *, low: float) -> float:
        raw = self.optional(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            self.problems.append(f"{name} must be a number, got {raw!r}")
            return default
        if not value >= low:
            self.problems.append(f"{name} must be at least {low}, got {raw}")
            return default
        return value

    def choice(self, name: str, default: _T, choices: tuple[_T, ...], *, upper: bool = False) -> _T:
        self._rule(name, default=default, choices=choices)
        raw = self.optional(name)
        if raw is None:
            return default
        wanted = raw.upper() if upper else raw
        for option in choices:
            if option.lower() == wanted.lower():
                return option
        self.problems.append(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
        return default

    def log_level(self, own: str, *, lambda_variable: str) -> str:
        """LOG_LEVEL, unless Lambda's application log level is set (AWS_LAMBDA_LOG_LEVEL,
        from the function's LoggingConfig): then that one, as Powertools does. Lambda drops
        every line below it anyway, and it is the level the function's configuration shows."""
        self._rule(lambda_variable, choices=tuple(LAMBDA_LOG_LEVELS))
        lambda_level = self.optional(lambda_variable)
        if lambda_level is None:
            return own
        level = LAMBDA_LOG_LEVELS.get(lambda_level.upper())
        if level is None:
            choices = ", ".join(LAMBDA_LOG_LEVELS)
            self.problems.append(
                f"{lambda_variable} must be one of {choices}, got {lambda_level!r}"
            )
            return own
        return level

    def optional_number(self, name: str, *, low: float) -> float | None:
        self._rule(name, low=low)
        if self.optional(name) is None:
            return None
        return self._number(name, low, low=low)

    def rate_limit(self, name: str, *, ses: bool) -> RateLimit:
        """Sends per second, "auto" (the default when the relay is SES), or "none" (None)."""
        low = 0.001
        self._rule(name, low=low, choices=("auto", "none"))
        raw = self.optional(name)
        if raw is None:
            return "auto" if ses else None
        if raw.lower() == "auto":
            return "auto"
        if raw.lower() in ("none", "off"):
            return None
        return self._number(name, 1.0, low=low)

    def boolean(self, name: str, default: bool) -> bool:
        self._rule(name, default=default, choices=("true", "false"))
        raw = self.optional(name)
        if raw is None:
            return default
        value = raw.lower()
        if value in ("1", "true", "yes", "on"):
            return True
        if value in ("0", "false", "no", "off"):
            return False
        self.problems.append(f"{name} must be true or false, got {raw!r}")
        return default

    def buckets(self, name: str) -> frozenset[str]:
        """Required: bucket names, comma-separated, or "*" for any bucket (on purpose)."""
        self._rule(name, required=True)
        raw = self.optional(name)
        if raw is None:
            self.problems.append(
                f"{name} is required: the buckets whose objects may be mailed, "
                f"comma-separated, or {ANY_BUCKET!r} to allow any bucket"
            )
            return frozenset()
        buckets = frozenset(part.strip() for part in raw.split(",") if part.strip())
        if not buckets:
            self.problems.append(f"{name} names no bucket (use {ANY_BUCKET!r} for any bucket)")
        if ANY_BUCKET in buckets and len(buckets) > 1:
            self.problems.append(f"{name}: {ANY_BUCKET!r} allows any bucket; list none beside it")
        bad = sorted(b for b in buckets - {ANY_BUCKET} if not _BUCKET_NAME.fullmatch(b))
        if bad:
            self.problems.append(
                f"{name}: not S3 bucket names: {', '.join(repr(b[:70]) for b in bad)}"
            )
        return buckets

    def key_prefix(self, name: str) -> str | None:
        """A key prefix with `{field}` placeholders from the message, checked up front."""
        raw = self.optional(name)
        if raw is None:
            return None
        try:
            fields = {f for _, f, spec, conv in string.Formatter().parse(raw) if f is not None}
            bad_specs = [
                f
                for _, f, spec, conv in string.Formatter().parse(raw)
                if f is not None and (spec or conv)
            ]
        except ValueError as exc:
            self.problems.append(f"{name}: {exc}")
            return None
        unknown = fields - KEY_PREFIX_FIELDS
        if unknown or bad_specs or "" in fields:
            allowed = ", ".join(f"{{{f}}}" for f in sorted(KEY_PREFIX_FIELDS))
            self.problems.append(f"{name} may only use the placeholders {allowed}")
            return None
        return raw

    def namespace(self, name: str, default: str) -> str:
        """A CloudWatch namespace (`validate_namespace`)."""
        self._rule(name, default=default, pattern=NAMESPACE_RULE)
        value = self.optional(name) or default
        try:
            return validate_namespace(value)
        except ValueError as exc:
            self.problems.append(f"{name}: {exc}")
            return default

    def pattern(self, name: str, pattern: re.Pattern[str], what: str) -> str | None:
        self._rule(name, pattern=what)
        raw = self.optional(name)
        if raw is not None and not pattern.match(raw):
            self.problems.append(f"{name} must be {what}, got {raw[:80]!r}")
            return None
        return raw

    def existing_file(self, name: str) -> Path | None:
        raw = self.optional(name)
        if raw is None:
            return None
        path = Path(raw)
        if not path.is_file():
            self.problems.append(f"{name} points to {raw!r}, which is not a readable file")
        return path

    def directory(self, name: str, default: Path) -> Path:
        raw = self.optional(name)
        path = Path(raw) if raw else default
        if not path.is_dir():
            self.problems.append(f"{name} points to {str(path)!r}, which is not a directory")
        return path

    @overload
    def address(self, name: str) -> Address: ...

    @overload
    def address(self, name: str, *, required: Literal[False]) -> Address | None: ...

    def address(self, name: str, *, required: bool = True) -> Address | None:
        raw = self.required(name) if required else self.optional(name)
        self._rule(name, required=required)
        if not raw:
            return Address() if required else None
        if "\r" in raw or "\n" in raw:
            self.problems.append(f"{name} must be a single line")
            return Address()
        pairs = getaddresses([raw])
        if len(pairs) != 1:
            self.problems.append(f"{name} must be exactly one address")
            return Address()
        display, addr = pairs[0]
        # Imported here, not with the module: the metrics and the CLI read this module's
        # constants without ever parsing an address.
        from email_validator import EmailNotValidError, validate_email

        try:
            valid = validate_email(addr, check_deliverability=False, allow_smtputf8=False)
            username, domain = valid.ascii_email.rsplit("@", 1)  # type: ignore[union-attr]
            return Address(display_name=display, username=username, domain=domain)
        except (EmailNotValidError, ValueError, TypeError, AttributeError) as exc:
            self.problems.append(
                f"{name} must be an address such as 'Name <no-reply@example.com>': {exc}"
            )
            return Address()
