# CellProfiler 4.2.8.1 headless in its own Python 3.9 environment (.venvs/cellprofiler).
# Recipe: /work/shared/notes/cellprofiler-env.md (verified on Debian 12); the same
# requirements file builds images/cellprofiler/Dockerfile.
#   make cellprofiler-env

CP_VENV := .venvs/cellprofiler
CP_REQ := requirements/cellprofiler-4.2.8.1.txt
CP_PY39 ?= 3.9.18
CP_APT_PACKAGES := openjdk-17-jdk-headless default-libmysqlclient-dev gcc libc6-dev pkg-config

.PHONY: cellprofiler-env cellprofiler-system-deps

# Debian packages: a JDK (javabridge builds against jni.h / libjvm.so) and mysql_config
# (mysqlclient 1.4.6). Installed only when missing; CI runs as root on Debian 12.
cellprofiler-system-deps:
	@if ! command -v javac >/dev/null 2>&1 || ! command -v mysql_config >/dev/null 2>&1 \
	    || ! command -v gcc >/dev/null 2>&1; then \
	  echo "cellprofiler-env: installing $(CP_APT_PACKAGES)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y \
	    --no-install-recommends $(CP_APT_PACKAGES); \
	fi

$(CP_VENV)/.installed: $(CP_REQ)
	$(MAKE) --no-print-directory cellprofiler-system-deps
	rm -rf $(CP_VENV)
	mkdir -p $(dir $(CP_VENV))
	PYENV_VERSION=$(CP_PY39) python3.9 -m venv $(CP_VENV)
	$(CP_VENV)/bin/pip install --quiet --disable-pip-version-check \
	  wheel==0.45.1 numpy==1.24.4 Cython==0.29.37
	JAVA_HOME=$${JAVA_HOME:-$$(ls -d /usr/lib/jvm/java-17-openjdk-* /usr/lib/jvm/default-java 2>/dev/null | head -n1)} \
	  $(CP_VENV)/bin/pip install --quiet --disable-pip-version-check \
	  --no-build-isolation --no-deps -r $(CP_REQ)
	$(CP_VENV)/bin/python -m cellprofiler --version
	@touch $@

cellprofiler-env: $(CP_VENV)/.installed

TEST_ENVS += cellprofiler-env
DEMO_ENVS += cellprofiler-env
