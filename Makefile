# The two commands a new user runs: `make demo` (only Python needed) and `make test` (the stack).
.PHONY: venv demo stack test lint clean

VENV := .venv
BIN := $(VENV)/bin

venv:
	scripts/stack install-python

demo: venv
	$(BIN)/lethe demo

# The same story on the running stack (`make stack` first), with all five kinds of system.
.PHONY: demo-stack
demo-stack: venv
	if [ -f .stack/env ]; then . ./.stack/env; fi; $(BIN)/lethe demo --stack

# The embedded demo, then kept running behind the web console, with a token for the demo DPO.
.PHONY: demo-serve
demo-serve: venv
	$(BIN)/lethe demo --serve

stack:
	scripts/stack install
	scripts/stack up

test: stack
	$(BIN)/pytest

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .
	$(BIN)/lint-imports

clean:
	scripts/stack down
	rm -rf .stack .lethe
