# ProCrop: `make demo` and `make test` set everything up on first use.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.bootstrapped

.PHONY: setup demo test test-fast lint format bench lite-model cv clean

$(STAMP): pyproject.toml scripts/bootstrap.sh
	./scripts/bootstrap.sh
	@touch $(STAMP)

setup: $(STAMP)  ## create .venv with everything

demo: $(STAMP)  ## the main job on real sample photos
	$(VENV)/bin/procrop demo

test: $(STAMP)  ## the whole test suite (starts its own S3 server and Milvus Lite)
	$(PY) -m pytest

test-fast: $(STAMP)  ## tests without the slow ones
	$(PY) -m pytest -m "not slow and not weights"

LITE_HOME := runs/lite-home
lite-model: $(STAMP)  ## retrain the shipped lite model and its index from FCDB (~30 min, 2 CPU cores)
	PROCROP_HOME=$(LITE_HOME) $(VENV)/bin/procrop train --config configs/lite.toml
	rm -rf procrop/models/lite
	PROCROP_HOME=$(LITE_HOME) $(VENV)/bin/procrop bundle runs/lite/last --collection fcdb_train_effnet \
		--relations runs/lite/relations.json --out procrop/models/lite
	$(PY) scripts/record_crops.py

cv: $(STAMP)  ## 5-fold cross-validation of the crop models on FCDB train (JSON table)
	$(PY) -m benchmarks.cv_crop_models

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy shared services procrop

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)  ## every benchmark; each prints JSON
	$(PY) -m benchmarks.bench_lite_encoder
	$(PY) -m benchmarks.bench_retrieval
	$(PY) -m benchmarks.bench_ingest
	$(PY) -m benchmarks.eval_knn_transfer
	$(PY) -m benchmarks.eval_crop_models
	$(PY) -m benchmarks.bench_crop_speed
	$(PY) -m benchmarks.bench_stack

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache *.egg-info
