# onnxopt — make install | test | demo | bench | models | arm-check
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= out

.PHONY: install test test-fast fuzz demo bench bench-quick models arm-check clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,tvm,reconstruct]'
	touch $@

# The whole suite; tests that need ../shared or a cross toolchain skip with a reason.
test: install
	$(BIN)/python -m pytest -q -rs

test-fast: install
	$(BIN)/python -m pytest -q -rs -m "not slow"

# The fuzzer with many random examples (CI runs a derandomized 304); tests/robustness/test_fuzz.py.
fuzz: install
	HYPOTHESIS_PROFILE=fuzz nice -n 10 $(BIN)/python -m pytest -q -rs tests/robustness/test_fuzz.py --hypothesis-show-statistics

# The main job on the bundled Fashion-MNIST model (works without ../shared).
demo: install
	mkdir -p $(OUT)
	$(BIN)/onnxopt inspect models/demo/fmnist_cnn.onnx
	$(BIN)/onnxopt compress models/demo/fmnist_cnn.onnx -o $(OUT)/fmnist_cnn_2x.onnx --speedup 2 \
	    --calib models/demo/fashion-mnist/calib --preset fashion-mnist --report $(OUT)/fmnist_cnn_2x.json
	$(BIN)/onnxopt eval models/demo/fmnist_cnn.onnx --data models/demo/fashion-mnist/test --preset fashion-mnist
	$(BIN)/onnxopt eval $(OUT)/fmnist_cnn_2x.onnx --data models/demo/fashion-mnist/test --preset fashion-mnist
	$(BIN)/onnxopt bench $(OUT)/fmnist_cnn_2x.onnx --baseline models/demo/fmnist_cnn.onnx --batch 32 --threads 1

# The full runs (hours on 2 cores; results committed in benchmarks/results/).
bench: install
	$(BIN)/python benchmarks/harness.py --out benchmarks/results
	$(BIN)/python benchmarks/lowrank_cifar.py --out benchmarks/results
	$(BIN)/python benchmarks/allocation.py --out benchmarks/results
	$(BIN)/python benchmarks/prune_bench.py --out benchmarks/results
	$(BIN)/python benchmarks/avx2_instructions.py --out benchmarks/results

bench-quick: install
	$(BIN)/python benchmarks/harness.py --quick --out $(OUT)/bench-quick
	$(BIN)/python benchmarks/lowrank_cifar.py --quick --out $(OUT)/bench-quick
	$(BIN)/python benchmarks/prune_bench.py --quick --out $(OUT)/bench-quick

clean:
	rm -rf $(OUT) .pytest_cache

# Build a compressed model for aarch64 with TVM, run it under qemu-aarch64 in an arm64 Debian
# root (set up from package registries, cached in .cache/arm/) and compare with onnxruntime.
arm-check: install
	bash tools/install_cross_toolchains.sh
	tools/arm_check/arm_check.sh $(ARM_MODEL)

# Retrain the project's own models (PyTorch in a separate venv; CPU, one thread, seed 0).
# The VGG-16 needs ../shared/data/cifar10; about 100 minutes on 2 cores.
MODELS_VENV := .venv-models
models:
	command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && apt-get install -y dataset-fashion-mnist || true
	$(PYTHON) -m venv $(MODELS_VENV)
	$(MODELS_VENV)/bin/pip install --quiet torch==2.13.0 onnx==1.23.2 onnxruntime==1.31.1 onnxscript numpy pillow
	nice -n 19 $(MODELS_VENV)/bin/python models/train_demo_fmnist.py
	nice -n 19 $(MODELS_VENV)/bin/python models/train_vgg16_cifar.py
	nice -n 19 $(MODELS_VENV)/bin/python models/train_vgg16_cifar.py --init .cache/vgg16_cifar10_w0.25.pt --schedule cosine \
	    --lr 0.004 --epochs 4 --seed 1 --append-log --checkpoint .cache/vgg16_cifar10_w0.25_ft.pt
	nice -n 19 $(MODELS_VENV)/bin/python models/train_vgg16_cifar.py --init models/vgg16_cifar10.onnx --schedule cosine \
	    --lr 0.004 --epochs 4 --seed 2 --append-log --checkpoint .cache/vgg16_cifar10_w0.25_ft2.pt
