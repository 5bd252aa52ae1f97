PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install run lint test fuzz bench reproduce clean

# Re-installs only when pyproject.toml changes; torch==2.13.0 is the CPU wheel already on these machines.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/pruneaudit serve --demo

# The browser test (tests/integration/test_report_browser.py) drives Debian's chromium. Installed once, as root,
# only when missing: the target is the binary itself, so later runs of `make test` do nothing here.
CHROMIUM := /usr/bin/chromium

$(CHROMIUM):
	DEBIAN_FRONTEND=noninteractive apt-get install -y chromium \
		|| { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; }

# tests/unit/test_deploy_files.py validates docker-compose.yml offline with Debian's docker-compose (1.29).
DOCKER_COMPOSE := /usr/bin/docker-compose

$(DOCKER_COMPOSE):
	DEBIAN_FRONTEND=noninteractive apt-get install -y docker-compose \
		|| { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y docker-compose; }

# Type-checked packages; arch/ and results/ arrive with the redesign, and $(wildcard) keeps `make lint`
# working on a tree that does not have them yet.
MYPY_PATHS := $(wildcard service worker arch results)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy $(MYPY_PATHS)

# lint first: its prerequisites and recipe finish before pytest starts.
test: lint $(CHROMIUM) $(DOCKER_COMPOSE)
	$(BIN)/python -m pytest -q

# The upload readers fuzzed at length (tests/unit/test_ingest_fuzz.py: 20,000 examples each, a few minutes;
# `make test` runs 300 of each). Failing examples are kept in .hypothesis/ and replayed first.
fuzz: $(STAMP)
	PRUNEAUDIT_FUZZ_PROFILE=ingest-fuzz $(BIN)/python -m pytest -q tests/unit/test_ingest_fuzz.py

# Every figure, each in its own process; NAME=<figure> runs one alone (python -m bench --list names them);
# SMOKE=1: tiny sizes, a check that the figures run (numbers meaningless).
bench: $(STAMP)
	$(BIN)/python -m bench $(if $(SMOKE),--smoke) $(NAME)

REPRODUCE_STAMP := $(VENV)/.reproduce-stamp

$(REPRODUCE_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,reproduce]'
	touch $(REPRODUCE_STAMP)

# docs/REPRODUCTION.md: the paper's findings re-measured (3 data sets × 5 seeds; a few minutes on 2 cores).
reproduce: $(REPRODUCE_STAMP)
	$(BIN)/python -m reproduce --out docs/REPRODUCTION.md

clean:
	rm -rf $(VENV) var
