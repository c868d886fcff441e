"""The Celery app of the seed setup (`celery -A app.worker`), used by the demo and the tests.

Broker URL from CELERY_BROKER_URL (the operator sets it in every worker pod from the TaskQueue's
Secret); CELERY_BROKER_MASTER_NAME sets the Sentinel master for `sentinel://` URLs. Routes: the
seed's task_routes, or a routing table JSON file when TASK_ROUTES_FILE is set (the format the
operator's routing ConfigMap holds).
"""
import glob
import json
import os

from celery import Celery

app = Celery("app.worker", broker=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0"))

SEED_ROUTES = {
    "app.worker.tasks.ai_tasks.*": {"queue": "ai_processing"},
    "app.worker.tasks.demo_tasks.*": {"queue": "demo_tasks"},
    "app.worker.tasks.urgent.*": {"queue": "urgent"},
    "app.worker.tasks.reports.*": {"queue": "reports"},
    "app.worker.tasks.emails.*": {"queue": "notifications"},
}

transport = {}
if os.environ.get("CELERY_BROKER_MASTER_NAME"):
    transport["master_name"] = os.environ["CELERY_BROKER_MASTER_NAME"]
# CELERY_VISIBILITY_TIMEOUT=N: kombu restores a message left unacked (its worker died) N s after
# its delivery (3600 by default).
if os.environ.get("CELERY_VISIBILITY_TIMEOUT"):
    transport["visibility_timeout"] = int(os.environ["CELERY_VISIBILITY_TIMEOUT"])
app.conf.broker_transport_options = transport

routes_file = os.environ.get("TASK_ROUTES_FILE")
app.conf.update(
    # The table, and its parts when it is cut (task_routes.json.part002, ...), in name order.
    task_routes=([r for f in sorted(glob.glob(routes_file + "*")) for r in json.load(open(f))],) if routes_file else SEED_ROUTES,
    # No result backend: the demo only cares where messages go and who consumes them.
    task_ignore_result=True,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    # CELERY_ACKS_LATE=1: a task is acked when it ends, not when it starts, so a worker with
    # prefetch 1 holds one task at a time and a task cut short is delivered again.
    task_acks_late=os.environ.get("CELERY_ACKS_LATE") == "1",
)
# TASK_COUNT_KEY=KEY: every task that ends adds 1 to its name's field of the broker hash KEY: the
# demo counts what the workers ran, not what left the queue.
if os.environ.get("TASK_COUNT_KEY"):
    from celery.signals import task_postrun

    @task_postrun.connect
    def _count(task=None, **_):
        with app.connection_for_write() as conn:
            conn.default_channel.client.hincrby(os.environ["TASK_COUNT_KEY"], task.name, 1)


app.autodiscover_tasks(["app.worker"], related_name="tasks.ai_tasks", force=True)
app.autodiscover_tasks(["app.worker"], related_name="tasks.demo_tasks", force=True)
app.autodiscover_tasks(["app.worker"], related_name="tasks.urgent", force=True)
app.autodiscover_tasks(["app.worker"], related_name="tasks.reports", force=True)
app.autodiscover_tasks(["app.worker"], related_name="tasks.emails", force=True)
