# DeepProfiler 0.5.1 in its own Python 3.11 environment (TensorFlow 2.15.1, numpy<2, pandas<3).
# The environment is installed exactly from the committed freeze; the stamp makes the target
# idempotent (it reruns only when the freeze changes or the venv is gone).

DP_VENV := .venvs/deepprofiler
DP_REQUIREMENTS := requirements/deepprofiler-0.5.1.txt

$(DP_VENV)/.installed: $(DP_REQUIREMENTS) | $(UV)
	rm -rf $(DP_VENV)
	$(UV) venv --quiet --python $(PY311) $(DP_VENV)
	$(UV) pip sync --quiet --python $(DP_VENV)/bin/python $(DP_REQUIREMENTS)
	$(DP_VENV)/bin/python -c "import deepprofiler.profiling, tensorflow as tf, pandas; assert tf.__version__.startswith('2.15'), tf.__version__; assert pandas.__version__ < '3'"
	@touch $@

.PHONY: deepprofiler-env
deepprofiler-env: $(DP_VENV)/.installed

TEST_ENVS += deepprofiler-env
DEMO_ENVS += deepprofiler-env
