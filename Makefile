# The two commands of the README's quick start are `make demo` and `make test`.
# VENV=/some/dir selects another virtual environment (.ci/run uses a fresh one).

VENV ?= .venv
BIN := $(VENV)/bin
# Python 3.11 with Django 5.2 LTS, for the outbox app's compatibility run.
COMPAT_VENV ?= .venv-django52
COMPAT_BIN := $(COMPAT_VENV)/bin
# The test suite's PostgreSQL; each run creates its own uniquely named database.
TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/postgres
# Debian's Chromium, where the browser test (tests/browser) looks for it.
CHROMIUM ?= /usr/bin/chromium

.PHONY: demo test test-fast chromium lint check-deploy test-postgres test-sqlite \
	test-compat mutants clean

$(BIN)/.installed: pyproject.toml
	"$$(scripts/find-python)" -m venv "$(VENV)"
	"$(BIN)/python" -m pip install --quiet --upgrade pip
	"$(BIN)/python" -m pip install --quiet --editable '.[dev,bench]'
	touch "$@"

## demo: on the embedded SQLite database, create a demo organization, invite a
## few people through the services, and run the worker that emails them
## (printed to the console). Ctrl+C stops the worker cleanly.
demo: $(BIN)/.installed
	DJANGO_DEBUG=1 "$(BIN)/python" manage.py migrate --no-input
	DJANGO_DEBUG=1 "$(BIN)/python" manage.py seed_demo
	DJANGO_DEBUG=1 "$(BIN)/python" manage.py run_outbox_worker

## test: install Chromium if it is missing, lint, type-check, check the project
## (also as deployed) and run both test suites.
test: chromium lint check-deploy test-postgres test-sqlite

## chromium: install Debian's Chromium for the browser test when it is missing:
## through apt as root; otherwise stop at once, printing the command to run.
chromium:
	scripts/install-chromium "$(CHROMIUM)"

lint: $(BIN)/.installed
	"$(BIN)/ruff" check .
	"$(BIN)/ruff" format --check .
	"$(BIN)/mypy" .
	DJANGO_DEBUG=1 "$(BIN)/python" manage.py check --fail-level WARNING
	DJANGO_DEBUG=1 "$(BIN)/python" manage.py makemigrations --check --dry-run

## check-deploy: Django's deployment checklist, warnings included, with the
## settings a production deployment sets: debug off, https, and a secret key
## made for this run (never one written down).
check-deploy: $(BIN)/.installed
	DJANGO_DEBUG=0 DJANGO_ALLOWED_HOSTS=example.com \
	DJANGO_SITE_URL=https://example.com \
	DJANGO_SECRET_KEY="$$("$(BIN)/python" -c 'import secrets; print(secrets.token_urlsafe(50))')" \
	"$(BIN)/python" manage.py check --deploy --fail-level WARNING

test-postgres: chromium $(BIN)/.installed
	DATABASE_URL="$(TEST_DATABASE_URL)" "$(BIN)/pytest" --cov --cov-report=term

test-sqlite: $(BIN)/.installed
	DATABASE_URL="sqlite://:memory:" "$(BIN)/pytest" -m sqlite

## test-fast: the PostgreSQL suite without the tests marked slow (worker
## processes, crashes, large tables), for a quick check while editing.
test-fast: $(BIN)/.installed
	DATABASE_URL="$(TEST_DATABASE_URL)" "$(BIN)/pytest" -m "not slow" -q

## mutants: apply each named broken variant in mutants/*.toml to a copy of
## the tree and check that its tests fail; exits non-zero if one survives.
mutants: $(BIN)/.installed
	DATABASE_URL="$(TEST_DATABASE_URL)" "$(BIN)/python" mutants/run.py

## test-compat: the outbox app's tests on Python 3.11 and Django 5.2 LTS. The
## task backend's tests are left out: django.tasks arrived in Django 6.0, and
## outbox.tasks needs it (the rest of the app does not). So are the tracing
## and relay tests: OpenTelemetry and the brokers' clients are not installed
## there, which shows the app runs without them
## (tests/outbox/test_without_opentelemetry.py).
test-compat: $(COMPAT_BIN)/.installed
	DATABASE_URL="$(TEST_DATABASE_URL)" "$(COMPAT_BIN)/pytest" tests/outbox \
		--ds=tests.settings_outbox \
		--ignore=tests/outbox/test_tasks.py \
		--ignore=tests/outbox/test_tasks_processes.py \
		--ignore=tests/outbox/test_tracing.py \
		--ignore=tests/outbox/test_relays.py

$(COMPAT_BIN)/.installed: pyproject.toml
	"$$(scripts/find-python 3.11)" -m venv "$(COMPAT_VENV)"
	"$(COMPAT_BIN)/python" -m pip install --quiet --upgrade pip
	"$(COMPAT_BIN)/python" -m pip install --quiet --group outbox-django52
	touch "$@"

clean:
	rm -rf "$(VENV)" "$(COMPAT_VENV)" db.sqlite3 .coverage .mypy_cache .ruff_cache
