"""template.yaml: cfn-lint clean, translatable by SAM, and wired the way the worker needs.

The template is read with cfn-lint's own YAML loader (short tags such as !Ref and !If become
their long forms), its Globals merged into the functions by SAM's own Globals plugin, and
evaluated for chosen parameter values by a small interpreter of the intrinsic functions it
uses, so the IAM assertions look at the statements a stack would get, conditions resolved,
rather than at the template's text.
"""

from __future__ import annotations

import ast
import copy
import json
import os
import re
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from cfnlint.api import lint
from cfnlint.decode import decode_str
from samtranslator.parser.parser import Parser
from samtranslator.plugins.globals.globals_plugin import GlobalsPlugin
from samtranslator.translator.translator import Translator
from servers import CapturedLogs, FakeLambdaContext, MotoServer, failed_ids, sqs_event, sqs_record

import handler
from async_notifier.batch.disposition import BACKOFF_BASE
from async_notifier.batch.outcome import BatchResult, DeadLetter, Outcome, Retry, StatusCounts
from async_notifier.batch.report import metrics_from_batch
from async_notifier.canary import CanaryRequest
from async_notifier.config import ConfigError, Settings
from async_notifier.errors import (
    AccountPaused,
    CircuitOpen,
    DailyQuotaExceeded,
    Expired,
    LoginRefused,
    ProviderCondition,
    ProviderMisconfigured,
    RecipientSuppressed,
    SenderRejected,
    SmtpUnavailable,
)
from async_notifier.metrics import InvocationMetrics
from async_notifier.ports import PoolStats, Receipt

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE_PATH = ROOT / "template.yaml"
ACCOUNT = "123456789012"
REGION = "us-east-1"
PSEUDO = {
    "AWS::AccountId": ACCOUNT,
    "AWS::Region": REGION,
    "AWS::Partition": "aws",
    "AWS::URLSuffix": "amazonaws.com",
    "AWS::StackName": "notifier",
}
REQUIRED = {
    "SmtpServer": "email-smtp.us-east-1.amazonaws.com",
    "EmailFrom": "Videos <no-reply@example.com>",
    "AllowedBuckets": "videos-zip",
}
SECRET_ARN = f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:smtp-AbCdEf"
POOL_ID = f"{REGION}_AbCdEf123"
KMS_KEY = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
# The verified SES identity EmailFrom sends as, for stacks with the SES API transport.
SES_IDENTITY = "example.com"
# Worker settings the template leaves unset on purpose (see the comment at its top), and
# AWS_LAMBDA_LOG_LEVEL: Lambda sets it from LoggingConfig's ApplicationLogLevel.
DELIBERATELY_UNSET = {
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_LAMBDA_LOG_LEVEL",
    "SMTP_PASSWORD",
    "TEMPLATES_DIR",
    "TMP_DIR",
}
# Settings the worker is getting with fleet-wide pacing and retry by age (another branch):
# the template carries them before config.py reads them.
# And those it is getting with the SES API transport and failover (TRANSPORT_VARIABLES).
TRANSPORT_VARIABLES = {"TRANSPORT", "FALLBACK_TRANSPORT", "SES_REGION", "SES_MAX_INFLIGHT_BYTES"}
ANNOUNCED_VARIABLES = {
    "MAX_DELIVERY_AGE",
    "RETRY_BACKOFF_BASE_SECONDS",
    "RETRY_BACKOFF_CAP_SECONDS",
    "FLEET_SIZE",
    *TRANSPORT_VARIABLES,
}
# Settings being added alongside the template; it must carry them from the start.
EXPECTED_VARIABLES = {
    "SMTP_PASSWORD_SECRET_ID",
    "METRICS_NAMESPACE",
    "COGNITO_USER_POOL_ID",
    "DEAD_LETTER_QUEUE_URL",
    "IDEMPOTENCY_TABLE",
    "MAX_TMP_BYTES",
    *ANNOUNCED_VARIABLES,
}
_NO_VALUE = object()


def _load() -> dict[str, Any]:
    template, matches = decode_str(TEMPLATE_PATH.read_text())
    assert not matches, matches
    # Plain dicts, lists and strs (cfn-lint's nodes carry line marks).
    loaded: dict[str, Any] = json.loads(json.dumps(template))
    return loaded


def _with_globals(template: dict[str, Any]) -> dict[str, Any]:
    """The template with its Globals merged into each function, as SAM does first."""
    merged = copy.deepcopy(template)
    GlobalsPlugin().on_before_transform_template(merged)
    return merged


# As written (with its Globals section), and as SAM sees each function (Globals merged).
WRITTEN = _load()
TEMPLATE = _with_globals(WRITTEN)
RESOURCES: dict[str, Any] = TEMPLATE["Resources"]
PARAMETERS: dict[str, Any] = TEMPLATE["Parameters"]


# --------------------------------------------------------------------------- evaluation


class Stack:
    """The template (or SAM's translation of it, given first) with its parameters and
    conditions resolved; resources stay symbolic."""

    def __init__(self, template: dict[str, Any] | None = None, /, **overrides: str) -> None:
        self.template = TEMPLATE if template is None else template
        parameters: dict[str, Any] = self.template["Parameters"]
        self.params: dict[str, str] = {
            name: str(spec["Default"]) for name, spec in parameters.items() if "Default" in spec
        }
        self.params.update(REQUIRED)
        self.params.update(overrides)
        missing = set(parameters) - set(self.params)
        assert not missing, f"no value for {missing}"
        self.conditions: dict[str, bool] = {}
        for name, expression in self.template.get("Conditions", {}).items():
            self.conditions[name] = bool(self.eval(expression))

    def ref(self, name: str) -> str:
        if name in self.params:
            return self.params[name]
        if name in PSEUDO:
            return PSEUDO[name]
        if "." in name:  # ${Resource.Attribute} in a Sub
            resource, attribute = name.split(".", 1)
            assert resource in self.template["Resources"], f"GetAtt of unknown {resource}"
            return f"<GetAtt {resource}.{attribute}>"
        assert name in self.template["Resources"], f"Ref to unknown {name}"
        return f"<Ref {name}>"

    def eval(self, node: Any) -> Any:
        if isinstance(node, list):
            items = [self.eval(item) for item in node]
            return [item for item in items if item is not _NO_VALUE]
        if not isinstance(node, dict):
            return node
        if len(node) == 1:
            ((key, arg),) = node.items()
            if key == "Ref":
                return _NO_VALUE if arg == "AWS::NoValue" else self.ref(arg)
            if key == "Fn::GetAtt":
                resource, attribute = arg if isinstance(arg, list) else arg.split(".", 1)
                assert resource in self.template["Resources"], f"GetAtt of unknown {resource}"
                return f"<GetAtt {resource}.{attribute}>"
            if key == "Fn::Sub":
                text, variables = (arg, {}) if isinstance(arg, str) else arg
                values = {name: self.eval(value) for name, value in variables.items()}

                def substitute(match: re.Match[str]) -> str:
                    name = match.group(1)
                    return str(values[name] if name in values else self.ref(name))

                return re.sub(r"\$\{([^}!]+)\}", substitute, text)
            if key == "Fn::Join":
                return arg[0].join(self.eval(arg[1]))
            if key == "Fn::Split":
                return self.eval(arg[1]).split(arg[0])
            if key == "Fn::Select":
                return self.eval(arg[1])[int(self.eval(arg[0]))]
            if key == "Fn::FindInMap":
                name, top, second = (self.eval(part) for part in arg)
                return self.template["Mappings"][name][top][second]
            if key == "Fn::If":
                return self.eval(arg[1] if self.conditions[arg[0]] else arg[2])
            if key == "Fn::Equals":
                return str(self.eval(arg[0])) == str(self.eval(arg[1]))
            if key == "Fn::Not":
                return not self.eval(arg[0])
            if key == "Fn::And":
                return all(self.eval(item) for item in arg)
            if key == "Fn::Or":
                return any(self.eval(item) for item in arg)
            if key == "Fn::Contains":
                return self.eval(arg[1]) in self.eval(arg[0])
            if key == "Condition":
                return self.conditions[arg]
            assert not key.startswith("Fn::"), f"evaluator lacks {key}"
        result = {key: self.eval(value) for key, value in node.items()}
        return {key: value for key, value in result.items() if value is not _NO_VALUE}

    def broken_rules(self) -> set[str]:
        """The Rules whose assertions fail for these parameters: CloudFormation refuses
        such a stack before it creates anything."""
        broken = set()
        for name, rule in self.template.get("Rules", {}).items():
            if "RuleCondition" in rule and not self.eval(rule["RuleCondition"]):
                continue
            if not all(self.eval(assertion["Assert"]) for assertion in rule["Assertions"]):
                broken.add(name)
        return broken

    def resources(self) -> dict[str, Any]:
        return {
            name: self.eval(resource)
            for name, resource in self.template["Resources"].items()
            if "Condition" not in resource or self.conditions[resource["Condition"]]
        }

    def statements(self, role: str = "NotifierRole") -> list[dict[str, Any]]:
        properties = self.resources()[role]["Properties"]
        assert "ManagedPolicyArns" not in properties
        return [
            statement
            for policy in properties["Policies"]
            for statement in policy["PolicyDocument"]["Statement"]
        ]

    def grants(self, role: str = "NotifierRole") -> dict[str, set[str]]:
        """Action -> the resources it is allowed on."""
        grants: dict[str, set[str]] = {}
        for statement in self.statements(role):
            assert statement["Effect"] == "Allow"
            assert "NotAction" not in statement
            assert "NotResource" not in statement
            actions = statement["Action"]
            resources = statement["Resource"]
            for action in [actions] if isinstance(actions, str) else actions:
                for resource in [resources] if isinstance(resources, str) else resources:
                    grants.setdefault(action, set()).add(resource)
        return grants

    def environment(self, function: str = "NotifierFunction") -> dict[str, str]:
        properties = self.resources()[function]["Properties"]
        variables: dict[str, str] = properties["Environment"]["Variables"]
        return variables


def _function(name: str = "NotifierFunction") -> dict[str, Any]:
    return RESOURCES[name]["Properties"]  # type: ignore[no-any-return]


def _event() -> dict[str, Any]:
    (event,) = _function()["Events"].values()
    assert event["Type"] == "SQS"
    return event["Properties"]  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- linting


def test_cfn_lint_reports_nothing() -> None:
    matches = lint(TEMPLATE_PATH.read_text())
    assert [str(match) for match in matches] == []


def _translate(**overrides: str) -> dict[str, Any]:
    """The CloudFormation that SAM makes of the template (what `sam deploy` submits)."""
    template = json.loads(json.dumps(WRITTEN))
    # sam deploy uploads the built code and puts its S3 location here (one code location,
    # in Globals, for both functions).
    template["Globals"]["Function"]["CodeUri"] = (
        "s3://deployment-artifacts/async-notifier/deployment-package.zip"
    )
    translator = Translator({}, Parser(), boto_session=boto3.Session(region_name=REGION))
    translated: dict[str, Any] = translator.translate(
        template, parameter_values={**REQUIRED, **overrides}, get_managed_policy_map=dict
    )
    return translated


