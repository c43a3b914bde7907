"""Runs INSIDE the emulated arm64 Python: load an aarch64 model.so, run it, save the outputs.

    python3.11 run.py model.so inputs.npz outputs.npz

inputs.npz holds in0, in1, ... in graph order; outputs.npz gets out0, out1, ... Only the TVM
runtime is used (no compiler, no onnxopt).
"""

import sys
import time

import numpy as np

start = time.perf_counter()
import tvm  # noqa: E402
from tvm import relax  # noqa: E402

imported = time.perf_counter()
library, inputs_path, outputs_path = sys.argv[1:4]
device = tvm.cpu(0)
vm = relax.VirtualMachine(tvm.runtime.load_module(library), device)
with np.load(inputs_path) as data:
    arrays = [data[f"in{i}"] for i in range(len(data.files))]
result = vm["main"](*[tvm.runtime.tensor(a, device) for a in arrays])


def flatten(value):
    if hasattr(value, "numpy"):
        return [value.numpy()]
    return [array for item in value for array in flatten(item)]


outputs = flatten(result)
np.savez(outputs_path, **{f"out{i}": out for i, out in enumerate(outputs)})
done = time.perf_counter()
print(f"run.py: import tvm {imported - start:.1f} s, load+run {done - imported:.1f} s (emulated), "
      f"{len(outputs)} output(s) {[list(o.shape) for o in outputs]}")
