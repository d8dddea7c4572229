"""A local AWS cloud for developers: ``flask cloudmail dev-aws``.

It starts moto's server on loopback, creates what ``lambda/template.yaml`` creates
that the path needs (the batch queue and its dead-letter queue, the DynamoDB
idempotency table, a verified SES sender), and runs :class:`SqsPoller`, which feeds
received SQS messages to ``lambda/lambda_handler.py`` the way Lambda's SQS event
source does. A job then goes the whole AWS path on one machine:

    app -> RQ worker -> AwsConnector -> SQS -> poller -> handler -> SES -> report -> app

The pieces are plain functions and one class, so the tests drive the same code.
moto is a development dependency (``pip install "moto[server]"``); it is imported
only when a local cloud is started.
"""

from __future__ import annotations

import base64
import importlib.util
import logging
import os
import secrets
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import parseaddr
from pathlib import Path
from types import ModuleType
from typing import Any

import boto3
import click
from botocore.config import Config
from flask import current_app

logger = logging.getLogger(__name__)

#: The handler in a source checkout (``lambda/`` is not part of the wheel).
DEFAULT_HANDLER = (
    Path(__file__).resolve().parent.parent / "lambda" / "lambda_handler.py"
)

#: moto accepts any credentials; these never leave the machine.
FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}

Handler = Callable[[dict[str, Any], Any], Any]


# -- the cloud -------------------------------------------------------------------------


@dataclass(frozen=True)
class DevResources:
    """What :func:`provision` created on the local cloud."""

    endpoint_url: str
    region: str
    queue_url: str
    queue_arn: str
    dead_letter_url: str
    table: str
    sender: str


def start_moto(host: str = "127.0.0.1", port: int = 0) -> tuple[Any, str]:
    """Start moto's ``ThreadedMotoServer``; return it and its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(
        ip_address=host, port=port or _free_port(host), verbose=False
    )
    server.start()
    bound_host, bound_port = server.get_host_and_port()
    return server, f"http://{bound_host}:{bound_port}"


def client(service: str, endpoint_url: str, region: str, **config: Any) -> Any:
    """A boto3 client for the local cloud (fake credentials, never real AWS)."""
    return boto3.session.Session().client(
        service,
        region_name=region,
        endpoint_url=endpoint_url,
        aws_access_key_id=FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        config=Config(**config) if config else None,
    )


def provision(
    endpoint_url: str,
    *,
    region: str = "us-east-1",
    queue_name: str = "cloudmail-batches",
    table: str = "cloudmail-idempotency",
    sender: str = "news@example.com",
    visibility_timeout: int = 60,
    max_receive_count: int = 5,
) -> DevResources:
    """Create the queue with its dead-letter queue, the table and the SES sender.

    ``queue_name`` ending in ``.fifo`` makes both queues FIFO. Existing resources
    with the same names are reused.
    """
    sqs = client("sqs", endpoint_url, region)
    fifo = queue_name.endswith(".fifo")
    fifo_attributes = {"FifoQueue": "true"} if fifo else {}

    # 1. The dead-letter queue, then the batch queue that redrives to it.
    dlq_name = queue_name.removesuffix(".fifo") + "-dlq" + (".fifo" if fifo else "")
    dlq_url = sqs.create_queue(QueueName=dlq_name, Attributes=fifo_attributes)[
        "QueueUrl"
    ]
    dlq_arn = _queue_arn(sqs, dlq_url)
    redrive = (
        f'{{"deadLetterTargetArn":"{dlq_arn}","maxReceiveCount":"{max_receive_count}"}}'
    )
    queue_url = sqs.create_queue(
        QueueName=queue_name,
        Attributes={
            "VisibilityTimeout": str(visibility_timeout),
            "RedrivePolicy": redrive,
            **fifo_attributes,
        },
    )["QueueUrl"]

    # 2. The idempotency table, shaped as in lambda/template.yaml.
    dynamodb = client("dynamodb", endpoint_url, region)
    if table not in dynamodb.list_tables()["TableNames"]:
        dynamodb.create_table(
            TableName=table,
            AttributeDefinitions=[
                {"AttributeName": "idempotency_key", "AttributeType": "S"}
            ],
            KeySchema=[{"AttributeName": "idempotency_key", "KeyType": "HASH"}],
            BillingMode="PAY_PER_REQUEST",
        )
        dynamodb.update_time_to_live(
            TableName=table,
            TimeToLiveSpecification={"Enabled": True, "AttributeName": "expires_at"},
        )

    # 3. SES only sends from a verified identity.
    client("ses", endpoint_url, region).verify_email_identity(EmailAddress=sender)

    return DevResources(
        endpoint_url=endpoint_url,
        region=region,
        queue_url=queue_url,
        queue_arn=_queue_arn(sqs, queue_url),
        dead_letter_url=dlq_url,
        table=table,
        sender=sender,
    )


def lambda_environment(
    resources: DevResources, report_secret: str, **extra: str
) -> dict[str, str]:
    """The environment the Lambda function gets from ``lambda/template.yaml``."""
    return {
        **FAKE_CREDENTIALS,
        "AWS_DEFAULT_REGION": resources.region,
        "CLOUDMAIL_AWS_ENDPOINT_URL": resources.endpoint_url,
        "CLOUDMAIL_IDEMPOTENCY_TABLE": resources.table,
        "CLOUDMAIL_REPORT_SECRET": report_secret,
        **extra,
    }


def load_handler(
    path: str | os.PathLike[str] = DEFAULT_HANDLER, environment: Mapping[str, str] = {}
) -> ModuleType:
    """Load ``lambda_handler.py`` by path, after setting its environment.

    Like Lambda, the module reads its settings from ``os.environ``, and its clients
    are created at import, so the environment is set first (in this process).
    """
    path = Path(path)
    if not path.is_file():
        raise click.ClickException(
            f"The Lambda handler {str(path)!r} does not exist; run dev-aws from a "
            "cloudmail checkout or pass --handler path/to/lambda_handler.py."
        )
    os.environ.update(environment)
    spec = importlib.util.spec_from_file_location("lambda_handler", path)
    if spec is None or spec.loader is None:
        raise click.ClickException(
            f"{str(path)!r} cannot be loaded as a Python module."
        )
    module = importlib.util.module_from_spec(spec)
    # dataclasses resolve the module's string annotations through sys.modules.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# -- the poller ------------------------------------------------------------------------


class LambdaContext:
    """The parts of Lambda's context object the handler uses."""

    def __init__(
        self, timeout_seconds: float, function_name: str = "cloudmail-dev"
    ) -> None:
        self.function_name = function_name
        self.aws_request_id = str(uuid.uuid4())
        self.memory_limit_in_mb = 256
        self._deadline = time.monotonic() + timeout_seconds

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


