# The two commands a new user needs (see README):
#   make demo   local control plane + Redis + operator + the seed's TaskQueues + real Celery tasks
#   make test   everything the CI runs: format, lint, unit, mock-API and end-to-end tests
.PHONY: demo test up down crd lint bench

# make demo PLOT=demo.svg also draws the run's timeline (pending, in flight, replicas per pool);
# SHOT=page.png also takes a screenshot of the operator's page while the pools are busy.
demo:
	bash deploy/demo/demo.sh $(if $(PLOT),--plot $(PLOT)) $(if $(SHOT),--shot $(SHOT))

test:
	bash deploy/local/test.sh

# Start / stop the local stack by hand (kube-apiserver + controller-manager, Redis, venv, Helm).
up:
	bash deploy/local/up.sh

down:
	bash deploy/local/down.sh

# Regenerate the committed CRD from the Rust types (a test fails when they differ).
crd:
	cargo run --quiet -- crd > crds/taskqueue.yaml
	cp crds/taskqueue.yaml charts/taskqueue-operator/crds/taskqueue.yaml

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings
