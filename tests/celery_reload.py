"""A producer whose routes come from deploy/examples/taskqueue_routes.py (tests/routing_celery.rs).

argv: PATH of the mounted table. Broker from CELERY_BROKER_URL. stdin: one task name per line;
each is sent with app.send_task (Celery routes it), then `sent` is printed. One process for the
whole test: a route change must reach it without a restart.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "deploy", "examples"))

from celery import Celery  # noqa: E402
from taskqueue_routes import FileRoutes  # noqa: E402

app = Celery("reload", broker=os.environ["CELERY_BROKER_URL"], set_as_current=False)
app.conf.task_routes = (FileRoutes(sys.argv[1], check_every=float(os.environ.get("CHECK_EVERY", "5"))),)
app.conf.broker_connection_retry_on_startup = True

for line in sys.stdin:
    name = line.strip()
    if name:
        app.send_task(name)
        print("sent", flush=True)
