"""Settings from the environment: defaults, every problem reported at once, no secret leaks."""

from __future__ import annotations

from pathlib import Path

import pytest

from async_notifier.config import DEFAULT_TEMPLATES_DIR, ConfigError, Rule, Settings

MINIMAL = {
    "SMTP_SERVER": "smtp.example.com",
    "EMAIL_FROM": "no-reply@example.com",
    "ALLOWED_BUCKETS": "*",
}
PASSWORD = "pa55-w0rd-do-not-print"


def settings(**changes: str) -> Settings:
    return Settings.from_env({**MINIMAL, **changes})


def problems(env: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    return str(caught.value)


def test_defaults() -> None:
    s = Settings.from_env(MINIMAL)
    assert s.smtp_server == "smtp.example.com"
    assert s.email_from.addr_spec == "no-reply@example.com"
    assert s.aws_region == "us-east-1"
    assert s.aws_endpoint_url is None
    assert s.smtp_port == 587
    assert s.smtp_user is None
    assert s.smtp_password is None
    assert s.smtp_tls == "starttls"
    assert s.smtp_ca_file is None
    assert s.smtp_pool_size == 8
    assert s.smtp_max_messages_per_connection == 100
    assert s.max_concurrency == 32
    assert s.allowed_buckets == frozenset({"*"})
    assert s.default_locale == "pt-BR"
    assert s.templates_dir == DEFAULT_TEMPLATES_DIR
    assert s.templates_dir.is_dir()
    assert s.tmp_dir.is_dir()


def test_from_env_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMTP_SERVER", "mail.internal")
    monkeypatch.setenv("EMAIL_FROM", "x@example.org")
    monkeypatch.setenv("ALLOWED_BUCKETS", "videos-zip")
    monkeypatch.setenv("SMTP_POOL_SIZE", "3")
    s = Settings.from_env()
    assert (s.smtp_server, s.smtp_pool_size) == ("mail.internal", 3)


def test_explicit_values(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not parsed here")
    s = settings(
        AWS_REGION="sa-east-1",
        AWS_ENDPOINT_URL="http://127.0.0.1:4566",
        SMTP_PORT="2525",
        SMTP_USER="mailer",
        SMTP_PASSWORD=PASSWORD,
        SMTP_TLS="tls",
        SMTP_CA_FILE=str(ca),
        SMTP_POOL_SIZE="2",
        SMTP_MAX_MESSAGES_PER_CONNECTION="5",
        MAX_CONCURRENCY="64",
        TMP_DIR=str(tmp_path),
    )
    assert s.aws_region == "sa-east-1"
    assert s.aws_endpoint_url == "http://127.0.0.1:4566"
    assert s.smtp_port == 2525
    assert (s.smtp_user, s.smtp_password) == ("mailer", PASSWORD)
    assert s.smtp_tls == "tls"
    assert s.smtp_ca_file == ca
    assert s.smtp_pool_size == 2
    assert s.smtp_max_messages_per_connection == 5
    assert s.max_concurrency == 64
    assert s.tmp_dir == tmp_path


def test_every_problem_in_one_error() -> None:
    message = problems(
        {
            # SMTP_SERVER missing
            "EMAIL_FROM": "not an address",
            "SMTP_PORT": "smtp",
            "SMTP_TLS": "ssl",
            "SMTP_CA_FILE": "/nonexistent/ca.pem",
            "SMTP_POOL_SIZE": "0",
            "SMTP_MAX_MESSAGES_PER_CONNECTION": "many",
            "MAX_CONCURRENCY": "-4",
            "TMP_DIR": "/nonexistent/tmp",
        }
    )
    for name in (
        "SMTP_SERVER",
        "EMAIL_FROM",
        "SMTP_PORT",
        "SMTP_TLS",
        "SMTP_CA_FILE",
        "SMTP_POOL_SIZE",
        "SMTP_MAX_MESSAGES_PER_CONNECTION",
        "MAX_CONCURRENCY",
        "TMP_DIR",
    ):
        assert name in message, f"{name} missing from: {message}"
    # The offending values are quoted back, so the operator sees what to fix.
    assert "'smtp'" in message
    assert "'ssl'" in message


def test_empty_environment_names_both_required_settings() -> None:
    message = problems({})
    assert "SMTP_SERVER is required" in message
    assert "EMAIL_FROM is required" in message


def test_blank_values_count_as_missing() -> None:
    message = problems({"SMTP_SERVER": "   ", "EMAIL_FROM": ""})
    assert "SMTP_SERVER is required" in message
    assert "EMAIL_FROM is required" in message


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SMTP_PORT", "0"),
        ("SMTP_PORT", "65536"),
        ("SMTP_PORT", "25.5"),
        ("SMTP_POOL_SIZE", "-1"),
        ("SMTP_MAX_MESSAGES_PER_CONNECTION", "0"),
        ("MAX_CONCURRENCY", "0"),
        ("MAX_CONCURRENCY", "ten"),
        ("FLEET_SIZE", "0"),
        ("MAX_DELIVERY_AGE", "59"),
        ("MAX_DELIVERY_AGE", "1209601"),
        ("RETRY_BACKOFF_CAP_SECONDS", "43201"),
        ("RETRY_BACKOFF_BASE_SECONDS", "0"),
    ],
)
def test_out_of_range_integers(name: str, value: str) -> None:
    message = problems({**MINIMAL, name: value})
    assert name in message
    assert value in message


