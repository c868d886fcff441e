"""A Celery app whose `timezone` is not UTC, sending ETAs without an offset (tests/broker.rs).

    python celery_tz.py send N SECONDS   # N tasks with a naive eta, SECONDS from now
    python celery_tz.py scheduled        # the worker's own ETAs (`inspect scheduled`), epoch ms, one per line
    celery -A celery_tz worker -Q tz     # the worker that holds them until due
"""
import os
import sys
from datetime import datetime, timedelta, timezone

from celery import Celery

app = Celery("tz", broker=os.environ["CELERY_BROKER_URL"])
app.conf.timezone = "America/New_York"
app.conf.enable_utc = False


@app.task(name="tz.later")
def later(i):
    return i


if __name__ == "__main__":
    if sys.argv[1] == "send":
        for i in range(int(sys.argv[2])):
            # Naive: Celery sends it as it is (no offset in the message).
            eta = datetime.now() + timedelta(seconds=int(sys.argv[3]) + i)
            later.apply_async(args=(i,), queue="tz", eta=eta)
    elif sys.argv[1] == "scheduled":
        replies = app.control.inspect(timeout=3).scheduled() or {}
        for entries in replies.values():
            for e in entries:
                # Whole milliseconds, truncated as the operator keeps them.
                since = datetime.fromisoformat(e["eta"]) - datetime(1970, 1, 1, tzinfo=timezone.utc)
                print(since // timedelta(milliseconds=1))
