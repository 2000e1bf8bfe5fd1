#!/bin/sh
# The wheels the lent GPU machine (docs/PERFORMANCE.md, "Running the GPU benches") lacks for
# bench/quant_gpu.py: Python 3.12 and torch are there; diffusers, torchao, bitsandbytes and what
# `import engine.pipelines` needs (pydantic, aiosqlite) are not. About 60 MB, under the 64 MiB a
# call may carry. Ray (bench/cluster_gpu.py) is not in it: its wheel alone is 79 MB.
# Usage, in the repository root: sh bench/device_wheels.sh   (writes .whl/, which git ignores)
set -e
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  diffusers==0.42.1 torchao==0.18.0 bitsandbytes==0.50.2 pydantic==2.14.4 pydantic-core==2.50.5 \
  annotated-types==0.8.0 typing-inspection==0.4.5 aiosqlite==0.22.1
du -sh .whl