def test_sam_translation_is_lint_clean_and_adds_no_broad_policy() -> None:
    translated = _translate()
    resources = translated["Resources"]
    types = {name: resource["Type"] for name, resource in resources.items()}
    assert sorted(types.values()) == sorted(
        [
            "AWS::SQS::Queue",
            "AWS::SQS::Queue",
            "AWS::DynamoDB::Table",
            "AWS::Logs::LogGroup",
            "AWS::IAM::Role",
            "AWS::Lambda::Function",
            "AWS::Lambda::Version",
            "AWS::Lambda::Alias",
            "AWS::Lambda::EventSourceMapping",
            # Bounces and complaints (EnableSuppression, conditions kept by SAM).
            "AWS::DynamoDB::Table",
            "AWS::SES::ConfigurationSet",
            "AWS::SES::ConfigurationSetEventDestination",
            "AWS::SNS::Topic",
            "AWS::SNS::TopicPolicy",
            "AWS::SNS::Subscription",
            "AWS::SQS::Queue",
            "AWS::SQS::Queue",
            "AWS::SQS::QueuePolicy",
            "AWS::Logs::LogGroup",
            "AWS::IAM::Role",
            "AWS::Lambda::Function",
            "AWS::Lambda::EventSourceMapping",
            # Delivery status (EnableDeliveryStatus), and its sample subscriber queue
            # (EnableStatusSubscriberQueue).
            "AWS::DynamoDB::Table",
            "AWS::SNS::Topic",
            "AWS::SQS::Queue",
            "AWS::SQS::QueuePolicy",
            "AWS::SNS::Subscription",
            # The scheduled canary (CanarySchedule): its function, schedule and alarms.
            "AWS::Logs::LogGroup",
            "AWS::IAM::Role",
            "AWS::Lambda::Function",
            "AWS::Lambda::EventInvokeConfig",
            "AWS::Events::Rule",
            "AWS::Lambda::Permission",
            *["AWS::CloudWatch::Alarm"] * 2,
            # Operations.
            *["AWS::CloudWatch::Alarm"] * 17,
            "AWS::CloudWatch::Dashboard",
        ]
    )
    # Our own roles: SAM attached no AWSLambdaSQSQueueExecutionRole (Resource "*") to them.
    assert "ManagedPolicyArns" not in resources["NotifierRole"]["Properties"]
    assert "ManagedPolicyArns" not in resources["SesEventsRole"]["Properties"]
    mappings = [
        resource["Properties"]
        for resource in resources.values()
        if resource["Type"] == "AWS::Lambda::EventSourceMapping"
    ]
    # The queue invokes the published version behind the alias (what SnapStart snapshots).
    (alias,) = (n for n, r in resources.items() if r["Type"] == "AWS::Lambda::Alias")
    (properties,) = (m for m in mappings if m["FunctionName"] == {"Ref": alias})
    assert properties["EventSourceArn"] == {"Fn::GetAtt": ["NotificationQueue", "Arn"]}
    assert properties["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert properties["ScalingConfig"] == {"MaximumConcurrency": {"Ref": "MaximumConcurrency"}}
    (ses_events,) = (m for m in mappings if m is not properties)
    assert ses_events["FunctionName"] == {"Ref": "SesEventsFunction"}
    assert ses_events["EventSourceArn"] == {"Fn::GetAtt": ["SesEventsQueue", "Arn"]}
    assert ses_events["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    matches = lint(json.dumps(translated))
    assert [str(match) for match in matches] == []


def test_a_stack_without_ses_translates_lint_clean_and_has_no_ses_part() -> None:
    translated = _translate(EnableSuppression="false")
    assert [str(match) for match in lint(json.dumps(translated))] == []
    resources = Stack(translated, EnableSuppression="false").resources()
    types = {resource["Type"] for resource in resources.values()}
    assert not {t for t in types if t.startswith("AWS::SES::")}
    # The one topic left is the delivery status's (the worker's own verdicts).
    assert [n for n, r in resources.items() if r["Type"].startswith("AWS::SNS::")] == [
        "StatusTopic"
    ]
    assert not [name for name in resources if name.startswith(("Ses", "Suppression"))]
    assert Counter(r["Type"] for r in resources.values())["AWS::Lambda::Function"] == 1


# --------------------------------------------------------------------------- function


def test_function_runs_the_packaged_handler_on_python_313() -> None:
    function = _function()
    assert RESOURCES["NotifierFunction"]["Type"] == "AWS::Serverless::Function"
    assert function["Handler"] == "handler.lambda_handler"
    assert function["Runtime"] == "python3.13"
    assert function["CodeUri"] == "."
    assert function["Architectures"] == [{"Ref": "Architecture"}]
    assert function["Role"] == {"Fn::GetAtt": ["NotifierRole", "Arn"]}
    assert "Policies" not in function
    assert "lambda_handler" in {
        node.name
        for node in ast.parse((ROOT / "handler.py").read_text()).body
        if isinstance(node, ast.FunctionDef)
    }


def test_architecture_default_matches_the_package_default() -> None:
    script = (ROOT / "scripts" / "package.py").read_text()
    default = re.search(r'^DEFAULT_ARCH = "(\w+)"', script, re.MULTILINE)
    assert default is not None
    assert PARAMETERS["Architecture"]["Default"] == default.group(1) == "arm64"
    assert sorted(PARAMETERS["Architecture"]["AllowedValues"]) == ["arm64", "x86_64"]


def test_sizes_are_parameters_with_sensible_defaults() -> None:
    function = _function()
    assert function["MemorySize"] == {"Ref": "MemorySize"}
    assert function["Timeout"] == {"Ref": "FunctionTimeout"}
    assert function["EphemeralStorage"] == {"Size": {"Ref": "EphemeralStorage"}}
    assert PARAMETERS["MemorySize"]["Default"] == 1024
    assert int(PARAMETERS["FunctionTimeout"]["Default"]) == 300
    assert int(PARAMETERS["EphemeralStorage"]["Default"]) == 1024
    assert max(map(int, PARAMETERS["FunctionTimeout"]["AllowedValues"])) <= 900
    assert min(map(int, PARAMETERS["EphemeralStorage"]["AllowedValues"])) == 512
    assert max(map(int, PARAMETERS["EphemeralStorage"]["AllowedValues"])) == 10240


# --------------------------------------------------------------------------- build, logs, tracing

SERVERLESS_FUNCTIONS = sorted(
    name for name, r in RESOURCES.items() if r["Type"] == "AWS::Serverless::Function"
)
# Lambda's application log levels, least to most severe.
LAMBDA_LEVELS = ["TRACE", "DEBUG", "INFO", "WARN", "ERROR", "FATAL"]


def test_globals_hold_what_the_functions_share() -> None:
    assert SERVERLESS_FUNCTIONS == ["CanaryFunction", "NotifierFunction", "SesEventsFunction"]
    shared = WRITTEN["Globals"]["Function"]
    assert shared["CodeUri"] == "."
    assert shared["Runtime"] == "python3.13"
    assert shared["Architectures"] == [{"Ref": "Architecture"}]
    assert shared["Tracing"] == {"Ref": "Tracing"}
    for name in SERVERLESS_FUNCTIONS:
        written = WRITTEN["Resources"][name]["Properties"]
        # Said once: a function repeating a shared value would let the two drift apart.
        assert not set(written) & set(shared) - {"Environment", "LoggingConfig"}, name
        # Bar the canary's status settings: it exists only with the table (UseCanary), so it
        # names the table outright and publishes nothing.
        overridden = {"CanaryFunction": {"STATUS_TABLE", "STATUS_TOPIC_ARN"}}.get(name, set())
        assert (
            set(written["Environment"]["Variables"]) & set(shared["Environment"]["Variables"])
            == overridden
        ), name
        assert not set(written["LoggingConfig"]) & set(shared["LoggingConfig"]), name
        # SAM's merge gives each function both its own and the shared values.
        merged = _function(name)
        assert merged["LoggingConfig"]["LogGroup"] == written["LoggingConfig"]["LogGroup"]
        assert merged["LoggingConfig"]["LogFormat"] == "JSON"
        assert merged["Environment"]["Variables"]["LOG_LEVEL"] == {"Ref": "LogLevel"}


def test_sam_builds_each_function_with_the_makefile() -> None:
    """`sam build` runs `make build-<LogicalId>` in CodeUri: the Makefile has the target, and
    it runs make package's build (scripts/package.py) through scripts/sam_build.py."""
    env = {"PATH": os.environ["PATH"], "ARTIFACTS_DIR": "/tmp/artifacts"}
    for name in SERVERLESS_FUNCTIONS:
        assert RESOURCES[name]["Metadata"] == {"BuildMethod": "makefile"}, name
        completed = subprocess.run(
            ["make", "-n", f"build-{name}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env=env,
            check=True,
            timeout=60,
        )
        (command,) = (line for line in completed.stdout.splitlines() if "sam_build.py" in line)
        # Nothing but the function: the architecture and Python are SAM's (build.toml).
        assert command.split()[1:] == ["scripts/sam_build.py", name], command
    sam_build = (ROOT / "scripts" / "sam_build.py").read_text()
    assert "package.main(" in sam_build
    assert '"--output-dir"' in sam_build


@pytest.mark.parametrize("level", PARAMETERS["LogLevel"]["AllowedValues"])
@pytest.mark.parametrize("function", ["NotifierFunction", "SesEventsFunction"])
def test_lambda_logs_json_at_the_log_level_but_never_drops_the_metrics(
    level: str, function: str, tmp_path: Path
) -> None:
    """LoggingConfig: JSON, Lambda's application level is LogLevel in Lambda's names. Lambda
    hands it to the worker as AWS_LAMBDA_LOG_LEVEL, which wins over LOG_LEVEL: the worker must
    then run at LogLevel itself, and its metric lines carry that level (INFO at least), so
    Lambda's filter keeps them (tests/test_lambda_logs.py)."""
    stack = Stack(LogLevel=level)
    config = stack.resources()[function]["Properties"]["LoggingConfig"]
    assert config["LogFormat"] == "JSON"
    application = config["ApplicationLogLevel"]
    assert application in LAMBDA_LEVELS
    assert application == {"DEBUG": "DEBUG", "INFO": "INFO", "WARNING": "WARN"}.get(level, level)
    assert config["SystemLogLevel"] == stack.params["SystemLogLevel"] == "INFO"
    log_group = {"NotifierFunction": "NotifierLogGroup", "SesEventsFunction": "SesEventsLogGroup"}
    assert config["LogGroup"] == f"<Ref {log_group[function]}>"
    # LOG_LEVEL stays a level the worker reads, and with the level Lambda sets from
    # LoggingConfig the worker runs at the same one.
    env = _resolved(stack.environment(function), tmp_path)
    assert env["LOG_LEVEL"] == level
    sending = function == "NotifierFunction"
    assert Settings.from_env(env, sending=sending).log_level == level
    in_lambda = {**env, "AWS_LAMBDA_LOG_LEVEL": application}
    assert Settings.from_env(in_lambda, sending=sending).log_level == level
    assert set(TEMPLATE["Mappings"]["LogLevelToLambda"]) == set(
        PARAMETERS["LogLevel"]["AllowedValues"]
    )


def test_system_log_level_and_tracing_are_parameters() -> None:
    assert PARAMETERS["SystemLogLevel"]["Default"] == "INFO"
    assert PARAMETERS["SystemLogLevel"]["AllowedValues"] == ["DEBUG", "INFO", "WARN"]
    assert PARAMETERS["Tracing"]["Default"] == "PassThrough"
    assert sorted(PARAMETERS["Tracing"]["AllowedValues"]) == ["Active", "PassThrough"]
    for tracing in ("Active", "PassThrough"):
        # With a schedule, so that the canary exists too.
        with_canary = {"Tracing": tracing, "CanarySchedule": "rate(1 hour)"}
        translated = _translate(**with_canary)
        functions = Stack(translated, **with_canary).resources()
        for name in SERVERLESS_FUNCTIONS:
            properties = functions[name]["Properties"]
            assert properties["TracingConfig"] == {"Mode": tracing}, name
            assert properties["LoggingConfig"]["LogFormat"] == "JSON", name


XRAY = {"xray:PutTraceSegments", "xray:PutTelemetryRecords"}


@pytest.mark.parametrize("role", ["NotifierRole", "SesEventsRole", "CanaryRole"])
def test_active_tracing_lets_each_role_write_traces(role: str) -> None:
    """SAM adds X-Ray's policy only to the roles it makes; ours are written out."""
    schedule = {"CanarySchedule": "rate(1 hour)"}
    active = Stack(Tracing="Active", **schedule)
    grants = active.grants(role)
    assert {action: grants[action] for action in XRAY} == {action: {"*"} for action in XRAY}
    _assert_scoped(grants)
    assert not XRAY & set(Stack(**schedule).grants(role))
    (statement,) = (s for s in active.statements(role) if s["Sid"] == "Tracing")
    assert "Condition" not in statement


# --------------------------------------------------------------------------- queue


def test_event_source_mapping_reports_partial_failures() -> None:
    event = _event()
    assert event["Queue"] == {"Fn::GetAtt": ["NotificationQueue", "Arn"]}
    assert event["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert event["BatchSize"] == {"Ref": "BatchSize"}
    assert PARAMETERS["BatchSize"]["Default"] == 1000
    assert PARAMETERS["BatchSize"]["MaxValue"] == 10000
    assert event["MaximumBatchingWindowInSeconds"] == {"Ref": "MaximumBatchingWindowInSeconds"}
    # Lambda refuses a batch over 10 records without a batching window of at least 1 s.
    assert PARAMETERS["MaximumBatchingWindowInSeconds"]["Default"] >= 1
    rule = TEMPLATE["Rules"]["BatchWindowForLargeBatches"]
    assert rule["Assertions"][0]["Assert"] == {
        "Fn::Not": [{"Fn::Equals": [{"Ref": "MaximumBatchingWindowInSeconds"}, "0"]}]
    }
    assert event["ScalingConfig"] == {"MaximumConcurrency": {"Ref": "MaximumConcurrency"}}
    assert PARAMETERS["MaximumConcurrency"]["MinValue"] == 2


def test_dead_letter_queue_is_a_safety_net_after_1000_receives_and_keeps_them_14_days() -> None:
    stack = Stack()
    resources = stack.resources()
    queue = resources["NotificationQueue"]["Properties"]
    assert queue["RedrivePolicy"] == {
        "deadLetterTargetArn": "<GetAtt DeadLetterQueue.Arn>",
        "maxReceiveCount": "1000",
    }
    assert resources["DeadLetterQueue"]["Properties"]["MessageRetentionPeriod"] == 1209600
    assert stack.environment()["DEAD_LETTER_QUEUE_URL"] == "<Ref DeadLetterQueue>"


@pytest.mark.parametrize(
    "timeout", [int(v) for v in PARAMETERS["FunctionTimeout"]["AllowedValues"]]
)
def test_visibility_timeout_is_at_least_six_function_timeouts(timeout: int) -> None:
    stack = Stack(FunctionTimeout=str(timeout))
    visibility = stack.resources()["NotificationQueue"]["Properties"]["VisibilityTimeout"]
    longest_window = PARAMETERS["MaximumBatchingWindowInSeconds"]["MaxValue"]
    assert visibility >= 6 * timeout + longest_window
    assert visibility <= 43200  # SQS's maximum


def test_visibility_mapping_covers_exactly_the_allowed_timeouts() -> None:
    allowed = {str(value) for value in PARAMETERS["FunctionTimeout"]["AllowedValues"]}
    assert set(TEMPLATE["Mappings"]["TimeoutToVisibility"]) == allowed


def test_retry_horizon_parameters_and_their_bounds() -> None:
    age, cap = PARAMETERS["MaxDeliveryAgeSeconds"], PARAMETERS["RetryBackoffCapSeconds"]
    assert (age["Default"], age["MinValue"], age["MaxValue"]) == (86400, 300, 259200)
    assert (cap["Default"], cap["MinValue"], cap["MaxValue"]) == (300, 1, 43200)  # SQS: 12 h
    receives = PARAMETERS["MaxReceiveCount"]
    assert (receives["Default"], receives["MaxValue"]) == (1000, 1000)  # SQS's maximum
    # A safety net: a record retried until it expires is received at most about
    # age / (cap / 2) + 10 times (jitter puts each capped delay between cap/2 and cap).
    assert age["Default"] / (cap["Default"] / 2) + 10 <= receives["Default"]
    for name in ("MaxDeliveryAgeSeconds", "RetryBackoffCapSeconds"):
        assert name in receives["Description"], name
    groups = TEMPLATE["Metadata"]["AWS::CloudFormation::Interface"]["ParameterGroups"]
    grouped = [name for group in groups for name in group["Parameters"]]
    assert sorted(grouped) == sorted(PARAMETERS)


@pytest.mark.parametrize("queue", ["NotificationQueue", "SesEventsQueue"])
def test_a_queue_keeps_a_record_past_its_retry_horizon(queue: str) -> None:
    """A record failing until MAX_DELIVERY_AGE must still be in the queue to be received
    once more and dead-lettered as expired, not deleted by SQS's retention unseen: the
    longest age, plus the longest back-off, plus the longest visibility timeout."""
    horizon = (
        PARAMETERS["MaxDeliveryAgeSeconds"]["MaxValue"]
        + PARAMETERS["RetryBackoffCapSeconds"]["MaxValue"]
        + max(v["VisibilityTimeout"] for v in TEMPLATE["Mappings"]["TimeoutToVisibility"].values())
    )
    stack = Stack(MaxDeliveryAgeSeconds="259200", RetryBackoffCapSeconds="43200")
    properties = stack.resources()[queue]["Properties"]
    assert properties["MessageRetentionPeriod"] > horizon
    assert properties["RedrivePolicy"]["maxReceiveCount"] == stack.params["MaxReceiveCount"]


@pytest.mark.parametrize("function", ["NotifierFunction", "SesEventsFunction"])
def test_both_functions_retry_by_age_with_the_parameters(function: str) -> None:
    env = Stack(MaxDeliveryAgeSeconds="7200", RetryBackoffCapSeconds="600").environment(function)
    assert env["MAX_DELIVERY_AGE"] == "7200"
    assert env["RETRY_BACKOFF_CAP_SECONDS"] == "600"
    defaults = Stack().environment(function)
    assert (defaults["MAX_DELIVERY_AGE"], defaults["RETRY_BACKOFF_CAP_SECONDS"]) == ("86400", "300")
    # Written out: the worker's own back-off base.
    assert defaults["RETRY_BACKOFF_BASE_SECONDS"] == str(BACKOFF_BASE) == "30"


# --------------------------------------------------------------------------- IAM


# Actions that have no resource-level permissions, so "*" is their only form: the one
# exception to "every statement names its resource" (X-Ray's only with Tracing=Active).
UNSCOPED = {"ses:GetSendQuota", "xray:PutTraceSegments", "xray:PutTelemetryRecords"}


def _assert_scoped(grants: dict[str, set[str]]) -> None:
    for action, resources in grants.items():
        assert "*" not in action, action
        if action in UNSCOPED:
            assert resources == {"*"}, action
            continue
        for resource in resources:
            assert resource != "*", action
            if action == "s3:GetObject":
                assert re.fullmatch(r"arn:aws:s3:::[a-z0-9.-]+/\*", resource), resource
            else:
                assert "*" not in resource, (action, resource)


def test_iam_defaults_name_every_resource() -> None:
    grants = Stack().grants()
    _assert_scoped(grants)
    queue = {"<GetAtt NotificationQueue.Arn>"}
    assert grants == {
        "logs:CreateLogStream": {"<GetAtt NotifierLogGroup.Arn>"},
        "logs:PutLogEvents": {"<GetAtt NotifierLogGroup.Arn>"},
        "sqs:ReceiveMessage": queue,
        "sqs:DeleteMessage": queue,
        "sqs:GetQueueAttributes": queue,
        "sqs:ChangeMessageVisibility": queue,
        "sqs:SendMessage": {"<GetAtt DeadLetterQueue.Arn>"},
        "s3:GetObject": {"arn:aws:s3:::videos-zip/*"},
        "dynamodb:GetItem": {"<GetAtt IdempotencyTable.Arn>"},
        "dynamodb:PutItem": {"<GetAtt IdempotencyTable.Arn>"},
        "dynamodb:UpdateItem": {"<GetAtt IdempotencyTable.Arn>"},
        "dynamodb:DeleteItem": {"<GetAtt IdempotencyTable.Arn>"},
        "dynamodb:BatchGetItem": {"<GetAtt SuppressionTable.Arn>"},
        "dynamodb:BatchWriteItem": {STATUS_TABLE_ARN},
        "sns:Publish": {STATUS_TOPIC},
        "ses:GetSendQuota": {"*"},
    }


def test_the_send_quota_is_the_one_unscoped_grant_and_the_notifiers_only() -> None:
    for overrides in ({}, {"EnableIdempotency": "false", "EnableSuppression": "false"}):
        stack = Stack(**overrides)
        unscoped = {action for action, resources in stack.grants().items() if "*" in resources}
        assert unscoped == {"ses:GetSendQuota"}
        (statement,) = (s for s in stack.statements() if s["Action"] == "ses:GetSendQuota")
        assert statement["Resource"] == "*"
        assert "Condition" not in statement
    assert not [a for a in Stack().grants("SesEventsRole") if a.startswith("ses:")]


def test_iam_with_every_option(tmp_path: Path) -> None:
    stack = Stack(
        AllowedBuckets="videos-zip,archive.example,other-bucket",
        SmtpPasswordSecretArn=SECRET_ARN,
        CognitoUserPoolId=POOL_ID,
        BucketKmsKeyArn=KMS_KEY,
    )
    grants = stack.grants()
    _assert_scoped(grants)
    assert grants["s3:GetObject"] == {
        "arn:aws:s3:::videos-zip/*",
        "arn:aws:s3:::archive.example/*",
        "arn:aws:s3:::other-bucket/*",
    }
    assert grants["secretsmanager:GetSecretValue"] == {SECRET_ARN}
    assert grants["cognito-idp:AdminGetUser"] == {
        f"arn:aws:cognito-idp:{REGION}:{ACCOUNT}:userpool/{POOL_ID}"
    }
    assert grants["kms:Decrypt"] == {KMS_KEY}
    (kms,) = (s for s in stack.statements() if s["Action"] == "kms:Decrypt")
    assert kms["Condition"] == {"StringEquals": {"kms:ViaService": "s3.us-east-1.amazonaws.com"}}
    env = stack.environment()
    assert env["SMTP_PASSWORD_SECRET_ID"] == SECRET_ARN
    assert env["COGNITO_USER_POOL_ID"] == POOL_ID
    assert env["ALLOWED_BUCKETS"] == "videos-zip,archive.example,other-bucket"
    settings = Settings.from_env(_worker_env(stack, tmp_path))
    assert settings.allowed_buckets == frozenset({"videos-zip", "archive.example", "other-bucket"})


def test_iam_without_options_has_no_optional_grants() -> None:
    stack = Stack(
        EnableIdempotency="false", EnableSuppression="false", EnableDeliveryStatus="false"
    )
    grants = stack.grants()
    for prefix in ("dynamodb:", "secretsmanager:", "cognito-idp:", "kms:", "sns:"):
        assert not [action for action in grants if action.startswith(prefix)]
    assert "IdempotencyTable" not in stack.resources()
    assert "SuppressionTable" not in stack.resources()
    assert stack.environment()["IDEMPOTENCY_TABLE"] == ""
    assert stack.environment()["SUPPRESSION_TABLE"] == ""


def test_five_buckets_are_the_most_and_each_is_granted() -> None:
    names = [f"bucket-{index}" for index in range(1, 6)]
    grants = Stack(AllowedBuckets=",".join(names)).grants()
    assert grants["s3:GetObject"] == {f"arn:aws:s3:::{name}/*" for name in names}
    pattern = PARAMETERS["AllowedBuckets"]["AllowedPattern"]
    assert re.fullmatch(pattern, ",".join(names))
    assert not re.fullmatch(pattern, ",".join([*names, "bucket-6"]))
    assert not re.fullmatch(pattern, "videos-zip, other")
    assert not re.fullmatch(pattern, "")


def test_idempotency_table_matches_the_worker() -> None:
    table = Stack().resources()["IdempotencyTable"]["Properties"]
    assert table["BillingMode"] == "PAY_PER_REQUEST"
    assert table["KeySchema"] == [{"AttributeName": "id", "KeyType": "HASH"}]
    assert table["AttributeDefinitions"] == [{"AttributeName": "id", "AttributeType": "S"}]
    assert table["TimeToLiveSpecification"] == {"AttributeName": "expires_at", "Enabled": True}
    assert Stack().environment()["IDEMPOTENCY_TABLE"] == "<Ref IdempotencyTable>"


# --------------------------------------------------------------------------- transports

# Every pair the rules allow: (Transport, FallbackTransport).
TRANSPORT_PAIRS = [("smtp", "none"), ("ses", "none"), ("smtp", "ses"), ("ses", "smtp")]
SES_GRANTS = {"ses:SendEmail", "ses:SendRawEmail"}
SMTP_SECRET_GRANT = "secretsmanager:GetSecretValue"


def _transport_stack(transport: str, fallback: str, **overrides: str) -> Stack:
    """A stack with these transports and what the rules ask of them (an SMTP server only
    when a transport is smtp, an SES identity when one is ses)."""
    uses = {transport, fallback}
    parameters = {
        "Transport": transport,
        "FallbackTransport": fallback,
        "SmtpServer": REQUIRED["SmtpServer"] if "smtp" in uses else "",
        "SesIdentity": SES_IDENTITY if "ses" in uses else "",
        **overrides,
    }
    stack = Stack(**parameters)
    assert not stack.broken_rules(), stack.broken_rules()
    return stack


def test_transport_parameters_and_their_defaults() -> None:
    assert PARAMETERS["Transport"]["Default"] == "smtp"
    assert PARAMETERS["Transport"]["AllowedValues"] == ["smtp", "ses"]
    assert PARAMETERS["FallbackTransport"]["Default"] == "none"
    assert PARAMETERS["FallbackTransport"]["AllowedValues"] == ["none", "smtp", "ses"]
    assert PARAMETERS["SesRegion"]["Default"] == ""
    inflight = PARAMETERS["SesMaxInflightBytes"]
    # 256 MiB for a 1,024 MB function, and never less than SES's largest message (40 MB).
    assert inflight["Default"] == 268435456 == 256 * 1024 * 1024
    assert PARAMETERS["MemorySize"]["Default"] == 1024
    assert inflight["MinValue"] >= 40 * 1000 * 1000
    # The SMTP server is optional now: the rules decide when it is required.
    assert PARAMETERS["SmtpServer"]["Default"] == ""
    assert "MinLength" not in PARAMETERS["SmtpServer"]
    env = Stack().environment()
    assert {name: env[name] for name in TRANSPORT_VARIABLES} == {
        "TRANSPORT": "smtp",
        "FALLBACK_TRANSPORT": "none",
        "SES_REGION": "",
        "SES_MAX_INFLIGHT_BYTES": "268435456",
    }


@pytest.mark.parametrize(("transport", "fallback"), TRANSPORT_PAIRS)
def test_the_transports_reach_the_notifier_only(transport: str, fallback: str) -> None:
    stack = _transport_stack(
        transport, fallback, SesRegion="eu-west-1", SesMaxInflightBytes="536870912"
    )
    env = stack.environment()
    assert (env["TRANSPORT"], env["FALLBACK_TRANSPORT"]) == (transport, fallback)
    assert (env["SES_REGION"], env["SES_MAX_INFLIGHT_BYTES"]) == ("eu-west-1", "536870912")
    assert env["SMTP_SERVER"] == stack.params["SmtpServer"]
    assert not TRANSPORT_VARIABLES & set(stack.environment("SesEventsFunction"))


@pytest.mark.parametrize(("transport", "fallback"), TRANSPORT_PAIRS)
def test_transport_conditions(transport: str, fallback: str) -> None:
    conditions = _transport_stack(transport, fallback).conditions
    assert conditions["UsesSmtp"] is ("smtp" in (transport, fallback))
    assert conditions["UsesSesApi"] is ("ses" in (transport, fallback))
    assert conditions["HasFallback"] is (fallback != "none")


@pytest.mark.parametrize(
    ("overrides", "broken"),
    [
        ({}, set()),
        ({"SmtpServer": ""}, {"SmtpServerForSmtp"}),
        ({"Transport": "ses", "SesIdentity": SES_IDENTITY, "SmtpServer": ""}, set()),
        ({"Transport": "ses", "SmtpServer": ""}, {"SesIdentityForSes"}),
        ({"Transport": "ses", "FallbackTransport": "smtp", "SesIdentity": SES_IDENTITY}, set()),
        (
            {"Transport": "ses", "FallbackTransport": "smtp", "SmtpServer": ""},
            {"SmtpServerForSmtp", "SesIdentityForSes"},
        ),
        ({"FallbackTransport": "ses"}, {"SesIdentityForSes"}),
        ({"FallbackTransport": "ses", "SesIdentity": SES_IDENTITY}, set()),
        ({"FallbackTransport": "smtp"}, {"FallbackIsAnotherTransport"}),
        (
            {"Transport": "ses", "FallbackTransport": "ses", "SesIdentity": SES_IDENTITY},
            {"FallbackIsAnotherTransport"},
        ),
    ],
    ids=[
        "smtp",
        "smtp-without-server",
        "ses-without-server",
        "ses-without-identity",
        "ses-falling-back-to-smtp",
        "ses-falling-back-to-smtp-without-server-or-identity",
        "ses-fallback-without-identity",
        "ses-fallback",
        "smtp-falling-back-to-smtp",
        "ses-falling-back-to-ses",
    ],
)
def test_rules_refuse_a_transport_without_what_it_needs(
    overrides: dict[str, str], broken: set[str]
) -> None:
    """CloudFormation checks the rules before it creates anything: a stack that could not
    send (no server for SMTP, no identity for SES, a fallback that is the primary) is
    refused at deploy time, not on its first record."""
    assert Stack(**overrides).broken_rules() == broken


def _ses_arn(kind: str, name: str, region: str = REGION) -> str:
    return f"arn:aws:ses:{region}:{ACCOUNT}:{kind}/{name}"


@pytest.mark.parametrize(("transport", "fallback"), TRANSPORT_PAIRS)
def test_each_transport_gets_its_own_grants_only(transport: str, fallback: str) -> None:
    """The SMTP secret only with an SMTP transport; ses:SendEmail and ses:SendRawEmail only
    with the SES API transport, on the identity and the configuration set the emails name."""
    stack = _transport_stack(transport, fallback, SmtpPasswordSecretArn=SECRET_ARN)
    grants = stack.grants()
    _assert_scoped(grants)
    uses = {transport, fallback}
    if "smtp" in uses:
        assert grants[SMTP_SECRET_GRANT] == {SECRET_ARN}
        assert stack.environment()["SMTP_PASSWORD_SECRET_ID"] == SECRET_ARN
    else:
        assert SMTP_SECRET_GRANT not in grants
        assert stack.environment()["SMTP_PASSWORD_SECRET_ID"] == ""
    sends = {action: on for action, on in grants.items() if action.startswith("ses:Send")}
    if "ses" in uses:
        configuration_set = _ses_arn("configuration-set", "<Ref EmailConfigurationSet>")
        expected = {_ses_arn("identity", SES_IDENTITY), configuration_set}
        assert sends == {action: expected for action in SES_GRANTS}
        (statement,) = (s for s in stack.statements() if s.get("Sid") == "SendWithSes")
        assert "Condition" not in statement
    else:
        assert sends == {}
    # Without the SES API, the stack's grants are those of an SMTP stack.
    if "ses" not in uses:
        assert grants == Stack(SmtpPasswordSecretArn=SECRET_ARN).grants()


@pytest.mark.parametrize(
    ("overrides", "region", "configuration_set"),
    [
        ({"SesRegion": "eu-west-1"}, "eu-west-1", "<Ref EmailConfigurationSet>"),
        ({"SesConfigurationSet": "existing-set"}, REGION, "existing-set"),
        ({"EnableSuppression": "false", "SesConfigurationSet": "tracking"}, REGION, "tracking"),
        ({"EnableSuppression": "false"}, REGION, None),
    ],
    ids=["other-region", "named-set", "named-set-without-suppression", "no-set"],
)
def test_ses_grants_follow_the_region_and_the_configuration_set(
    overrides: dict[str, str], region: str, configuration_set: str | None
) -> None:
    stack = _transport_stack("ses", "none", SesIdentity="no-reply@example.com", **overrides)
    expected = {_ses_arn("identity", "no-reply@example.com", region)}
    if configuration_set is not None:
        expected.add(_ses_arn("configuration-set", configuration_set, region))
        assert stack.environment()["SES_CONFIGURATION_SET"] == configuration_set
    else:
        assert stack.environment()["SES_CONFIGURATION_SET"] == ""
    grants = stack.grants()
    assert {grants[action] == expected for action in SES_GRANTS} == {True}


def test_ses_identity_and_region_patterns() -> None:
    identity = PARAMETERS["SesIdentity"]
    assert identity["Default"] == ""
    for good in ("", "example.com", "mail.example.co.uk", "no-reply@example.com", "a.b+c@x-y.io"):
        assert re.fullmatch(identity["AllowedPattern"], good), good
    # No wildcard, list, display name or bare word: the grant names one identity.
    bad = ("*", "*.example.com", "a@*", "Videos <no-reply@example.com>", "example", "a,b.com")
    for value in (*bad, "no reply@example.com", "@example.com"):
        assert not re.fullmatch(identity["AllowedPattern"], value), value
    region = PARAMETERS["SesRegion"]["AllowedPattern"]
    for good in ("", "us-east-1", "eu-west-1", "ap-southeast-2", "us-gov-west-1"):
        assert re.fullmatch(region, good), good
    for bad in ("*", "us-east", "US-EAST-1", "us-east-1 ", "email.us-east-1"):
        assert not re.fullmatch(region, bad), bad


# --------------------------------------------------------------------------- settings


def _config_variables() -> set[str]:
    source = (ROOT / "async_notifier" / "config.py").read_text()
    return set(re.findall(r"env\.\w+\(\s*\"([A-Z][A-Z0-9_]*)\"", source))


def test_every_worker_setting_is_a_parameter_or_has_a_value() -> None:
    variables = set(_function()["Environment"]["Variables"])
    read = _config_variables()
    assert {"SMTP_SERVER", "EMAIL_FROM", "LINK_EXPIRY_SECONDS", "SMTP_CHUNK_BYTES"} <= read
    missing = read - variables - DELIBERATELY_UNSET
    assert not missing, (
        f"settings read by async_notifier/config.py but absent from template.yaml: {missing}; "
        "add each as a parameter or a value in Environment.Variables (or to DELIBERATELY_UNSET)"
    )
    assert variables >= EXPECTED_VARIABLES
    assert not DELIBERATELY_UNSET & variables


def _worker_env(stack: Stack, tmp_path: Path) -> dict[str, str]:
    return _resolved(stack.environment(), tmp_path)


def _resolved(environment: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """A function's environment with the names and URLs CloudFormation would fill in."""
    placeholders = {
        "<Ref DeadLetterQueue>": f"https://sqs.{REGION}.amazonaws.com/{ACCOUNT}/dlq",
        "<Ref IdempotencyTable>": "notifier-IdempotencyTable-1",
        "<Ref SuppressionTable>": "notifier-SuppressionTable-1",
        "<Ref EmailConfigurationSet>": "EmailConfigurationSet-AbCdEf123456",
        "<Ref SesEventsDeadLetterQueue>": f"https://sqs.{REGION}.amazonaws.com/{ACCOUNT}/ses-dlq",
        "<Ref StatusTable>": "notifier-StatusTable-1",
        "<Ref StatusTopic>": f"arn:aws:sns:{REGION}:{ACCOUNT}:notifier-StatusTopic-1",
    }
    env = {name: placeholders.get(value, value) for name, value in environment.items()}
    assert not [value for value in env.values() if value.startswith("<")]
    return {**env, "TMP_DIR": str(tmp_path)}


def test_environment_is_valid_for_the_worker(tmp_path: Path) -> None:
    settings = Settings.from_env(_worker_env(Stack(), tmp_path))
    assert settings.smtp_server == REQUIRED["SmtpServer"]
    assert settings.smtp_tls == "starttls"
    assert settings.smtp_port == 587
    assert settings.allowed_buckets == frozenset({"videos-zip"})
    assert settings.retry_backoff is True
    assert settings.max_tmp_bytes == 1024 * 1000 * 1000 - 92_569_600


@pytest.mark.parametrize("fleet", ["2", "17", "1000"])
def test_each_instance_gets_its_share_of_the_fleet_rate(fleet: str) -> None:
    """FLEET_SIZE is the most instances the queue drives at once: the event source
    mapping's MaximumConcurrency, the same parameter."""
    stack = Stack(MaximumConcurrency=fleet, SmtpRateLimit="14")
    env = stack.environment()
    assert env["FLEET_SIZE"] == fleet
    assert env["SMTP_RATE_LIMIT"] == "14"
    assert _event()["ScalingConfig"] == {"MaximumConcurrency": {"Ref": "MaximumConcurrency"}}
    assert _function()["Environment"]["Variables"]["FLEET_SIZE"] == {"Ref": "MaximumConcurrency"}


def test_smtp_rate_limit_is_the_fleets_rate_auto_or_empty() -> None:
    parameter = PARAMETERS["SmtpRateLimit"]
    assert parameter["Default"] == ""
    pattern = parameter["AllowedPattern"]
    for good in ("", "auto", "14", "0.5", "200.25"):
        assert re.fullmatch(pattern, good), good
    for bad in ("AUTO", "auto14", "-1", "1e3", ".5", "14/s", " 14", "14 "):
        assert not re.fullmatch(pattern, bad), bad
    for word in ("fleet", "MaximumConcurrency", "auto", "GetSendQuota"):
        assert word in parameter["Description"], word
    # Empty stays empty (the worker reads it as unset: auto on SES, else no limit).
    assert Stack().environment()["SMTP_RATE_LIMIT"] == ""
    assert Stack(SmtpRateLimit="auto").environment()["SMTP_RATE_LIMIT"] == "auto"


@pytest.mark.parametrize(
    "overrides",
    [
        {"SmtpRateLimit": "auto"},
        {"SmtpRateLimit": "0.5", "MaximumConcurrency": "1000"},
        {"MaxDeliveryAgeSeconds": "300", "RetryBackoffCapSeconds": "1", "MaximumConcurrency": "2"},
        {"MaxDeliveryAgeSeconds": "259200", "RetryBackoffCapSeconds": "43200"},
    ],
    ids=["auto", "smallest-share", "shortest-horizon", "longest-horizon"],
)
def test_the_worker_takes_the_pacing_and_horizon_values(
    overrides: dict[str, str], tmp_path: Path
) -> None:
    """Every value the parameters allow is one the worker starts with (it raises
    ConfigError on a value it refuses), in both functions."""
    stack = Stack(**overrides)
    settings = Settings.from_env(_worker_env(stack, tmp_path))
    assert settings.smtp_server == REQUIRED["SmtpServer"]
    ses_events = _resolved(stack.environment("SesEventsFunction"), tmp_path)
    assert Settings.from_env(ses_events, sending=False).suppression_table is not None


def test_the_transport_defaults_are_the_worker_defaults(tmp_path: Path) -> None:
    """The transport parameters' defaults (smtp, no fallback, the function's region, 256 MiB)
    claim to be the worker's own: without the four variables it must start the same."""
    env = _worker_env(Stack(), tmp_path)
    without = {name: value for name, value in env.items() if name not in TRANSPORT_VARIABLES}
    assert len(without) == len(env) - len(TRANSPORT_VARIABLES)
    assert Settings.from_env(env) == Settings.from_env(without)


@pytest.mark.parametrize(("transport", "fallback"), TRANSPORT_PAIRS)
def test_the_worker_starts_with_each_transport_the_rules_allow(
    transport: str, fallback: str, tmp_path: Path
) -> None:
    """Every transport pair the rules let through is one the worker starts with (with
    Transport=ses the template leaves SMTP_SERVER empty), and one it reads: its settings
    differ from those of the default SMTP stack. Fails until config.py reads TRANSPORT and
    the rest (the worker's branch)."""
    smallest = str(PARAMETERS["SesMaxInflightBytes"]["MinValue"])
    stack = _transport_stack(
        transport, fallback, SesRegion="eu-west-1", SesMaxInflightBytes=smallest
    )
    settings = Settings.from_env(_worker_env(stack, tmp_path))
    if (transport, fallback) != ("smtp", "none"):
        assert settings != Settings.from_env(_worker_env(Stack(), tmp_path))


def test_environment_fits_lambdas_4_kb(tmp_path: Path) -> None:
    longest = ",".join(f"{index}{'b' * 62}" for index in range(5))
    stack = Stack(
        AllowedBuckets=longest,
        SmtpPasswordSecretArn=SECRET_ARN + "x" * 100,
        CognitoUserPoolId=POOL_ID,
        SmtpServer="smtp." + "m" * 200 + ".example.com",
        SmtpUser="u" * 100,
    )
    env = _worker_env(stack, tmp_path)
    env.pop("TMP_DIR")
    assert sum(len(name) + len(value) for name, value in env.items()) < 4096


def test_written_out_values_are_the_worker_defaults(tmp_path: Path) -> None:
    """The literals in Environment.Variables claim to be the worker's defaults: check it."""
    env = _worker_env(Stack(), tmp_path)
    literals = {
        name
        for name, value in _function()["Environment"]["Variables"].items()
        if isinstance(value, str)
    }
    assert len(literals) >= 10
    without = {name: value for name, value in env.items() if name not in literals}
    assert Settings.from_env(env) == Settings.from_env(without)


@pytest.mark.parametrize(
    "storage", [int(v) for v in PARAMETERS["EphemeralStorage"]["AllowedValues"]]
)
def test_max_tmp_bytes_follows_ephemeral_storage(storage: int, tmp_path: Path) -> None:
    env = _worker_env(Stack(EphemeralStorage=str(storage)), tmp_path)
    max_tmp = int(env["MAX_TMP_BYTES"])
    # Within /tmp whether Lambda's "MB" means 10^6 or 2^20 bytes, with ~88 MiB to spare.
    assert max_tmp == storage * 1000 * 1000 - 92_569_600
    if storage == 512:
        required = {"SMTP_SERVER": "x", "EMAIL_FROM": "a@example.com", "ALLOWED_BUCKETS": "videos"}
        defaults = Settings.from_env(required)
        assert max_tmp == defaults.max_tmp_bytes
    assert Settings.from_env(env).max_tmp_bytes == max_tmp


@pytest.mark.parametrize(
    ("rule", "parameter"),
    [("NoLoginWithoutTls", "SmtpUser"), ("NoSecretWithoutTls", "SmtpPasswordSecretArn")],
)
def test_password_without_tls_is_refused_at_deploy_time(rule: str, parameter: str) -> None:
    """The worker refuses these settings; the stack refuses them before any record fails."""
    body = TEMPLATE["Rules"][rule]
    assert body["RuleCondition"] == {"Fn::Not": [{"Fn::Equals": [{"Ref": parameter}, ""]}]}
    assert body["Assertions"][0]["Assert"] == {
        "Fn::Not": [{"Fn::Equals": [{"Ref": "SmtpTls"}, "none"]}]
    }


# --------------------------------------------------------------------------- outputs


def test_outputs_give_the_queues_and_the_function() -> None:
    outputs = TEMPLATE["Outputs"]
    assert outputs["QueueUrl"]["Value"] == {"Ref": "NotificationQueue"}
    assert outputs["QueueArn"]["Value"] == {"Fn::GetAtt": ["NotificationQueue", "Arn"]}
    assert outputs["DeadLetterQueueUrl"]["Value"] == {"Ref": "DeadLetterQueue"}
    assert outputs["FunctionArn"]["Value"] == {"Fn::GetAtt": ["NotifierFunction", "Arn"]}
    for name in ("SuppressionTableName", "SesConfigurationSetName", "SesEventsDeadLetterQueueUrl"):
        assert outputs[name]["Condition"] == "UseSuppression"
    configuration_set = Stack().eval(outputs["SesConfigurationSetName"]["Value"])
    assert configuration_set == "<Ref EmailConfigurationSet>"
    assert "#dashboards:name=${Dashboard}" in outputs["DashboardUrl"]["Value"]["Fn::Sub"]


def test_snapstart_is_a_parameter_on_published_versions() -> None:
    function = _function()
    assert function["AutoPublishAlias"] == "live"
    assert function["SnapStart"] == {
        "ApplyOn": {"Fn::If": ["UseSnapStart", "PublishedVersions", "None"]}
    }
    assert PARAMETERS["EnableSnapStart"]["Default"] == "false"


# --------------------------------------------------------------------------- bounces and complaints

# Settings the SES events function does not use: it mails nothing, reads no ZIP, looks no
# one up. Every setting the worker reads is either here, in its environment, or unset on
# purpose, so a new setting must be decided for this function as well.
NOT_FOR_SES_EVENTS = {
    *(f"SMTP_{name}" for name in ("SERVER", "PORT", "TLS", "USER", "PASSWORD_SECRET_ID")),
    *(f"SMTP_{name}" for name in ("CA_FILE", "TIMEOUT", "DATA_TIMEOUT", "LOCAL_HOSTNAME")),
    *(f"SMTP_{name}" for name in ("POOL_SIZE", "MAX_MESSAGES_PER_CONNECTION", "PIPELINING")),
    *(f"SMTP_{name}" for name in ("MAX_CONNECTION_AGE", "IDLE_CHECK_SECONDS", "CHUNK_BYTES")),
    *(f"SMTP_{name}" for name in ("RATE_LIMIT", "SECRET_TTL_SECONDS", "BREAKER_THRESHOLD")),
    "SMTP_BREAKER_COOLDOWN_SECONDS",
    "FLEET_SIZE",
    *TRANSPORT_VARIABLES,
    "EMAIL_FROM",
    "REPLY_TO",
    "SES_CONFIGURATION_SET",
    "DEFAULT_LOCALE",
    "ALLOWED_BUCKETS",
    "ALLOWED_KEY_PREFIX",
    "DOWNLOAD_CHUNK_BYTES",
    "MAX_ATTACHMENT_BYTES",
    "MAX_TMP_BYTES",
    "LINK_EXPIRY_SECONDS",
    "LINK_SIGNING_SECRET_ID",
    "COGNITO_USER_POOL_ID",
    "ALLOW_UNVERIFIED_EMAIL",
    "IDEMPOTENCY_TABLE",
    "IDEMPOTENCY_TTL_SECONDS",
    "RETRY_ATTEMPTS",
    "RETRY_BASE_DELAY",
}
SUPPRESSION_TABLE_ARN = "<GetAtt SuppressionTable.Arn>"
STATUS_TABLE_ARN = "<GetAtt StatusTable.Arn>"
STATUS_TOPIC = "<Ref StatusTopic>"


def test_ses_events_function_runs_the_other_entry_point_of_the_same_zip() -> None:
    notifier, ses_events = _function(), _function("SesEventsFunction")
    assert RESOURCES["SesEventsFunction"]["Condition"] == "UseSuppression"
    assert ses_events["Handler"] == "handler.ses_events_handler"
    for same in ("CodeUri", "Runtime", "Architectures", "Tracing"):
        assert ses_events[same] == notifier[same], same
    assert ses_events["Role"] == {"Fn::GetAtt": ["SesEventsRole", "Arn"]}
    assert "Policies" not in ses_events
    assert ses_events["LoggingConfig"]["LogGroup"] == {"Ref": "SesEventsLogGroup"}
    shared = {k: v for k, v in notifier["LoggingConfig"].items() if k != "LogGroup"}
    assert ses_events["LoggingConfig"] == {**shared, "LogGroup": {"Ref": "SesEventsLogGroup"}}
    (event,) = ses_events["Events"].values()
    assert event["Type"] == "SQS"
    assert event["Properties"]["Queue"] == {"Fn::GetAtt": ["SesEventsQueue", "Arn"]}
    assert event["Properties"]["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert "ses_events_handler" in {
        node.name
        for node in ast.parse((ROOT / "handler.py").read_text()).body
        if isinstance(node, ast.FunctionDef)
    }
    # Its queue: SNS's messages, dead letters after MaxReceiveCount, visibility from its timeout.
    resources = Stack().resources()
    queue = resources["SesEventsQueue"]["Properties"]
    assert queue["RedrivePolicy"] == {
        "deadLetterTargetArn": "<GetAtt SesEventsDeadLetterQueue.Arn>",
        "maxReceiveCount": "1000",
    }
    longest_window = event["Properties"]["MaximumBatchingWindowInSeconds"]
    assert queue["VisibilityTimeout"] >= 6 * ses_events["Timeout"] + longest_window
    assert queue["MessageRetentionPeriod"] == 1209600
    assert queue["SqsManagedSseEnabled"] is True
    dead_letters = resources["SesEventsDeadLetterQueue"]["Properties"]
    assert dead_letters["MessageRetentionPeriod"] == 1209600


def test_ses_events_environment_is_valid_and_decides_every_setting(tmp_path: Path) -> None:
    stack = Stack()
    environment = stack.environment("SesEventsFunction")
    assert environment["SUPPRESSION_TABLE"] == "<Ref SuppressionTable>"
    assert environment["DEAD_LETTER_QUEUE_URL"] == "<Ref SesEventsDeadLetterQueue>"
    # The soft-bounce TTL is one parameter for both functions.
    assert (
        environment["SUPPRESSION_SOFT_TTL_SECONDS"]
        == stack.environment()["SUPPRESSION_SOFT_TTL_SECONDS"]
        == stack.params["SuppressionSoftTtlSeconds"]
    )
    read = _config_variables() | ANNOUNCED_VARIABLES
    variables = set(_function("SesEventsFunction")["Environment"]["Variables"])
    undecided = read - variables - NOT_FOR_SES_EVENTS - DELIBERATELY_UNSET
    assert not undecided, (
        f"settings read by async_notifier/config.py that the SES events function neither gets "
        f"nor is said not to use: {undecided}; add each to its Environment.Variables in "
        "template.yaml or to NOT_FOR_SES_EVENTS"
    )
    assert not NOT_FOR_SES_EVENTS - read, f"not settings (any more): {NOT_FOR_SES_EVENTS - read}"
    assert not NOT_FOR_SES_EVENTS & variables
    assert not DELIBERATELY_UNSET & variables

    env = _resolved(environment, tmp_path)
    settings = Settings.from_env(env, sending=False)
    assert settings.suppression_table == "notifier-SuppressionTable-1"
    assert settings.dead_letter_queue_url == f"https://sqs.{REGION}.amazonaws.com/{ACCOUNT}/ses-dlq"
    assert settings.suppression_soft_ttl == 30 * 24 * 3600
    assert settings.metrics_namespace == "AsyncNotifier"
    # Its written-out values are the worker's defaults too.
    literals = {
        name
        for name, value in _function("SesEventsFunction")["Environment"]["Variables"].items()
        if isinstance(value, str)
    }
    assert literals
    without = {name: value for name, value in env.items() if name not in literals}
    assert Settings.from_env(env, sending=False) == Settings.from_env(without, sending=False)
    # And the function refuses to start without its table (it would record nothing).
    with pytest.raises(ConfigError, match="SUPPRESSION_TABLE is required"):
        Settings.from_env({**env, "SUPPRESSION_TABLE": ""}, sending=False)


def test_ses_events_role_names_every_resource() -> None:
    grants = Stack().grants("SesEventsRole")
    _assert_scoped(grants)
    queue = {"<GetAtt SesEventsQueue.Arn>"}
    assert grants == {
        "logs:CreateLogStream": {"<GetAtt SesEventsLogGroup.Arn>"},
        "logs:PutLogEvents": {"<GetAtt SesEventsLogGroup.Arn>"},
        "sqs:ReceiveMessage": queue,
        "sqs:DeleteMessage": queue,
        "sqs:GetQueueAttributes": queue,
        "sqs:ChangeMessageVisibility": queue,
        "sqs:SendMessage": {"<GetAtt SesEventsDeadLetterQueue.Arn>"},
        "dynamodb:UpdateItem": {SUPPRESSION_TABLE_ARN},
        "dynamodb:PutItem": {STATUS_TABLE_ARN},
        "dynamodb:Query": {STATUS_TABLE_ARN},
        "sns:Publish": {STATUS_TOPIC},
    }


def test_the_notifier_only_reads_the_suppression_list_and_ses_events_only_writes_it() -> None:
    stack = Stack()
    resources = stack.resources()
    roles = [name for name, r in resources.items() if r["Type"] == "AWS::IAM::Role"]
    assert sorted(roles) == ["NotifierRole", "SesEventsRole"]
    on_table = {
        role: {action for action, on in stack.grants(role).items() if SUPPRESSION_TABLE_ARN in on}
        for role in roles
    }
    assert on_table == {
        "NotifierRole": {"dynamodb:BatchGetItem"},
        "SesEventsRole": {"dynamodb:UpdateItem"},
    }
    assert stack.environment()["SUPPRESSION_TABLE"] == "<Ref SuppressionTable>"
    # Neither may touch the other's tables.
    assert "dynamodb:BatchGetItem" not in stack.grants("SesEventsRole")
    assert stack.grants()["dynamodb:UpdateItem"] == {"<GetAtt IdempotencyTable.Arn>"}


def test_suppression_table_matches_the_code_and_outlives_the_stack() -> None:
    resource = Stack().resources()["SuppressionTable"]
    table = resource["Properties"]
    assert table["BillingMode"] == "PAY_PER_REQUEST"
    assert table["KeySchema"] == [{"AttributeName": "id", "KeyType": "HASH"}]
    assert table["AttributeDefinitions"] == [{"AttributeName": "id", "AttributeType": "S"}]
    assert table["TimeToLiveSpecification"] == {"AttributeName": "expires_at", "Enabled": True}
    assert resource["DeletionPolicy"] == resource["UpdateReplacePolicy"] == "Retain"
    # That the code works with this very table: test_ses_events_function_records_bounces_...


def test_the_ses_events_queue_admits_only_the_topic() -> None:
    resources = Stack().resources()
    policy = resources["SesEventsQueuePolicy"]["Properties"]
    assert policy["Queues"] == ["<Ref SesEventsQueue>"]
    assert policy["PolicyDocument"]["Statement"] == [
        {
            "Sid": "TopicSends",
            "Effect": "Allow",
            "Principal": {"Service": "sns.amazonaws.com"},
            "Action": "sqs:SendMessage",
            "Resource": "<GetAtt SesEventsQueue.Arn>",
            "Condition": {"ArnEquals": {"aws:SourceArn": "<Ref SesEventsTopic>"}},
        }
    ]
    queue_policies = [r for r in resources.values() if r["Type"] == "AWS::SQS::QueuePolicy"]
    assert len(queue_policies) == 1  # the notification queues keep their owner-only access
    subscription = resources["SesEventsSubscription"]["Properties"]
    assert subscription["TopicArn"] == "<Ref SesEventsTopic>"
    assert subscription["Protocol"] == "sqs"
    assert subscription["Endpoint"] == "<GetAtt SesEventsQueue.Arn>"


@pytest.mark.parametrize("raw", ["true", "false"])
def test_raw_message_delivery_is_a_parameter(raw: str) -> None:
    subscription = Stack(SesEventsRawDelivery=raw).resources()["SesEventsSubscription"]
    assert subscription["Properties"]["RawMessageDelivery"] is (raw == "true")
    assert PARAMETERS["SesEventsRawDelivery"]["AllowedValues"] == ["true", "false"]


@pytest.mark.parametrize(
    ("overrides", "configuration_set", "created"),
    [
        ({}, "<Ref EmailConfigurationSet>", True),
        ({"SesConfigurationSet": "existing-set"}, "existing-set", False),
    ],
)
def test_bounces_and_complaints_of_the_configuration_set_reach_the_topic(
    overrides: dict[str, str], configuration_set: str, created: bool
) -> None:
    stack = Stack(**overrides)
    resources = stack.resources()
    assert ("EmailConfigurationSet" in resources) is created
    assert stack.environment()["SES_CONFIGURATION_SET"] == configuration_set
    destination = resources["SesEventsDestination"]["Properties"]
    assert destination["ConfigurationSetName"] == configuration_set
    event_destination = destination["EventDestination"]
    assert event_destination["Enabled"] is True
    assert {"bounce", "complaint"} <= set(event_destination["MatchingEventTypes"])
    assert event_destination["SnsDestination"] == {"TopicARN": "<Ref SesEventsTopic>"}
    # SES may publish to the topic for this configuration set of this account only.
    policy = resources["SesEventsTopicPolicy"]["Properties"]
    assert policy["Topics"] == ["<Ref SesEventsTopic>"]
    (statement,) = policy["PolicyDocument"]["Statement"]
    assert statement["Principal"] == {"Service": "ses.amazonaws.com"}
    assert statement["Action"] == "sns:Publish"
    assert statement["Resource"] == "<Ref SesEventsTopic>"
    source = f"arn:aws:ses:{REGION}:{ACCOUNT}:configuration-set/{configuration_set}"
    assert statement["Condition"] == {
        "StringEquals": {"aws:SourceAccount": ACCOUNT, "aws:SourceArn": source}
    }


@pytest.mark.parametrize("configuration_set", ["", "tracking-only"])
def test_without_suppression_the_stack_has_no_ses_part(configuration_set: str) -> None:
    stack = Stack(EnableSuppression="false", SesConfigurationSet=configuration_set)
    resources = stack.resources()
    assert not [r for r in resources.values() if r["Type"].startswith("AWS::SES")]
    sns = [name for name, r in resources.items() if r["Type"].startswith("AWS::SNS")]
    assert sns == ["StatusTopic"]  # the delivery status's, not SES's
    assert not [name for name in resources if name.startswith(("Ses", "Suppression"))]
    assert "dynamodb:BatchGetItem" not in stack.grants()
    env = stack.environment()
    assert env["SUPPRESSION_TABLE"] == ""
    # A set named anyway is still named in every email (SES's own tracking).
    assert env["SES_CONFIGURATION_SET"] == configuration_set
    assert PARAMETERS["EnableSuppression"]["Default"] == "true"


NAMESPACE = "Videos/Notifier"  # not the default: what the code emits follows the parameter


def _ses_notification(event_type: str, **detail: Any) -> dict[str, Any]:
    """An SES event as configuration-set event publishing writes it."""
    mail = {
        "timestamp": "2026-01-01T00:00:00.000Z",
        "source": "no-reply@example.com",
        "messageId": "0100018c-0000-0000-0000-000000000000-000000",
        "destination": ["someone@example.com"],
    }
    return {"eventType": event_type, "mail": mail, **detail}


@dataclass
class SesEventsRun:
    response: dict[str, Any]
    documents: list[dict[str, Any]]  # its EMF lines
    dynamodb: Any  # a client for its table
    logged: str  # every log record it made, fields and all


@pytest.fixture
def ses_events_run(
    aws: MotoServer,
    fresh_handler: None,
    captured: CapturedLogs,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> SesEventsRun:
    """The SES events entry point run once, with the template's environment for it, on
    moto, on the table the template defines: a hard bounce, a soft one and a complaint (in
    SNS's envelope)."""
    dynamodb = boto3.client("dynamodb", endpoint_url=aws.endpoint_url, region_name=REGION)
    sqs = boto3.client("sqs", endpoint_url=aws.endpoint_url, region_name=REGION)
    table = "notifier-SuppressionTable-1"
    definition = Stack().resources()["SuppressionTable"]["Properties"]
    dynamodb.create_table(
        TableName=table,
        **{key: definition[key] for key in ("AttributeDefinitions", "KeySchema", "BillingMode")},
    )
    dynamodb.update_time_to_live(
        TableName=table, TimeToLiveSpecification=definition["TimeToLiveSpecification"]
    )
    dead_letters = sqs.create_queue(QueueName="ses-dlq")["QueueUrl"]
    source = sqs.create_queue(QueueName="ses-events")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=source, AttributeNames=["QueueArn"])
    env = _resolved(Stack(MetricsNamespace=NAMESPACE).environment("SesEventsFunction"), tmp_path)
    assert env["SUPPRESSION_TABLE"] == table
    env["DEAD_LETTER_QUEUE_URL"] = dead_letters
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_LAMBDA_FUNCTION_NAME", raising=False)
    hard = _ses_notification(
        "Bounce",
        bounce={
            "bouncedRecipients": [{"emailAddress": "gone@example.com"}],
            "bounceType": "Permanent",
            "bounceSubType": "General",
        },
    )
    soft = _ses_notification(
        "Bounce",
        bounce={
            "bouncedRecipients": [{"emailAddress": "full@example.com"}],
            "bounceType": "Transient",
            "bounceSubType": "MailboxFull",
        },
    )
    complaint = _ses_notification(
        "Complaint",
        complaint={
            "complainedRecipients": [{"emailAddress": "angry@example.com"}],
            "complaintFeedbackType": "abuse",
        },
    )
    envelope = {
        "Type": "Notification",
        "MessageId": "5a1c8e4e-0000-0000-0000-000000000000",
        "TopicArn": f"arn:aws:sns:{REGION}:{ACCOUNT}:ses-events",
        "Message": json.dumps(complaint),
        "Timestamp": "2026-01-01T00:00:01.000Z",
    }
    arn = queue_arn["Attributes"]["QueueArn"]
    # Real messages of its queue, handed over as Lambda's event source mapping would.
    for body in (hard, soft, envelope):
        sqs.send_message(QueueUrl=source, MessageBody=json.dumps(body))
    received = sqs.receive_message(QueueUrl=source, MaxNumberOfMessages=10)["Messages"]
    assert len(received) == 3
    records = [
        {
            **sqs_record(message["Body"], message["MessageId"], queue_arn=arn),
            "receiptHandle": message["ReceiptHandle"],
        }
        for message in received
    ]
    context = FakeLambdaContext(60_000, function_name="notifier-SesEventsFunction-AbC")
    response = handler.ses_events_handler(sqs_event(records), context)
    documents = [
        json.loads(record.getMessage())
        for record in captured.records
        if getattr(record, "raw_json", False)
    ]
    logged = "\n".join(str(vars(record)) for record in captured.records)
    return SesEventsRun(response, documents, dynamodb, logged)


def test_ses_events_function_records_bounces_with_the_template_environment(
    ses_events_run: SesEventsRun,
) -> None:
    assert failed_ids(ses_events_run.response) == []
    documents = ses_events_run.documents
    items = ses_events_run.dynamodb.scan(TableName="notifier-SuppressionTable-1")["Items"]
    assert sorted((item["kind"]["S"], item["suppressed"]["BOOL"]) for item in items) == [
        ("bounce", False),
        ("bounce", True),
        ("complaint", True),
    ]
    # Only the soft bounce expires, by the attribute the table's TTL reads.
    ttl = Stack().resources()["SuppressionTable"]["Properties"]["TimeToLiveSpecification"]
    expiring = [item for item in items if ttl["AttributeName"] in item]
    assert [item["suppressed"]["BOOL"] for item in expiring] == [False]
    # The process's first invocation: its ColdStart, then the batch's numbers.
    cold, document = documents
    assert cold["ColdStart"] == 1
    assert (document["HardBounces"], document["SoftBounces"], document["Complaints"]) == (1, 1, 1)
    assert document["SesEventsReceived"] == 3
    for address in ("gone@example.com", "full@example.com", "angry@example.com"):
        assert address not in ses_events_run.logged
    assert document["SesEventsFailed"] == 0


# --------------------------------------------------------------------------- alarms and dashboard

ALARM_TOPIC = f"arn:aws:sns:{REGION}:{ACCOUNT}:on-call"
# Metric name -> the dimension sets it is emitted with, per function (logical id).
Emitted = dict[str, dict[str, set[frozenset[str]]]]


def _emitted(documents: list[dict[str, Any]], function_name: str) -> dict[str, set[frozenset[str]]]:
    """What EMF documents make CloudWatch store, checked to be in NAMESPACE and to carry
    the function's name as FunctionName."""
    found: dict[str, set[frozenset[str]]] = {}
    for document in documents:
        for directive in document["_aws"]["CloudWatchMetrics"]:
            assert directive["Namespace"] == NAMESPACE
            for dimensions in directive["Dimensions"]:
                assert "FunctionName" in dimensions
                assert document["FunctionName"] == function_name
                for metric in directive["Metrics"]:
                    found.setdefault(metric["Name"], set()).add(frozenset(dimensions))
    return found


NOTIFIER_NAME = "notifier-NotifierFunction-AbC"
# The provider-wide conditions that hold records (RecordsHeld's Condition dimension).
HELD_CONDITIONS = (
    "circuit_open",
    "daily_quota",
    "login_failed",
    "sender_rejected",
    "account_paused",
    "misconfigured",
)
ANNOUNCED_CONDITIONS: tuple[str, ...] = ()
TRANSPORTS = ("smtp", "ses")


def _provider_conditions() -> set[str]:
    """Every Condition value the code holds records with, and those announced."""
    found, pending = set(), [ProviderCondition]
    while pending:
        cls = pending.pop()
        found.add(cls.condition)
        pending.extend(cls.__subclasses__())
    return (found - {ProviderCondition.condition}) | set(ANNOUNCED_CONDITIONS)


def _announced_notifier_metrics() -> dict[str, set[frozenset[str]]]:
    """The metrics the worker is getting with the SES API transport and failover (another
    branch), built with metrics.py the way metrics_from_batch emits RecordsFailed and its
    ErrorClass: MessagesAccepted as a total with FunctionName and one per Transport, and
    TransportThrottled, TransportUnavailable and FallbackMessages with FunctionName; and
    RecordsHeld for the announced Condition (account_paused).

    What the alarms and the dashboard assume until metrics_from_batch emits them; the code's
    own metrics take precedence (`_notifier_metrics`), so once it emits one, its sample
    batch must produce it as the alarms watch it, and the entry here can go.
    """
    metrics = InvocationMetrics(NAMESPACE, dimensions={"FunctionName": NOTIFIER_NAME})
    metrics.set("MessagesAccepted", 3, "Count")
    for transport in TRANSPORTS:
        metrics.add("MessagesAccepted", dimensions={"Transport": transport})
    metrics.set("TransportThrottled", 1, "Count")
    metrics.set("TransportUnavailable", 1, "Count")
    metrics.set("FallbackMessages", 1, "Count")
    metrics.set("RecordsHeld", len(ANNOUNCED_CONDITIONS), "Count")
    for condition in ANNOUNCED_CONDITIONS:
        metrics.add("RecordsHeld", dimensions={"Condition": condition})
    return _emitted(metrics.documents(), NOTIFIER_NAME)


def _notifier_metrics() -> dict[str, set[frozenset[str]]]:
    """The notifier's metrics, from its own builder on a settled sample batch that has a
    record held by each provider-wide condition and one expired notification (and those
    announced but not emitted yet)."""
    held = [
        CircuitOpen("down"),
        DailyQuotaExceeded("454 daily quota"),
        LoginRefused("535"),
        SenderRejected("553"),
        AccountPaused("SendingPausedException"),
        ProviderMisconfigured("NotFoundException"),
    ]
    assert {error.condition for error in held} == set(HELD_CONDITIONS)
    outcomes = [
        Outcome("m-sent", action="sent", bytes=1000, receipt=Receipt("smtp", "q1")),
        Outcome("m-link", action="sent_link", retries=1, receipt=Receipt("ses", "0100-x")),
        Outcome("m-suppressed", error=RecipientSuppressed("bounce:Permanent:General")),
        Outcome("m-smtp", error=SmtpUnavailable("421"), retries=2),
        Outcome("m-old", error=SmtpUnavailable("421")),
        *(Outcome(f"m-held-{i}", error=error) for i, error in enumerate(held)),
    ]
    result = BatchResult.of(outcomes)
    expired = Expired("not delivered within MAX_DELIVERY_AGE")
    result.fates = [
        DeadLetter("suppressed"),
        Retry(30),
        DeadLetter("expired", expired),
        *(Retry(30) for _ in held),
    ]
    result.status = StatusCounts(active=True, written=2, failed=1)  # STATUS_TABLE is set
    metrics = metrics_from_batch(
        result,
        duration_s=1.5,
        pool=PoolStats(connections_opened=2, circuit_opened=1, throttled=2, send_rate=7.5),
        namespace=NAMESPACE,
        function_name=NOTIFIER_NAME,
    )
    assert metrics.value("RecordsSuppressed") == 1
    assert metrics.value("RecordsFailed", {"ErrorClass": "smtp_unavailable"}) == 3
    assert metrics.value("RecordsHeld") == len(held)
    assert metrics.value("RecordsExpired") == 1
    emitted = _emitted(metrics.documents(), NOTIFIER_NAME)
    for name, dimension_sets in _announced_notifier_metrics().items():
        emitted.setdefault(name, dimension_sets)
    return emitted


def _ref_target(value: str) -> str:
    match = re.fullmatch(r"<Ref (\w+)>", value)
    assert match, value
    return match[1]


def _queue_name_of(value: str) -> str:
    match = re.fullmatch(r"<GetAtt (\w+)\.QueueName>", value)
    assert match, value
    return match[1]


def _watched(
    namespace: str, metric: str, dimensions: dict[str, str], emitted: Emitted, stack: Stack
) -> tuple[str, str, str]:
    """(namespace, metric, logical id of what it measures), checked against the stack and,
    for the worker's own metrics, against what the code emits."""
    resources = stack.resources()
    if namespace == "AWS/SQS":
        assert metric.startswith("Approximate"), metric
        assert set(dimensions) == {"QueueName"}
        queue = _queue_name_of(dimensions["QueueName"])
        assert resources[queue]["Type"] == "AWS::SQS::Queue"
        return namespace, metric, queue
    if namespace == "AWS/Lambda":
        assert set(dimensions) == {"FunctionName"}
        function = _ref_target(dimensions["FunctionName"])
        assert resources[function]["Type"] == "AWS::Lambda::Function"
        return namespace, metric, function
    assert namespace == stack.params["MetricsNamespace"] == NAMESPACE
    function = _ref_target(dimensions["FunctionName"])
    assert resources[function]["Type"] == "AWS::Lambda::Function"
    assert function in emitted, f"{function} emits no metrics of its own"
    assert metric in emitted[function], f"{function}'s code never emits {metric}"
    assert frozenset(dimensions) in emitted[function][metric], (
        f"{metric} of {function} is emitted with the dimensions "
        f"{[sorted(d) for d in emitted[function][metric]]}, not {sorted(dimensions)}"
    )
    return "custom", metric, function


def _code_metrics(run: SesEventsRun) -> Emitted:
    """Both functions' metrics, as their code emits them (whatever became of the records)."""
    return {
        "NotifierFunction": _notifier_metrics(),
        "SesEventsFunction": _emitted(run.documents, "notifier-SesEventsFunction-AbC"),
    }


_BASE_DIMENSIONS = {"FunctionName", "QueueName"}


def test_alarms_watch_what_the_code_and_aws_emit(ses_events_run: SesEventsRun) -> None:
    emitted = _code_metrics(ses_events_run)
    # With a fallback, so that every alarm exists (FallbackCarryingAlarm needs one).
    parameters = {"MetricsNamespace": NAMESPACE, "FallbackTransport": "ses"}
    parameters["SesIdentity"] = SES_IDENTITY
    translated = _translate(**parameters)
    stack = Stack(translated, **parameters)
    assert not stack.broken_rules()
    alarms = {
        name: resource["Properties"]
        for name, resource in stack.resources().items()
        if resource["Type"] == "AWS::CloudWatch::Alarm"
    }
    watched = set()
    for name, alarm in alarms.items():
        dimensions = {d["Name"]: d["Value"] for d in alarm["Dimensions"]}
        what = _watched(alarm["Namespace"], alarm["MetricName"], dimensions, emitted, stack)
        # An extra dimension (Condition) picks one series of the metric: part of what is watched.
        extra = [f"{k}={v}" for k, v in sorted(dimensions.items()) if k not in _BASE_DIMENSIONS]
        watched.add((*what, *extra))
        # Each threshold is a parameter of its own kind; no action without a topic.
        threshold = translated["Resources"][name]["Properties"]["Threshold"]
        assert threshold["Ref"] in PARAMETERS, name
        assert alarm["ComparisonOperator"] == "GreaterThanThreshold", name
        assert alarm["TreatMissingData"] == "notBreaching", name
        assert "AlarmActions" not in alarm, name
        assert "OKActions" not in alarm, name
    assert watched == {
        ("AWS/SQS", "ApproximateNumberOfMessagesVisible", "DeadLetterQueue"),
        ("AWS/SQS", "ApproximateNumberOfMessagesVisible", "SesEventsDeadLetterQueue"),
        ("AWS/SQS", "ApproximateAgeOfOldestMessage", "NotificationQueue"),
        ("AWS/Lambda", "Errors", "NotifierFunction"),
        ("AWS/Lambda", "Throttles", "NotifierFunction"),
        ("AWS/Lambda", "Errors", "SesEventsFunction"),
        ("AWS/Lambda", "Throttles", "SesEventsFunction"),
        ("custom", "RecordsFailed", "NotifierFunction"),
        ("custom", "RecordsSuppressed", "NotifierFunction"),
        ("custom", "SmtpCircuitOpened", "NotifierFunction"),
        ("custom", "RecordsHeld", "NotifierFunction", "Condition=daily_quota"),
        ("custom", "RecordsHeld", "NotifierFunction", "Condition=login_failed"),
        ("custom", "RecordsHeld", "NotifierFunction", "Condition=sender_rejected"),
        ("custom", "RecordsHeld", "NotifierFunction", "Condition=account_paused"),
        ("custom", "RecordsHeld", "NotifierFunction", "Condition=misconfigured"),
        ("custom", "FallbackMessages", "NotifierFunction"),
        ("custom", "RecordsExpired", "NotifierFunction"),
    }
    assert len(alarms) == len(watched)


NEW_ALARMS = {
    # alarm: (metric, Condition or None, its threshold parameter)
    "DailyQuotaAlarm": ("RecordsHeld", "daily_quota", "DailyQuotaAlarmThreshold"),
    "SmtpLoginFailedAlarm": ("RecordsHeld", "login_failed", "SmtpLoginFailedAlarmThreshold"),
    "SenderRejectedAlarm": ("RecordsHeld", "sender_rejected", "SenderRejectedAlarmThreshold"),
    "AccountPausedAlarm": ("RecordsHeld", "account_paused", "AccountPausedAlarmThreshold"),
    "ProviderMisconfiguredAlarm": (
        "RecordsHeld",
        "misconfigured",
        "ProviderMisconfiguredAlarmThreshold",
    ),
    "RecordsExpiredAlarm": ("RecordsExpired", None, "RecordsExpiredAlarmThreshold"),
}


@pytest.mark.parametrize("suppression", ["true", "false"])
def test_provider_condition_and_expiry_alarms(suppression: str) -> None:
    stack = Stack(MetricsNamespace=NAMESPACE, EnableSuppression=suppression)
    resources = stack.resources()
    for name, (metric, condition, threshold) in NEW_ALARMS.items():
        alarm = resources[name]["Properties"]
        assert alarm["Namespace"] == NAMESPACE, name
        assert alarm["MetricName"] == metric, name
        dimensions = {d["Name"]: d["Value"] for d in alarm["Dimensions"]}
        expected = {"FunctionName": "<Ref NotifierFunction>"}
        if condition:
            expected["Condition"] = condition
        assert dimensions == expected, name
        assert (alarm["Statistic"], alarm["Period"], alarm["EvaluationPeriods"]) == ("Sum", 300, 1)
        assert RESOURCES[name]["Properties"]["Threshold"] == {"Ref": threshold}
        assert alarm["ComparisonOperator"] == "GreaterThanThreshold", name
        assert alarm["TreatMissingData"] == "notBreaching", name
        assert "docs/operations.md" in alarm["AlarmDescription"], name
        # Any held or expired record is news: a lost email, or every email waiting.
        assert (PARAMETERS[threshold]["Default"], PARAMETERS[threshold]["MinValue"]) == (0, 0)
    # circuit_open is held too, and keeps its own alarm on SmtpCircuitOpened.
    held = [
        dimension["Value"]
        for resource in resources.values()
        if resource["Type"] == "AWS::CloudWatch::Alarm"
        and resource["Properties"]["MetricName"] == "RecordsHeld"
        for dimension in resource["Properties"]["Dimensions"]
        if dimension["Name"] == "Condition"
    ]
    assert sorted(held) == [
        "account_paused",
        "daily_quota",
        "login_failed",
        "misconfigured",
        "sender_rejected",
    ]
    assert set(held) < _provider_conditions()
    assert resources["CircuitOpenedAlarm"]["Properties"]["MetricName"] == "SmtpCircuitOpened"
    with_topic = Stack(AlarmTopicArn=ALARM_TOPIC, EnableSuppression=suppression).resources()
    for name in NEW_ALARMS:
        assert with_topic[name]["Properties"]["AlarmActions"] == [ALARM_TOPIC]
        assert with_topic[name]["Properties"]["OKActions"] == [ALARM_TOPIC]


@pytest.mark.parametrize(("transport", "fallback"), TRANSPORT_PAIRS)
def test_the_fallback_alarm_exists_with_a_fallback_only(transport: str, fallback: str) -> None:
    """FallbackMessages is 0 while the primary works: any message the fallback carried is
    news. Without a fallback there is nothing to watch, so no alarm."""
    stack = _transport_stack(transport, fallback, MetricsNamespace=NAMESPACE)
    resources = stack.resources()
    assert ("FallbackCarryingAlarm" in resources) is (fallback != "none")
    assert RESOURCES["FallbackCarryingAlarm"]["Condition"] == "HasFallback"
    # account_paused is the provider's, whichever transport reports it.
    assert "AccountPausedAlarm" in resources
    if fallback == "none":
        return
    alarm = resources["FallbackCarryingAlarm"]["Properties"]
    assert (alarm["Namespace"], alarm["MetricName"]) == (NAMESPACE, "FallbackMessages")
    assert alarm["Dimensions"] == [{"Name": "FunctionName", "Value": "<Ref NotifierFunction>"}]
    assert (alarm["Statistic"], alarm["Period"], alarm["EvaluationPeriods"]) == ("Sum", 300, 1)
    threshold = "FallbackCarryingAlarmThreshold"
    assert RESOURCES["FallbackCarryingAlarm"]["Properties"]["Threshold"] == {"Ref": threshold}
    assert (PARAMETERS[threshold]["Default"], PARAMETERS[threshold]["MinValue"]) == (0, 0)
    assert alarm["ComparisonOperator"] == "GreaterThanThreshold"
    assert alarm["TreatMissingData"] == "notBreaching"
    assert "docs/operations.md" in alarm["AlarmDescription"]
    assert "AlarmActions" not in alarm
    with_topic = _transport_stack(transport, fallback, AlarmTopicArn=ALARM_TOPIC).resources()
    properties = with_topic["FallbackCarryingAlarm"]["Properties"]
    assert properties["AlarmActions"] == properties["OKActions"] == [ALARM_TOPIC]


def test_alarms_notify_the_topic_when_one_is_given() -> None:
    for suppression in ("true", "false"):
        stack = Stack(AlarmTopicArn=ALARM_TOPIC, EnableSuppression=suppression)
        alarms = [r for r in stack.resources().values() if r["Type"] == "AWS::CloudWatch::Alarm"]
        assert len(alarms) == (16 if suppression == "true" else 12)
        for alarm in alarms:
            assert alarm["Properties"]["AlarmActions"] == [ALARM_TOPIC]
            assert alarm["Properties"]["OKActions"] == [ALARM_TOPIC]
    pattern = PARAMETERS["AlarmTopicArn"]["AllowedPattern"]
    assert re.fullmatch(pattern, ALARM_TOPIC)
    assert re.fullmatch(pattern, "")
    assert not re.fullmatch(pattern, f"arn:aws:sqs:{REGION}:{ACCOUNT}:queue")


def _dashboard_metrics(widget: dict[str, Any]) -> list[tuple[str, str, dict[str, str]]]:
    """(namespace, metric, dimensions) of a metric widget, a SEARCH expression included."""
    found = []
    for entry in widget["properties"]["metrics"]:
        if isinstance(entry[0], dict):
            (query,) = entry
            match = re.fullmatch(
                r"SEARCH\('\{([^,]+),([^}]+)\} MetricName=\"(\w+)\" FunctionName=\"([^\"]+)\"'"
                r", '\w+', \d+\)",
                query["expression"],
            )
            assert match, query["expression"]
            namespace, schema, metric, function = match.groups()
            dimensions = {name: "" for name in schema.split(",")}
            dimensions["FunctionName"] = function
            found.append((namespace, metric, dimensions))
            continue
        names = [part for part in entry if isinstance(part, str)]
        assert len(names) % 2 == 0, entry
        assert len(names) >= 4, entry
        namespace, metric, *pairs = names
        found.append((namespace, metric, dict(zip(pairs[::2], pairs[1::2], strict=True))))
    return found


@pytest.mark.parametrize("suppression", ["true", "false"])
def test_dashboard_shows_what_the_code_and_aws_emit(
    suppression: str, ses_events_run: SesEventsRun
) -> None:
    emitted = _code_metrics(ses_events_run)
    stack = Stack(
        _translate(MetricsNamespace=NAMESPACE, EnableSuppression=suppression),
        MetricsNamespace=NAMESPACE,
        EnableSuppression=suppression,
    )
    body = json.loads(stack.resources()["Dashboard"]["Properties"]["DashboardBody"])
    shown = set()
    for widget in body["widgets"]:
        assert widget["type"] == "metric"
        assert widget["properties"]["region"] == REGION
        for namespace, metric, dimensions in _dashboard_metrics(widget):
            shown.add(_watched(namespace, metric, dimensions, emitted, stack))
    notifier = {
        "RecordsSent",
        "RecordsFailed",
        "RecordsRetried",
        "RecordsDeadLettered",
        "RecordsSuppressed",
        "SmtpConnectionsOpened",
        "SmtpCircuitOpened",
        "InvocationDuration",
        "RecordsHeld",
        "SendRate",
        "SmtpThrottled",
        "RecordsExpired",
        "MessagesAccepted",
        "FallbackMessages",
        "TransportThrottled",
        "TransportUnavailable",
    }
    assert {("custom", metric, "NotifierFunction") for metric in notifier} <= shown
    # Messages accepted split by Transport (the series with that dimension, not the total).
    accepted = [
        (namespace, dimensions)
        for widget in body["widgets"]
        for namespace, metric, dimensions in _dashboard_metrics(widget)
        if metric == "MessagesAccepted"
    ]
    expected = {"FunctionName": "<Ref NotifierFunction>", "Transport": ""}
    total = {"FunctionName": "<Ref NotifierFunction>"}  # beside SES's deliveries
    assert accepted == [(NAMESPACE, expected)] + [(NAMESPACE, total)] * (suppression == "true")
    # Held records split by Condition, like failed ones by ErrorClass.
    held = [
        (namespace, dimensions)
        for widget in body["widgets"]
        for namespace, metric, dimensions in _dashboard_metrics(widget)
        if metric == "RecordsHeld"
    ]
    assert held == [(NAMESPACE, {"Condition": "", "FunctionName": "<Ref NotifierFunction>"})]
    ses_events = {("custom", m, "SesEventsFunction") for m in ("HardBounces", "Complaints")}
    assert (ses_events <= shown) is (suppression == "true")
    assert not [w for w in shown if "SesEvents" in w[2]] or suppression == "true"


# --------------------------------------------------------------------------- delivery status


def test_the_status_table_is_the_one_the_code_reads_and_writes(aws: MotoServer) -> None:
    """Made on moto from the template's own definition, the table takes the store's
    writes (the worker's batches and SES's conditional puts) and answers the reader's
    queries (the video's by its index, by name)."""
    import asyncio

    import aioboto3

    from async_notifier.aws.status import VIDEO_INDEX, DynamoStatusReader, DynamoStatusStore
    from async_notifier.delivery_status import StatusChange

    resource = Stack().resources()["StatusTable"]
    table = resource["Properties"]
    assert table["BillingMode"] == "PAY_PER_REQUEST"
    assert table["KeySchema"] == [
        {"AttributeName": "id", "KeyType": "HASH"},
        {"AttributeName": "event", "KeyType": "RANGE"},
    ]
    assert table["TimeToLiveSpecification"] == {"AttributeName": "expires_at", "Enabled": True}
    assert table["SSESpecification"] == {"SSEEnabled": True}
    (index,) = table["GlobalSecondaryIndexes"]
    assert index["IndexName"] == VIDEO_INDEX
    name = "notifier-StatusTable-1"
    dynamodb = boto3.client("dynamodb", endpoint_url=aws.endpoint_url, region_name=REGION)
    dynamodb.create_table(
        TableName=name,
        **{
            key: table[key]
            for key in (
                "AttributeDefinitions",
                "KeySchema",
                "BillingMode",
                "GlobalSecondaryIndexes",
            )
        },
    )

    async def write_and_read() -> list[str]:
        async with aioboto3.Session().client(
            "dynamodb", endpoint_url=aws.endpoint_url, region_name=REGION
        ) as client:
            store = DynamoStatusStore(client, name)
            change = StatusChange("ab" * 20, "accepted", 1, "worker", "accepted:m:1", video_id="v1")
            assert await store.write_batch([change]) == []
            delivered = StatusChange("ab" * 20, "delivered", 2, "ses", "delivery:x")
            assert (await store.write(delivered)).result == "current"
            found = await DynamoStatusReader(client, name).for_video("v1")
            return [record.status for record in found]

    assert asyncio.run(write_and_read()) == ["delivered"]


@pytest.mark.parametrize("function", ["NotifierFunction", "SesEventsFunction"])
def test_both_functions_get_the_status_table_and_topic(function: str, tmp_path: Path) -> None:
    stack = Stack(StatusTtlSeconds="86400")
    env = stack.environment(function)
    assert env["STATUS_TABLE"] == "<Ref StatusTable>"
    assert env["STATUS_TOPIC_ARN"] == STATUS_TOPIC
    assert env["STATUS_TTL_SECONDS"] == "86400"
    settings = Settings.from_env(_resolved(env, tmp_path), sending=function == "NotifierFunction")
    assert settings.status_table == "notifier-StatusTable-1"
    assert settings.status_topic_arn == f"arn:aws:sns:{REGION}:{ACCOUNT}:notifier-StatusTopic-1"
    assert settings.status_ttl == 86400
    assert PARAMETERS["StatusTtlSeconds"]["Default"] == Settings.status_ttl
    role = "NotifierRole" if function == "NotifierFunction" else "SesEventsRole"
    on_status = {a for a, on in stack.grants(role).items() if STATUS_TABLE_ARN in on}
    # The worker only writes (in batches); SES's function puts and reads its notification's
    # changes. Neither scans, nor reads the video index.
    assert on_status == (
        {"dynamodb:BatchWriteItem"}
        if role == "NotifierRole"
        else {"dynamodb:PutItem", "dynamodb:Query"}
    )
    assert not any("/index/" in arn for on in stack.grants(role).values() for arn in on)
    assert stack.grants(role)["sns:Publish"] == {STATUS_TOPIC}


def test_ses_reports_deliveries_delays_and_rejections_with_the_status() -> None:
    def types(**overrides: str) -> list[str]:
        destination = Stack(**overrides).resources()["SesEventsDestination"]["Properties"]
        event_types: list[str] = destination["EventDestination"]["MatchingEventTypes"]
        return event_types

    assert types() == ["bounce", "complaint", "delivery", "deliveryDelay", "reject"]
    assert types(EnableDeliveryStatus="false") == ["bounce", "complaint"]


def test_without_the_status_nothing_of_it_is_made_or_granted() -> None:
    stack = Stack(EnableDeliveryStatus="false", EnableStatusSubscriberQueue="true")
    resources = stack.resources()
    assert not [name for name in resources if name.startswith("Status")]
    for function, role in (
        ("NotifierFunction", "NotifierRole"),
        ("SesEventsFunction", "SesEventsRole"),
    ):
        env = stack.environment(function)
        assert (env["STATUS_TABLE"], env["STATUS_TOPIC_ARN"]) == ("", "")
        assert "sns:Publish" not in stack.grants(role)
        assert STATUS_TABLE_ARN not in {r for on in stack.grants(role).values() for r in on}
    assert "Delivered vs accepted" not in resources["Dashboard"]["Properties"]["DashboardBody"]


def test_the_status_topic_is_exported_and_its_sample_subscriber_admits_only_it() -> None:
    outputs = TEMPLATE["Outputs"]
    assert outputs["StatusTopicArn"]["Value"] == {"Ref": "StatusTopic"}
    assert outputs["StatusTopicArn"]["Condition"] == "UseDeliveryStatus"
    export = Stack().eval(outputs["StatusTopicArn"]["Export"]["Name"])
    assert export == "notifier-StatusTopicArn"
    assert "StatusSubscriberQueue" not in Stack().resources()
    resources = Stack(EnableStatusSubscriberQueue="true").resources()
    (statement,) = resources["StatusSubscriberQueuePolicy"]["Properties"]["PolicyDocument"][
        "Statement"
    ]
    assert statement["Principal"] == {"Service": "sns.amazonaws.com"}
    assert statement["Resource"] == "<GetAtt StatusSubscriberQueue.Arn>"
    assert statement["Condition"] == {"ArnEquals": {"aws:SourceArn": STATUS_TOPIC}}
    subscription = resources["StatusSubscription"]["Properties"]
    assert subscription["TopicArn"] == STATUS_TOPIC
    assert subscription["Endpoint"] == "<GetAtt StatusSubscriberQueue.Arn>"
    assert subscription["RawMessageDelivery"] is True


# --------------------------------------------------------------------------- the canary

CANARY = {"CanarySchedule": "rate(1 hour)"}


def test_the_canary_is_off_by_default_and_needs_the_statuses() -> None:
    for overrides in (
        {},
        {**CANARY, "EnableDeliveryStatus": "false"},
        {**CANARY, "EnableSuppression": "false"},
    ):
        resources = Stack(**overrides).resources()
        assert not [name for name in resources if name.startswith("Canary")], overrides
    names = {name for name in Stack(**CANARY).resources() if name.startswith("Canary")}
    assert names == {
        "CanaryLogGroup",
        "CanaryRole",
        "CanaryFunction",
        "CanaryFailedAlarm",
        "CanaryErrorsAlarm",
    }
    pattern = PARAMETERS["CanarySchedule"]["AllowedPattern"]
    for good in ("", "rate(1 hour)", "rate(15 minutes)", "cron(0 * * * ? *)"):
        assert re.fullmatch(pattern, good), good
    for bad in ("1 hour", "rate(1 hour", "every(1 hour)"):
        assert not re.fullmatch(pattern, bad), bad


def test_the_canary_runs_its_own_entry_point_on_the_schedule(tmp_path: Path) -> None:
    stack = Stack(**CANARY)
    function = stack.resources()["CanaryFunction"]["Properties"]
    assert function["Handler"] == "handler.canary_handler"
    assert function["CodeUri"] == _function()["CodeUri"]
    assert function["EventInvokeConfig"] == {"MaximumRetryAttempts": 0}
    schedule = function["Events"]["Schedule"]
    assert schedule["Type"] == "Schedule"
    assert schedule["Properties"]["Schedule"] == "rate(1 hour)"
    event = json.loads(schedule["Properties"]["Input"])
    assert event["queue_url"] == "<Ref NotificationQueue>"
    # The entry point takes the event, and reports before the function's timeout.
    request = CanaryRequest.from_event(
        {**event, "queue_url": "https://sqs.us-east-1.amazonaws.com/1/q"},
        remaining_seconds=function["Timeout"],
    )
    assert request.timeout == event["timeout_seconds"]
    assert event["timeout_seconds"] + CanaryRequest.REPORT_MARGIN < function["Timeout"]
    # Its environment is enough for its settings, and names its table.
    env = _resolved(stack.environment("CanaryFunction"), tmp_path)
    assert Settings.for_status(env).status_table == "notifier-StatusTable-1"


def test_the_canary_may_only_send_probes_and_read_statuses() -> None:
    grants = Stack(**CANARY).grants("CanaryRole")
    _assert_scoped(grants)
    assert grants == {
        "logs:CreateLogStream": {"<GetAtt CanaryLogGroup.Arn>"},
        "logs:PutLogEvents": {"<GetAtt CanaryLogGroup.Arn>"},
        "sqs:SendMessage": {"<GetAtt NotificationQueue.Arn>"},
        "dynamodb:Query": {STATUS_TABLE_ARN},
    }


def test_the_canary_alarms_watch_its_metric_and_its_errors() -> None:
    resources = Stack(**CANARY, MetricsNamespace=NAMESPACE).resources()
    failed = resources["CanaryFailedAlarm"]["Properties"]
    assert (failed["Namespace"], failed["MetricName"]) == (NAMESPACE, "CanaryFailed")
    errors = resources["CanaryErrorsAlarm"]["Properties"]
    assert (errors["Namespace"], errors["MetricName"]) == ("AWS/Lambda", "Errors")
    for alarm in (failed, errors):
        assert alarm["Dimensions"] == [{"Name": "FunctionName", "Value": "<Ref CanaryFunction>"}]
        assert alarm["Threshold"] == "0"
        assert alarm["ComparisonOperator"] == "GreaterThanThreshold"


def test_a_stack_with_the_canary_translates_lint_clean() -> None:
    translated = _translate(**CANARY)
    assert [str(match) for match in lint(json.dumps(translated))] == []
    types = [
        resource["Type"]
        for name, resource in translated["Resources"].items()
        if name.startswith("Canary")
    ]
    assert "AWS::Events::Rule" in types
    assert "AWS::Lambda::EventInvokeConfig" in types