@pytest.mark.parametrize(
    ("raw", "mode"),
    [
        ("starttls", "starttls"),
        ("STARTTLS", "starttls"),
        ("tls", "tls"),
        ("none", "none"),
        ("", "starttls"),
    ],
)
def test_smtp_tls_choices(raw: str, mode: str) -> None:
    assert settings(SMTP_TLS=raw).smtp_tls == mode


@pytest.mark.parametrize("raw", ["ssl", "yes", "true", "starttls-optional"])
def test_smtp_tls_rejects_anything_else(raw: str) -> None:
    message = problems({**MINIMAL, "SMTP_TLS": raw})
    assert "SMTP_TLS must be one of starttls, tls, none" in message


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("videos-zip", {"videos-zip"}),
        ("videos-zip,other-zips", {"videos-zip", "other-zips"}),
        (" videos-zip , other-zips ,, ", {"videos-zip", "other-zips"}),
        ("my.videos-2", {"my.videos-2"}),
    ],
)
def test_allowed_buckets_parsing(raw: str, expected: set[str]) -> None:
    assert settings(ALLOWED_BUCKETS=raw).allowed_buckets == frozenset(expected)


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ("", "ALLOWED_BUCKETS is required"),
        (" , ", "ALLOWED_BUCKETS names no bucket"),
        ("videos,*", "list none beside it"),
        ("arn:aws:s3:::videos", "not S3 bucket names: 'arn:aws:s3:::videos'"),
        ("Videos_Zip,ok-bucket", "not S3 bucket names: 'Videos_Zip'"),
        ("ab", "not S3 bucket names: 'ab'"),
    ],
)
def test_allowed_buckets_refused(raw: str, problem: str) -> None:
    assert problem in problems({**MINIMAL, "ALLOWED_BUCKETS": raw})


def test_email_from_with_display_name() -> None:
    s = settings(EMAIL_FROM="Async Notifier <no-reply@example.com>")
    assert s.email_from.display_name == "Async Notifier"
    assert s.email_from.addr_spec == "no-reply@example.com"
    assert str(s.email_from) == "Async Notifier <no-reply@example.com>"
    assert s.sender_domain == "example.com"


def test_email_from_plain_address() -> None:
    s = settings(EMAIL_FROM="no-reply@notify.example.com")
    assert s.email_from.display_name == ""
    assert s.email_from.addr_spec == "no-reply@notify.example.com"
    assert s.sender_domain == "notify.example.com"


def test_email_from_non_ascii_display_name() -> None:
    s = settings(EMAIL_FROM="Notificações <no-reply@example.com>")
    assert s.email_from.display_name == "Notificações"


@pytest.mark.parametrize(
    "value",
    [
        "no-reply",
        "Notifier <no-reply>",
        "no-reply@",
        "no-reply@example.com\r\nBcc: attacker@evil.example",
        # A sender must be exactly one complete mailbox.
        "@example.com",
        "no-reply@example.com, attacker@evil.example",
    ],
)
def test_email_from_invalid(value: str) -> None:
    assert "EMAIL_FROM" in problems({**MINIMAL, "EMAIL_FROM": value})


def test_smtp_ca_file_must_exist(tmp_path: Path) -> None:
    message = problems({**MINIMAL, "SMTP_CA_FILE": str(tmp_path / "missing.pem")})
    assert "SMTP_CA_FILE" in message
    assert "missing.pem" in message


def test_password_without_user_is_a_problem() -> None:
    message = problems({**MINIMAL, "SMTP_PASSWORD": PASSWORD})
    assert "SMTP_PASSWORD is set but SMTP_USER is not" in message
    assert PASSWORD not in message


def test_login_over_plain_text_is_refused() -> None:
    message = problems(
        {**MINIMAL, "SMTP_USER": "mailer", "SMTP_PASSWORD": PASSWORD, "SMTP_TLS": "none"}
    )
    assert "SMTP_TLS=none" in message
    assert PASSWORD not in message


