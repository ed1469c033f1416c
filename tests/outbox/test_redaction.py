"""Error texts keep no personal data: outbox/redaction.py, where they are kept.

The handlers raise what real code raises: smtplib's SMTPRecipientsRefused
(a dict of the refused addresses) and PostgreSQL's unique violation (its
DETAIL line quotes the duplicate value), run through the worker's own path.
"""

import json
import logging
import smtplib
import threading
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.db import IntegrityError, transaction

from outbox import publish
from outbox.handling import Outcome, Run
from outbox.leases import Leases
from outbox.models import OutboxEvent, Status
from outbox.redaction import redact
from outbox.slots import ThreadedSlots
from outbox.worker import Worker

ADDRESS = "alice.o+ops@example.com"
DETAIL = f"DETAIL:  Key (email)=({ADDRESS}) already exists."


def refuse_recipients(event: OutboxEvent) -> None:
    raise smtplib.SMTPRecipientsRefused(
        {ADDRESS: (550, f"5.1.1 <{ADDRESS}>: Recipient address rejected".encode())}
    )


def create_the_same_user_twice(event: OutboxEvent) -> None:
    user_model = get_user_model()
    for _ in range(2):
        user_model.objects.create_user(
            **{user_model.USERNAME_FIELD: ADDRESS}, password="a-long-password-1"
        )


def stored_texts(event: OutboxEvent) -> str:
    event.refresh_from_db()
    return event.last_error + json.dumps(event.history)


def logged_texts(caplog: pytest.LogCaptureFixture) -> str:
    """Every record as formatted, and everything it carries besides."""
    return caplog.text + "".join(repr(vars(record)) for record in caplog.records)


@pytest.mark.sqlite
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            f"{{'{ADDRESS}': (550, b'5.1.1 <{ADDRESS}>: Recipient address rejected')}}",
            "{'<email>': (550, b'5.1.1 <<email>>: Recipient address rejected')}",
        ),
        (
            f'duplicate key value violates unique constraint "users_email"\n{DETAIL}',
            'duplicate key value violates unique constraint "users_email"\n'
            "DETAIL: <redacted>",
        ),
        (
            f'invalid input syntax for type integer: "{ADDRESS}"\n'
            f"LINE 1: SELECT '{ADDRESS}'::int\n"
            "               ^\n"
            "HINT:  Cast it.",
            'invalid input syntax for type integer: "<email>"\n'
            "LINE 1: <redacted>\n"
            "HINT:  Cast it.",
        ),
        (
            "invalid input syntax for type json\n"
            'DETAIL:  Token "NaN" is invalid.\n'
            'CONTEXT:  JSON data, line 1: {"secret": "x", NaN...\n'
            "unnamed portal parameter $1 = '{\"secret\": ...}'",
            "invalid input syntax for type json\n"
            "DETAIL: <redacted>\n"
            "CONTEXT: <redacted>",
        ),
        ("lease expired: worker 'host-1'", "lease expired: worker 'host-1'"),
        ("smtp down\nretry later", "smtp down\nretry later"),
    ],
    ids=["smtp", "unique-violation", "query-text", "json-context", "plain", "lines"],
)
def test_redact__replaces_addresses_and_the_values_postgresql_quotes(
    text, expected
) -> None:
    assert redact(text) == expected


@pytest.mark.sqlite
def test_redact__keeps_the_traceback_around_a_database_error() -> None:
    traceback = (
        "Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n'
        f"psycopg.errors.UniqueViolation: duplicate key\n{DETAIL}\n"
        "\n"
        "The above exception was the direct cause of the following exception:\n"
        "\n"
        "Traceback (most recent call last):\n"
        f"django.db.utils.IntegrityError: duplicate key\n{DETAIL}"
    )

    redacted = redact(traceback)

    assert ADDRESS not in redacted
    assert redacted.count("DETAIL: <redacted>") == 2
    assert "The above exception was the direct cause" in redacted
    assert redacted.count("Traceback (most recent call last):") == 2


@pytest.mark.sqlite
@pytest.mark.django_db
def test_smtp_refusal__stores_no_address_in_the_error_or_the_history(
    register_handler, caplog
) -> None:
    register_handler("mail.send", refuse_recipients)
    event = publish("mail.send", {})

    result = Worker(worker_id="w").run_once()

    assert result.retried == 1
    event.refresh_from_db()
    assert event.last_error == (
        "smtplib.SMTPRecipientsRefused: "
        "{'<email>': (550, b'5.1.1 <<email>>: Recipient address rejected')}"
    )
    assert event.history[-1]["error"] == "smtplib.SMTPRecipientsRefused"
    assert ADDRESS not in stored_texts(event)
    assert "SMTPRecipientsRefused" in caplog.text
    assert ADDRESS not in logged_texts(caplog)


