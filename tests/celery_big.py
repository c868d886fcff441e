"""Celery tasks that carry a file as an argument (tests/broker_bounds.rs).

    python celery_big.py send N MB COUNTDOWN   # N tasks, each with an MB-megabyte argument
    celery -A celery_big worker -Q big         # the worker that holds them until due

TASK_PROTOCOL=1 sends with Celery's message protocol 1 (the ETA inside the body), else 2
(the ETA in the headers).
"""
import base64
import os
import sys

from celery import Celery

app = Celery("big", broker=os.environ["CELERY_BROKER_URL"])
app.conf.task_protocol = int(os.environ.get("TASK_PROTOCOL", "2"))


@app.task(name="big.upload")
def upload(data):
    return len(data)


if __name__ == "__main__":
    if sys.argv[1] == "send":
        data = base64.b64encode(os.urandom(int(sys.argv[3]) << 20)).decode()
        for i in range(int(sys.argv[2])):
            upload.apply_async(args=(data,), queue="big", countdown=int(sys.argv[4]))
