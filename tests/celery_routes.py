"""Celery's own answer for the differential routing test (tests/routing_celery.rs).

stdin:  {"cases": [{"routes": [[pattern, queue], ...], "names": [task, ...]}, ...]}
stdout: one entry per case: {"queues": [queue per name]} or {"error": "..."} when Celery
        cannot even build the router (e.g. a glob Python's re rejects).
"""
import json
import sys

from celery import Celery
from celery.app.routes import Router, prepare

app = Celery("differential", set_as_current=False)


def answer(case):
    try:
        # The routing table format the operator publishes: task_routes = (pairs,)
        router = Router(prepare((case["routes"],)), app.amqp.queues, create_missing=True, app=app)
    except Exception as e:  # noqa: BLE001 - any failure is Celery's answer
        return {"error": f"{type(e).__name__}: {e}"}
    return {"queues": [router.route({}, name)["queue"].name for name in case["names"]]}


cases = json.load(sys.stdin)["cases"]
json.dump([answer(c) for c in cases], sys.stdout)