def test_repr_never_shows_the_password() -> None:
    s = settings(SMTP_USER="mailer", SMTP_PASSWORD=PASSWORD)
    assert s.smtp_password == PASSWORD
    assert PASSWORD not in repr(s)
    assert PASSWORD not in str(s)
    assert "mailer" in repr(s)  # the repr is still useful


def test_config_error_never_shows_the_password() -> None:
    message = problems({"SMTP_USER": "mailer", "SMTP_PASSWORD": PASSWORD, "SMTP_PORT": "x"})
    assert "SMTP_PORT" in message
    assert PASSWORD not in message


def test_implicit_tls_defaults_to_port_465_and_starttls_to_587() -> None:
    assert Settings.from_env({**MINIMAL, "SMTP_TLS": "tls"}).smtp_port == 465
    assert Settings.from_env({**MINIMAL, "SMTP_TLS": "starttls"}).smtp_port == 587
    assert Settings.from_env({**MINIMAL, "SMTP_TLS": "tls", "SMTP_PORT": "2465"}).smtp_port == 2465


@pytest.mark.parametrize(
    ("server", "raw", "expected"),
    [
        ("smtp.example.com", "", None),  # another relay: no pacing unless asked
        ("email-smtp.eu-west-1.amazonaws.com", "", "auto"),  # SES: its quota, by default
        ("email-smtp.eu-west-1.amazonaws.com", "none", None),
        ("smtp.example.com", "auto", "auto"),
        ("smtp.example.com", "AUTO", "auto"),
        ("smtp.example.com", "12.5", 12.5),
    ],
)
def test_smtp_rate_limit(server: str, raw: str, expected: object) -> None:
    assert settings(SMTP_SERVER=server, SMTP_RATE_LIMIT=raw).smtp_rate_limit == expected


def test_delivery_horizon_and_fleet_defaults() -> None:
    s = settings()
    assert s.max_delivery_age == 24 * 3600
    assert (s.retry_backoff_base, s.retry_backoff_cap) == (30, 300)
    assert s.fleet_size == 1
    assert s.quota_region is None
    assert settings(SMTP_SERVER="email-smtp.sa-east-1.amazonaws.com").quota_region == "sa-east-1"


def test_transport_and_its_fallback() -> None:
    assert (settings().transport, settings().fallback_transport) == ("smtp", None)
    ses = Settings.from_env(
        {"EMAIL_FROM": "a@example.com", "ALLOWED_BUCKETS": "*", "TRANSPORT": "ses"}
    )
    assert ses.transport == "ses"
    assert ses.smtp_server == ""  # not needed by the SES API
    assert ses.smtp_rate_limit == "auto"  # the SES account's rate, read with GetSendQuota
    assert ses.quota_region == "us-east-1"
    both = settings(FALLBACK_TRANSPORT="ses", SES_REGION="eu-west-1")
    assert (both.transport, both.fallback_transport, both.quota_region) == (
        "smtp",
        "ses",
        "eu-west-1",
    )


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"TRANSPORT": "ses", "FALLBACK_TRANSPORT": "smtp"}, "SMTP_SERVER is required"),
        ({"FALLBACK_TRANSPORT": "smtp"}, "FALLBACK_TRANSPORT must differ from TRANSPORT"),
        ({"TRANSPORT": "http"}, "TRANSPORT must be one of smtp, ses"),
        ({"FALLBACK_TRANSPORT": "sms"}, "FALLBACK_TRANSPORT must be one of none, smtp, ses"),
    ],
)
def test_transport_problems(env: dict[str, str], problem: str) -> None:
    base = {"EMAIL_FROM": "a@example.com", "ALLOWED_BUCKETS": "*"}
    if "SMTP_SERVER is required" not in problem:
        base["SMTP_SERVER"] = "smtp.example.com"
    message = problems({**base, **env})
    assert problem in message
    assert message.count("FALLBACK_TRANSPORT") <= 1  # one problem, said once


@pytest.mark.parametrize(
    ("log_level", "lambda_level", "expected"),
    [
        (None, None, "INFO"),
        ("warning", None, "WARNING"),
        # Lambda's application log level (LoggingConfig) wins over LOG_LEVEL, either way.
        ("DEBUG", "WARN", "WARNING"),
        ("ERROR", "INFO", "INFO"),
        (None, "TRACE", "DEBUG"),
        (None, "fatal", "CRITICAL"),
    ],
)
def test_log_level_is_lambdas_application_level_when_set(
    log_level: str | None, lambda_level: str | None, expected: str
) -> None:
    env = {"LOG_LEVEL": log_level, "AWS_LAMBDA_LOG_LEVEL": lambda_level}
    assert settings(**{k: v for k, v in env.items() if v is not None}).log_level == expected


def test_an_unknown_lambda_log_level_is_a_problem() -> None:
    assert "AWS_LAMBDA_LOG_LEVEL must be one of TRACE, DEBUG, INFO, WARN, ERROR, FATAL" in (
        problems({**MINIMAL, "AWS_LAMBDA_LOG_LEVEL": "WARNING"})
    )