@dataclass
class PollStats:
    """Running totals of a :class:`SqsPoller`."""

    invocations: int = 0
    received: int = 0
    deleted: int = 0
    handed_back: int = 0
    errors: int = 0


class SqsPoller:
    """Receives SQS messages and invokes a handler as Lambda's event source does.

    Each invocation gets up to ``batch_size`` records in Lambda's event shape and a
    context whose time runs out after ``timeout_seconds``. With
    ``ReportBatchItemFailures`` semantics, records named in ``batchItemFailures``
    stay on the queue and come back after the visibility timeout, the others are
    deleted; a handler that raises, or names a record that was not in the batch,
    fails the whole batch. Messages received too often go to the dead-letter queue
    through the queue's own redrive policy.
    """

    def __init__(
        self,
        sqs: Any,
        queue_url: str,
        handler: Handler,
        *,
        region: str,
        queue_arn: str | None = None,
        batch_size: int = 10,
        wait_seconds: int = 1,
        timeout_seconds: float = 60,
    ) -> None:
        self.sqs = sqs
        self.queue_url = queue_url
        self.handler = handler
        self.region = region
        self.queue_arn = queue_arn or _queue_arn(sqs, queue_url)
        self.batch_size = batch_size
        self.wait_seconds = wait_seconds
        self.timeout_seconds = timeout_seconds
        self.stats = PollStats()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll_once(self) -> int:
        """Receive one batch and invoke the handler with it; return how many records."""
        messages = self.sqs.receive_message(
            QueueUrl=self.queue_url,
            MaxNumberOfMessages=self.batch_size,
            WaitTimeSeconds=self.wait_seconds,
            MessageSystemAttributeNames=["All"],
            MessageAttributeNames=["All"],
        ).get("Messages", [])
        if not messages:
            return 0

        self.stats.received += len(messages)
        self.stats.invocations += 1
        records = [self.record(message) for message in messages]
        failed = self._invoke(records)
        done = [m for m in messages if m["MessageId"] not in failed]
        self._delete(done)
        self.stats.handed_back += len(messages) - len(done)
        return len(messages)

    def record(self, message: Mapping[str, Any]) -> dict[str, Any]:
        """One SQS message as a record of Lambda's SQS event."""
        return {
            "messageId": message["MessageId"],
            "receiptHandle": message["ReceiptHandle"],
            "body": message["Body"],
            "attributes": dict(message.get("Attributes", {})),
            "messageAttributes": {
                name: _event_attribute(value)
                for name, value in message.get("MessageAttributes", {}).items()
            },
            "md5OfBody": message.get("MD5OfBody", ""),
            "eventSource": "aws:sqs",
            "eventSourceARN": self.queue_arn,
            "awsRegion": self.region,
        }

    def _invoke(self, records: list[dict[str, Any]]) -> set[str]:
        """Call the handler; return the message ids that must stay on the queue."""
        ids = {r["messageId"] for r in records}
        context = LambdaContext(self.timeout_seconds)
        try:
            answer = self.handler({"Records": records}, context)
        except Exception:
            self.stats.errors += 1
            logger.error(
                "Poller: the handler raised; %d records stay", len(ids), exc_info=True
            )
            return ids

        failures = (
            (answer or {}).get("batchItemFailures", [])
            if isinstance(answer, dict)
            else []
        )
        named = {str((f or {}).get("itemIdentifier") or "") for f in failures}
        if not named <= ids:
            # Lambda treats an unknown or empty itemIdentifier as a failed batch.
            logger.error("Poller: batchItemFailures names unknown records; all stay")
            return ids
        return named

    def _delete(self, messages: list[Mapping[str, Any]]) -> None:
        for start in range(0, len(messages), 10):
            chunk = messages[start : start + 10]
            answer = self.sqs.delete_message_batch(
                QueueUrl=self.queue_url,
                Entries=[
                    {"Id": str(n), "ReceiptHandle": m["ReceiptHandle"]}
                    for n, m in enumerate(chunk)
                ],
            )
            self.stats.deleted += len(answer.get("Successful", []))
            for failure in answer.get("Failed", []):
                logger.warning(
                    "Poller: cannot delete a message: %s", failure.get("Message")
                )

    def run(self) -> None:
        """Poll until :meth:`stop` is called."""
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception:
                self.stats.errors += 1
                logger.error("Poller: receiving failed; trying again", exc_info=True)
                self._stop.wait(1)

    def start(self) -> SqsPoller:
        """Run :meth:`run` in a daemon thread."""
        self._thread = threading.Thread(
            target=self.run, name="cloudmail-sqs-poller", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop polling and wait for the current invocation to finish."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def _event_attribute(value: Mapping[str, Any]) -> dict[str, Any]:
    # Lambda's records spell SQS's message attributes in camelCase, binary as base64.
    binary = value.get("BinaryValue")
    return {
        "stringValue": value.get("StringValue"),
        "binaryValue": base64.b64encode(binary).decode()
        if binary is not None
        else None,
        "stringListValues": list(value.get("StringListValues", [])),
        "binaryListValues": [
            base64.b64encode(b).decode() for b in value.get("BinaryListValues", [])
        ],
        "dataType": value.get("DataType", "String"),
    }


def _queue_arn(sqs: Any, queue_url: str) -> str:
    return sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def new_report_secret() -> str:
    """A fresh ``whsec_...`` secret for signing reports."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


# -- the command -----------------------------------------------------------------------


@click.command("dev-aws")
@click.option("--port", default=4566, show_default=True, help="Port of moto's server.")
@click.option(
    "--queue",
    "queue_name",
    default="cloudmail-batches",
    show_default=True,
    help="Queue name; end it with .fifo for a FIFO queue.",
)
@click.option(
    "--callback-url",
    help="Where the handler posts reports "
    "[default: CLOUDMAIL_CALLBACK_URL, else http://127.0.0.1:5000/...].",
)
@click.option(
    "--timeout",
    "timeout_seconds",
    default=60,
    show_default=True,
    help="Seconds each handler invocation may take (Lambda's timeout).",
)
@click.option(
    "--handler",
    "handler_path",
    default=str(DEFAULT_HANDLER),
    type=click.Path(dir_okay=False),
    help="Path of lambda_handler.py.",
)
def dev_aws_command(
    port: int,
    queue_name: str,
    callback_url: str | None,
    timeout_seconds: int,
    handler_path: str,
) -> None:
    """Run a local AWS cloud (moto, SQS, SES, the Lambda) until Ctrl-C."""
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    sender = (
        parseaddr(app.config.get("CLOUDMAIL_SENDER") or "")[1] or "news@example.com"
    )
    configured = app.config.get("CLOUDMAIL_REPORT_SECRETS") or []
    if isinstance(configured, str):
        configured = configured.split()
    report_secret = configured[0] if configured else new_report_secret()
    callback_url = (
        callback_url
        or app.config.get("CLOUDMAIL_CALLBACK_URL")
        or "http://127.0.0.1:5000/cloudmail/callback/report"
    )

    # 1. The cloud, and what the template would create in it. moto's server logs
    # every request through werkzeug's logger; the poller's summary says enough.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server, endpoint_url = start_moto(port=port)
    resources = provision(
        endpoint_url,
        queue_name=queue_name,
        sender=sender,
        visibility_timeout=max(2 * timeout_seconds, 30),
    )

    # 2. The function, with its environment, and its event source.
    safety_ms = min(15000, timeout_seconds * 250)
    handler = load_handler(
        handler_path,
        lambda_environment(
            resources, report_secret, CLOUDMAIL_SAFETY_MARGIN_MS=str(safety_ms)
        ),
    )
    sqs = client("sqs", endpoint_url, resources.region)
    poller = SqsPoller(
        sqs,
        resources.queue_url,
        handler.handler,
        region=resources.region,
        queue_arn=resources.queue_arn,
        timeout_seconds=timeout_seconds,
    )

    click.echo(_instructions(resources, callback_url, report_secret, bool(configured)))
    poller.start()
    try:
        while True:
            time.sleep(5)
            stats = poller.stats
            if stats.invocations:
                click.echo(
                    f"poller: {stats.invocations} invocations, {stats.received} "
                    f"received, {stats.deleted} done, {stats.handed_back} handed back"
                )
    except KeyboardInterrupt:
        click.echo("Stopping the local cloud.")
    finally:
        poller.stop()
        server.stop()


def _instructions(
    resources: DevResources, callback_url: str, secret: str, secret_configured: bool
) -> str:
    exports = {
        "CLOUDMAIL_PROVIDER": "aws",
        "CLOUDMAIL_AWS_QUEUE_URL": resources.queue_url,
        "CLOUDMAIL_AWS_ENDPOINT_URL": resources.endpoint_url,
        "CLOUDMAIL_AWS_REGION": resources.region,
        "CLOUDMAIL_CALLBACK_URL": callback_url,
        "CLOUDMAIL_REPORT_SECRETS": secret,
        "CLOUDMAIL_SENDER": resources.sender,
        **FAKE_CREDENTIALS,
    }
    lines = [
        f"Local AWS cloud (moto) at {resources.endpoint_url}",
        f"  queue        {resources.queue_url}",
        f"  dead letters {resources.dead_letter_url}",
        f"  table        {resources.table}",
        f"  SES sender   {resources.sender} (verified)",
        f"  mail sent    {resources.endpoint_url}/moto-api/data.json (ses.RawMessage)",
        "",
        "In the shells that run the app and the worker, set:",
        *(f"  export {key}='{value}'" for key, value in exports.items()),
        "",
        "then, e.g.:",
        "  flask --app wsgi run --port 5000 &",
        "  flask --app wsgi cloudmail worker &     # with CLOUDMAIL_REDIS_URL set",
        "  flask --app wsgi cloudmail send --recipients examples/data/moodle_users_5k.csv \\",
        "      --subject 'Hello {{ name }}' --html examples/welcome.html",
        "",
        "Polling the queue for the Lambda handler; Ctrl-C stops.",
    ]
    if not secret_configured:
        lines.insert(6, "  (a new report secret was generated; the app must use it)")
    return "\n".join(lines)
