"""template.yaml: cfn-lint clean, translatable by SAM, and wired the way the worker needs.

The template is read with cfn-lint's own YAML loader (short tags such as !Ref and !If become
their long forms) and evaluated for chosen parameter values by a small interpreter of the
intrinsic functions it uses, so the IAM assertions look at the statements a stack would get,
conditions resolved, rather than at the template's text.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

import boto3
import pytest
from cfnlint.api import lint
from cfnlint.decode import decode_str
from samtranslator.parser.parser import Parser
from samtranslator.translator.translator import Translator

from async_notifier.config import Settings

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
# Worker settings the template leaves unset on purpose (see the comment at its top).
DELIBERATELY_UNSET = {"AWS_REGION", "AWS_ENDPOINT_URL", "SMTP_PASSWORD", "TEMPLATES_DIR", "TMP_DIR"}
# Settings being added alongside the template; it must carry them from the start.
EXPECTED_VARIABLES = {
    "SMTP_PASSWORD_SECRET_ID",
    "METRICS_NAMESPACE",
    "COGNITO_USER_POOL_ID",
    "DEAD_LETTER_QUEUE_URL",
    "IDEMPOTENCY_TABLE",
    "MAX_TMP_BYTES",
}
_NO_VALUE = object()


def _load() -> dict[str, Any]:
    template, matches = decode_str(TEMPLATE_PATH.read_text())
    assert not matches, matches
    # Plain dicts, lists and strs (cfn-lint's nodes carry line marks).
    loaded: dict[str, Any] = json.loads(json.dumps(template))
    return loaded


TEMPLATE = _load()
RESOURCES: dict[str, Any] = TEMPLATE["Resources"]
PARAMETERS: dict[str, Any] = TEMPLATE["Parameters"]


# --------------------------------------------------------------------------- evaluation


class Stack:
    """The template with its parameters and conditions resolved; resources stay symbolic."""

    def __init__(self, **overrides: str) -> None:
        self.params: dict[str, str] = {
            name: str(spec["Default"]) for name, spec in PARAMETERS.items() if "Default" in spec
        }
        self.params.update(REQUIRED)
        self.params.update(overrides)
        missing = set(PARAMETERS) - set(self.params)
        assert not missing, f"no value for {missing}"
        self.conditions: dict[str, bool] = {}
        for name, expression in TEMPLATE.get("Conditions", {}).items():
            self.conditions[name] = bool(self.eval(expression))

    def ref(self, name: str) -> str:
        if name in self.params:
            return self.params[name]
        if name in PSEUDO:
            return PSEUDO[name]
        assert name in RESOURCES, f"Ref to unknown {name}"
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
                assert resource in RESOURCES, f"GetAtt of unknown {resource}"
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
                return TEMPLATE["Mappings"][name][top][second]
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
            if key == "Condition":
                return self.conditions[arg]
            assert not key.startswith("Fn::"), f"evaluator lacks {key}"
        result = {key: self.eval(value) for key, value in node.items()}
        return {key: value for key, value in result.items() if value is not _NO_VALUE}

    def resources(self) -> dict[str, Any]:
        return {
            name: self.eval(resource)
            for name, resource in RESOURCES.items()
            if "Condition" not in resource or self.conditions[resource["Condition"]]
        }

    def statements(self) -> list[dict[str, Any]]:
        role = self.resources()["NotifierRole"]["Properties"]
        assert "ManagedPolicyArns" not in role
        return [
            statement
            for policy in role["Policies"]
            for statement in policy["PolicyDocument"]["Statement"]
        ]

    def grants(self) -> dict[str, set[str]]:
        """Action -> the resources it is allowed on."""
        grants: dict[str, set[str]] = {}
        for statement in self.statements():
            assert statement["Effect"] == "Allow"
            assert "NotAction" not in statement
            assert "NotResource" not in statement
            actions = statement["Action"]
            resources = statement["Resource"]
            for action in [actions] if isinstance(actions, str) else actions:
                for resource in [resources] if isinstance(resources, str) else resources:
                    grants.setdefault(action, set()).add(resource)
        return grants

    def environment(self) -> dict[str, str]:
        function = self.resources()["NotifierFunction"]["Properties"]
        variables: dict[str, str] = function["Environment"]["Variables"]
        return variables


def _function() -> dict[str, Any]:
    return RESOURCES["NotifierFunction"]["Properties"]  # type: ignore[no-any-return]


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
    template = json.loads(json.dumps(TEMPLATE))
    # sam deploy uploads the zip and puts its S3 location here.
    template["Resources"]["NotifierFunction"]["Properties"]["CodeUri"] = (
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
        ]
    )
    # Our own role: SAM attached no AWSLambdaSQSQueueExecutionRole (Resource "*") to it.
    assert "ManagedPolicyArns" not in resources["NotifierRole"]["Properties"]
    (mapping,) = (r for r in resources.values() if r["Type"] == "AWS::Lambda::EventSourceMapping")
    properties = mapping["Properties"]
    # The queue invokes the published version behind the alias (what SnapStart snapshots).
    (alias,) = (n for n, r in resources.items() if r["Type"] == "AWS::Lambda::Alias")
    assert properties["FunctionName"] == {"Ref": alias}
    assert properties["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert properties["ScalingConfig"] == {"MaximumConcurrency": {"Ref": "MaximumConcurrency"}}
    matches = lint(json.dumps(translated))
    assert [str(match) for match in matches] == []


# --------------------------------------------------------------------------- function


def test_function_runs_the_packaged_handler_on_python_313() -> None:
    function = _function()
    assert RESOURCES["NotifierFunction"]["Type"] == "AWS::Serverless::Function"
    assert function["Handler"] == "handler.lambda_handler"
    assert function["Runtime"] == "python3.13"
    assert function["CodeUri"] == "dist/deployment-package.zip"
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


def test_dead_letter_queue_takes_records_after_five_receives_and_keeps_them_14_days() -> None:
    stack = Stack()
    resources = stack.resources()
    queue = resources["NotificationQueue"]["Properties"]
    assert queue["RedrivePolicy"] == {
        "deadLetterTargetArn": "<GetAtt DeadLetterQueue.Arn>",
        "maxReceiveCount": "5",
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


# --------------------------------------------------------------------------- IAM


def _assert_scoped(grants: dict[str, set[str]]) -> None:
    for action, resources in grants.items():
        assert "*" not in action, action
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
    }


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
    stack = Stack(EnableIdempotency="false")
    grants = stack.grants()
    for prefix in ("dynamodb:", "secretsmanager:", "cognito-idp:", "kms:"):
        assert not [action for action in grants if action.startswith(prefix)]
    assert "IdempotencyTable" not in stack.resources()
    assert stack.environment()["IDEMPOTENCY_TABLE"] == ""


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
    placeholders = {
        "<Ref DeadLetterQueue>": f"https://sqs.{REGION}.amazonaws.com/{ACCOUNT}/dlq",
        "<Ref IdempotencyTable>": "notifier-IdempotencyTable-1",
    }
    env = {name: placeholders.get(value, value) for name, value in stack.environment().items()}
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
        required = {"SMTP_SERVER": "x", "EMAIL_FROM": "a@example.com", "ALLOWED_BUCKETS": "b"}
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


def test_snapstart_is_a_parameter_on_published_versions() -> None:
    function = _function()
    assert function["AutoPublishAlias"] == "live"
    assert function["SnapStart"] == {
        "ApplyOn": {"Fn::If": ["UseSnapStart", "PublishedVersions", "None"]}
    }
    assert PARAMETERS["EnableSnapStart"]["Default"] == "false"
