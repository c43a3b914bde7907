# onnxopt — make install | test | demo | bench | models | arm-check
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= out

.PHONY: install test test-fast demo bench bench-quick models arm-check clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,tvm]'
	touch $@

# The whole suite; tests that need ../shared or a cross toolchain skip with a reason.
test: install
	$(BIN)/python -m pytest -q -rs

test-fast: install
	$(BIN)/python -m pytest -q -rs -m "not slow"

# The main job on the bundled Fashion-MNIST model (works without ../shared).
demo: install
	mkdir -p $(OUT)
	$(BIN)/onnxopt inspect models/demo/fmnist_cnn.onnx
	$(BIN)/onnxopt compress models/demo/fmnist_cnn.onnx -o $(OUT)/fmnist_cnn_2x.onnx --speedup 2 \
	    --calib models/demo/fashion-mnist/calib --preset fashion-mnist --report $(OUT)/fmnist_cnn_2x.json
	$(BIN)/onnxopt eval models/demo/fmnist_cnn.onnx --data models/demo/fashion-mnist/test --preset fashion-mnist
	$(BIN)/onnxopt eval $(OUT)/fmnist_cnn_2x.onnx --data models/demo/fashion-mnist/test --preset fashion-mnist
	$(BIN)/onnxopt bench $(OUT)/fmnist_cnn_2x.onnx --baseline models/demo/fmnist_cnn.onnx --batch 32 --threads 1

bench: install
	$(BIN)/python benchmarks/lowrank_cifar.py --out benchmarks/results

bench-quick: install
	$(BIN)/python benchmarks/lowrank_cifar.py --quick --out $(OUT)/bench-quick

clean:
	rm -rf $(OUT) .pytest_cache

# Build a compressed model for aarch64 with TVM, run it under qemu-aarch64 in an arm64 Debian
# root (set up from package registries, cached in .cache/arm/) and compare with onnxruntime.
arm-check: install
	bash tools/install_cross_toolchains.sh
	tools/arm_check/arm_check.sh $(ARM_MODEL)
