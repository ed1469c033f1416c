import pytest
from django.core.exceptions import ImproperlyConfigured

from outbox import handler, registry


def first(event) -> None:
    """A handler."""


def second(event) -> None:
    """Another handler."""


@pytest.fixture(autouse=True)
def forget():
    yield
    registry.unregister("thing.done")


def test_handler__registers_and_returns_the_function() -> None:
    assert handler("thing.done", max_attempts=3)(first) is first

    registered = registry.get_handler("thing.done")
    assert registered is not None
    assert registered.function is first
    assert registered.max_attempts == 3
    assert registered.path == "tests.outbox.test_registry.first"


def test_handler__a_second_handler_for_a_type_names_both() -> None:
    handler("thing.done")(first)

    with pytest.raises(ImproperlyConfigured) as raised:
        handler("thing.done")(second)

    assert "tests.outbox.test_registry.first" in str(raised.value)
    assert "tests.outbox.test_registry.second" in str(raised.value)


def test_handler__registering_the_same_function_again_is_harmless() -> None:
    handler("thing.done")(first)
    handler("thing.done")(first)

    registered = registry.get_handler("thing.done")
    assert registered is not None
    assert registered.function is first


@pytest.mark.parametrize(
    ("arguments", "message"),
    [(("",), "non-empty"), (("x",), "at least 1")],
)
def test_handler__rejects_bad_arguments(arguments, message) -> None:
    with pytest.raises(ValueError, match=message):
        handler(*arguments, max_attempts=0 if arguments[0] else None)


def test_autodiscover__imports_each_apps_handlers_module() -> None:
    registered = registry.get_handler("outbox_testapp.discovered")

    assert registered is not None
    assert registered.path == "tests.outbox_app.handlers.record_discovery"
