# The two commands of the README. Each creates .venv and installs vlprompt into it on first use
# (again whenever pyproject.toml changes).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
STAMP  := $(VENV)/.installed

.PHONY: quickstart test lint clean-venv

quickstart: $(STAMP)
	$(VENV)/bin/python experiments/benchmark.py

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), f"vlprompt needs Python 3.11, {sys.executable} is {sys.version.split()[0]}"'
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	@echo "installing vlprompt and its dependencies into $(VENV) (torch and ray are large: a few minutes on a fresh machine)"
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

clean-venv:
	rm -rf $(VENV)