# --------------------------------------------------------------------------- the recorded rules
# `Settings.rules()` is what the README's table is checked against (tests/test_docs.py); these
# tests hold the rules to what `from_env` really does, so neither can drift from the other.

RULES = Settings.rules()


def _text(value: float | str | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _below(low: float) -> float:
    return low - 1 if float(low).is_integer() else low / 2


def test_the_rules_name_every_variable_with_their_readers_bounds() -> None:
    assert len(RULES) >= 50
    assert RULES["RETRY_ATTEMPTS"] == Rule(default=3, low=1, high=20)
    assert RULES["SMTP_TIMEOUT"] == Rule(default=30.0, low=0.1)
    assert RULES["FALLBACK_TRANSPORT"] == Rule(default="none", choices=("none", "smtp", "ses"))
    assert RULES["SMTP_RATE_LIMIT"] == Rule(low=0.001, choices=("auto", "none"))
    assert RULES["EMAIL_FROM"].required
    assert RULES["ALLOWED_BUCKETS"].required
    assert RULES["SMTP_PASSWORD"] == Rule()


@pytest.mark.parametrize("name", sorted(n for n, r in RULES.items() if r.default is not None))
def test_a_rules_default_is_the_value_applied_when_unset(name: str) -> None:
    default = RULES[name].default
    assert default is not None
    assert settings(**{name: _text(default)}) == Settings.from_env(MINIMAL)


@pytest.mark.parametrize("name", sorted(n for n, r in RULES.items() if r.low is not None))
def test_a_rules_bounds_are_the_ones_refused_past(name: str) -> None:
    rule = RULES[name]
    assert rule.low is not None
    settings(**{name: _text(rule.low)})
    assert f"{name} must be" in problems({**MINIMAL, name: _text(_below(rule.low))})
    if rule.high is not None:
        settings(**{name: _text(rule.high)})
        assert f"{name} must be" in problems({**MINIMAL, name: _text(rule.high + 1)})


@pytest.mark.parametrize("name", sorted(n for n, r in RULES.items() if r.choices))
def test_a_rules_choices_are_the_ones_accepted(name: str) -> None:
    for choice in RULES[name].choices:
        if name == "FALLBACK_TRANSPORT" and choice == "smtp":
            settings(**{name: choice, "TRANSPORT": "ses"})
        else:
            settings(**{name: choice})
    assert name in problems({**MINIMAL, name: "bogus"})


@pytest.mark.parametrize("name", sorted(n for n, r in RULES.items() if r.required))
def test_a_required_rule_is_required(name: str) -> None:
    env = {**MINIMAL}
    del env[name]
    assert name in problems(env)


@pytest.mark.parametrize(
    ("name", "good", "bad"),
    [
        ("COGNITO_USER_POOL_ID", "us-east-1_AbCdEf123", "not a pool"),
        ("METRICS_NAMESPACE", "VideoTools/Notifier", "AWS/Lambda"),
        ("SES_CONFIGURATION_SET", "notifier-events", "no spaces"),
    ],
)
def test_a_rules_pattern_is_enforced(name: str, good: str, bad: str) -> None:
    assert RULES[name].pattern
    settings(**{name: good})
    assert RULES[name].pattern in problems({**MINIMAL, name: bad})


def test_delivery_status_is_off_unless_named() -> None:
    s = settings()
    assert (s.status_table, s.status_topic_arn) == (None, None)
    assert s.status_ttl == 90 * 24 * 3600
    on = settings(
        STATUS_TABLE="notifier-status",
        STATUS_TTL_SECONDS="3600",
        STATUS_TOPIC_ARN="arn:aws:sns:sa-east-1:123456789012:notification-status",
    )
    assert (on.status_table, on.status_ttl) == ("notifier-status", 3600)
    assert on.status_topic_arn == "arn:aws:sns:sa-east-1:123456789012:notification-status"
    # The SES events function reads them too: it records what SES reports.
    events = Settings.from_env(
        {"SUPPRESSION_TABLE": "suppression", "STATUS_TABLE": "notifier-status"}, sending=False
    )
    assert events.status_table == "notifier-status"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("STATUS_TTL_SECONDS", "3599"),
        ("STATUS_TOPIC_ARN", "notification-status"),
        ("STATUS_TOPIC_ARN", "arn:aws:sqs:us-east-1:123456789012:queue"),
        ("STATUS_TOPIC_ARN", "arn:aws:sns:us-east-1:123456789012:events.fifo"),
    ],
)
def test_delivery_status_settings_refused(name: str, value: str) -> None:
    message = problems({**MINIMAL, name: value})
    assert name in message
    assert value in message
