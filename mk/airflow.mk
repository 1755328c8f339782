# Airflow with this checkout's DAGs, for the web UI on loopback (docs/OPERATIONS.md).
#
#   make airflow                 # api-server + scheduler + dag-processor + triggerer, http://127.0.0.1:8080
#   make airflow AIRFLOW_PORT=8081
#   make airflow-pools           # (re)create the cpjump1 pools only
#
# State (SQLite metadata DB, logs, the generated admin password in
# simple_auth_manager_passwords.json.generated) lives in airflow_home/, which git ignores.
# Tasks run in local mode: each stage is a `cpjump1 <stage>` subprocess; outputs go to
# CPJUMP1_STORAGE_ROOT (default ./data). `make demo` uses the same AIRFLOW_HOME, so its runs
# show up in the grid view.

AIRFLOW_HOME_DIR ?= $(CURDIR)/airflow_home
AIRFLOW_PORT ?= 8080
CPJUMP1_POOL_CELLPROFILER_SLOTS ?= 2
CPJUMP1_POOL_GPU_SLOTS ?= 1

AIRFLOW_ENV := AIRFLOW_HOME=$(AIRFLOW_HOME_DIR) \
	AIRFLOW__CORE__DAGS_FOLDER=$(CURDIR)/dags \
	AIRFLOW__CORE__LOAD_EXAMPLES=False \
	AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION=True \
	AIRFLOW__API__HOST=127.0.0.1 \
	AIRFLOW__API__PORT=$(AIRFLOW_PORT) \
	AIRFLOW__API__BASE_URL=http://127.0.0.1:$(AIRFLOW_PORT) \
	AIRFLOW__CORE__EXECUTION_API_SERVER_URL=http://127.0.0.1:$(AIRFLOW_PORT)/execution/ \
	AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT=30 \
	CPJUMP1_STORAGE_ROOT=$${CPJUMP1_STORAGE_ROOT:-$(CURDIR)/data} \
	CPJUMP1_MODE=local

.PHONY: airflow airflow-db airflow-pools

airflow-db: env
	mkdir -p $(AIRFLOW_HOME_DIR)
	$(AIRFLOW_ENV) $(RUN) airflow db migrate

# Pool names come from cpjump1.deploy (the Helm chart creates the same pools in a cluster).
airflow-pools: airflow-db
	$(AIRFLOW_ENV) $(RUN) airflow pools set cpjump1-cellprofiler $(CPJUMP1_POOL_CELLPROFILER_SLOTS) "concurrent CellProfiler illum/analysis tasks"
	$(AIRFLOW_ENV) $(RUN) airflow pools set cpjump1-gpu $(CPJUMP1_POOL_GPU_SLOTS) "concurrent DeepProfiler (GPU) tasks"

airflow: $(DEMO_ENVS) airflow-pools
	@echo "Airflow UI: http://127.0.0.1:$(AIRFLOW_PORT)  (admin password: $(AIRFLOW_HOME_DIR)/simple_auth_manager_passwords.json.generated)"
	$(AIRFLOW_ENV) $(RUN) airflow standalone

# Screenshots for docs/OPERATIONS.md: an embedded Airflow on a free loopback port runs the batch
# DAG on two synthetic plates (load_data only), then headless Chromium (Debian package
# `chromium`, installed when missing) captures the grid view and the trigger form.
.PHONY: airflow-screenshots
airflow-screenshots: env
	@command -v chromium >/dev/null 2>&1 || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y --no-install-recommends chromium; }
	$(RUN) python -m cpjump1.airflow.screenshots --out docs/img