def quote_a_bad_byte(event: OutboxEvent) -> None:
    raise ValueError("bad byte \x00 and half a pair \ud800 in the input")


@pytest.mark.sqlite
@pytest.mark.django_db
def test_error_message_postgresql_cannot_store__is_kept_escaped_and_the_batch_goes_on(
    register_handler,
) -> None:
    # A NUL or a lone surrogate in the message failed the statement that
    # records the batch's outcomes, and with it every turn after.
    register_handler("input.parse", quote_a_bad_byte)
    register_handler("input.fine", lambda event: None)
    bad = publish("input.parse", {})
    good = publish("input.fine", {})

    result = Worker(worker_id="w", batch_size=10).run_once()

    assert (result.retried, result.completed) == (1, 1)
    bad.refresh_from_db()
    good.refresh_from_db()
    assert good.status == Status.COMPLETED
    assert bad.last_error == (
        "ValueError: bad byte \\x00 and half a pair \\ud800 in the input"
    )
    assert bad.history[-1]["message"] == bad.last_error.split(": ", 1)[1]


@pytest.mark.django_db
def test_unique_violation__stores_no_detail_line_in_the_error_or_the_history(
    register_handler, caplog
) -> None:
    register_handler("user.create", create_the_same_user_twice)
    event = publish("user.create", {}, max_attempts=1)

    result = Worker(worker_id="w").run_once()

    assert result.failed == 1
    event.refresh_from_db()
    assert event.status == Status.FAILED
    assert event.last_error.startswith(
        "django.db.utils.IntegrityError: duplicate key value violates unique constraint"
    )
    assert event.last_error.endswith("\nDETAIL: <redacted>")
    assert event.history[-1]["message"] == event.last_error.split(": ", 1)[1]
    stored = stored_texts(event)
    assert ADDRESS not in stored
    assert "Key (" not in stored
    assert ADDRESS not in logged_texts(caplog)
    assert not get_user_model().objects.exists()  # the handler's writes are gone


@pytest.fixture
def real_unique_violation(django_user_model) -> IntegrityError:
    """A unique violation as PostgreSQL reports it, with its DETAIL line."""
    fields = {django_user_model.USERNAME_FIELD: ADDRESS}
    django_user_model.objects.create_user(**fields, password="a-long-password-1")
    try:
        with transaction.atomic():
            django_user_model.objects.create_user(**fields, password="x")
    except IntegrityError as error:
        assert ADDRESS in str(error)  # the point of the test
        return error
    raise AssertionError("no unique violation")


@pytest.mark.django_db
def test_failed_turn__logs_its_traceback_redacted(
    real_unique_violation, monkeypatch, caplog
) -> None:
    worker = Worker(worker_id="w")
    turns = iter([real_unique_violation])

    def run_due() -> list:
        for error in turns:
            raise error
        return []

    monkeypatch.setattr(worker.maintenance, "run_due", run_due)

    worker.run(drain=True, survive_errors=True)

    [failed] = [record for record in caplog.records if record.exc_info]
    assert failed.getMessage().startswith("outbox tick failed")
    assert "IntegrityError: duplicate key value" in caplog.text
    assert "DETAIL: <redacted>" in caplog.text
    assert ADDRESS not in caplog.text


@pytest.mark.sqlite
@pytest.mark.django_db(transaction=True)  # the slot checks its connection after
def test_failed_slot__logs_its_traceback_redacted(monkeypatch, caplog) -> None:
    error = IntegrityError(f"duplicate key value\n{DETAIL}")

    def start_one(*args, **kwargs):
        raise error

    monkeypatch.setattr("outbox.slots.start_one", start_one)
    slots = ThreadedSlots(
        0,  # no threads: the test calls the slot's body itself
        execute=lambda event: Run(event, Outcome.COMPLETED),
        leases=Leases(using="default", duration=timedelta(seconds=1)),
        using="default",
        stopping=threading.Event(),
        on_finish=lambda: None,
    )

    with caplog.at_level(logging.ERROR):
        slots._run(OutboxEvent(pk=1, event_type="x", attempts=1))

    assert "outbox slot failed around event 1" in caplog.text
    assert "DETAIL: <redacted>" in caplog.text
    assert ADDRESS not in caplog.text
