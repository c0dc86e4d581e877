PY ?= .host/venv/bin/python

.PHONY: setup test bench bench-sdxl bench-gpu gpu-bundle workflows
setup:
	bash scripts/setup.sh
test:
	bash scripts/test.sh
bench:
	@for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done
bench-sdxl:
	bash bench/sdxl_cpu.sh
bench-gpu:
	bash bench/gpu.sh
gpu-bundle:
	bash bench/gpu_bundle.sh
workflows:
	$(PY) scripts/build_workflows.py
